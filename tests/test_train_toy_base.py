"""scripts/train_toy_base.py: a few steps of the real script, and the VAE rescaling it relies on."""
import json
import os

import torch
from omegaconf import OmegaConf

from ldm.data.toy_scenes import scene_batch
from scripts.train_toy_base import main, rescale_latents, shape_text_encoder

TOY_INFERENCE = "configs/toy/v1-inference.yaml"


def test_a_short_run_writes_a_loadable_fp16_sd_checkpoint_with_its_record(tmp_path):
    from ldm.util import load_model_from_config

    out = tmp_path / "toy.ckpt"
    args = ["--out", str(out), "--vae_steps", "2", "--vae_batch_size", "2", "--unet_steps", "3",
            "--unet_batch_size", "4", "--scenes", "16"]
    main(args)
    state = torch.load(out, weights_only=True)["state_dict"]
    assert {k.split(".")[0] for k in state} >= {"model", "first_stage_model", "cond_stage_model"}
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in state)  # SD's 4.x key spelling
    assert {v.dtype for k, v in state.items() if k not in ("betas", "alphas_cumprod")} == {torch.float16}
    assert os.path.getsize(out) < 10e6
    token_embedding = state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].float()
    assert abs(token_embedding.std().item() - 0.02 * 30) < 0.01  # transformers' init, scaled to CLIP-L's size
    positions = state["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"].float()
    assert abs(positions.std().item() - 0.02 * 5) < 0.005
    model = load_model_from_config(OmegaConf.load(TOY_INFERENCE), str(out), verbose=False)
    assert model.get_learned_conditioning(["a red circle"]).shape == (1, 77, 32)
    record = json.loads((tmp_path / "toy.json").read_text())
    assert record["seed"] == 0 and record["command"] == "python scripts/train_toy_base.py " + " ".join(args)
    assert len(record["options"]) > 5 and record["unet_loss_last200"] > 0
    assert (tmp_path / "toy.png").read_bytes()[:4] == b"\x89PNG"


def test_rescaling_gives_sd_spread_and_leaves_reconstructions_unchanged():
    from ldm.util import instantiate_from_config

    torch.manual_seed(0)
    vae = instantiate_from_config(OmegaConf.load(TOY_INFERENCE).model.params.first_stage_config).eval()
    images = torch.from_numpy(scene_batch("rescale-test", 8)[0])
    with torch.no_grad():
        before = vae.decode(vae.encode(images).mean)
        a = rescale_latents(vae, images, 0.18215)
        posterior = vae.encode(images)
        after = vae.decode(posterior.mean)
    assert abs(a - 1.0) > 0.1  # a random VAE is off SD's spread: the test would see a no-op
    assert abs((0.18215 * posterior.mean).std().item() - 1.0) < 1e-4
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_vae_from_keeps_vae_and_text_encoder_and_trains_a_fresh_unet(tmp_path):
    from .conftest import TOY_CKPT

    out = tmp_path / "unet-only.ckpt"
    main(["--out", str(out), "--vae_from", TOY_CKPT, "--unet_steps", "2", "--unet_batch_size", "4", "--scenes", "8"])
    before = torch.load(TOY_CKPT, weights_only=True)["state_dict"]
    after = torch.load(out, weights_only=True)["state_dict"]
    for k in before:
        if k.startswith(("first_stage_model.", "cond_stage_model.")):
            assert torch.equal(before[k], after[k]), k
    unet = [k for k in before if k.startswith("model.diffusion_model.")]
    assert sorted(unet) == sorted(k for k in after if k.startswith("model.diffusion_model."))
    assert not all(torch.equal(before[k], after[k]) for k in unet)


def test_shaped_text_encoder_keeps_words_apart_and_attends_selectively():
    """What shape_text_encoder is for: distinct words at the output, and attention that singles out tokens."""
    from ldm.util import instantiate_from_config

    def build(shaped):
        torch.manual_seed(0)
        encoder = instantiate_from_config(OmegaConf.load(TOY_INFERENCE).model.params.cond_stage_config)
        if shaped:
            shape_text_encoder(encoder)
        return encoder

    def colour_cosine_and_peak_attention(encoder):
        tokens = encoder.tokenize(["a red circle on a blue background", "a blue circle on a red background"])
        with torch.no_grad():
            out = encoder.encode_tokens(tokens)
            layer = encoder.transformer.encoder.layers[9]
            x = layer.layer_norm1(encoder.frozen_hidden_states(tokens[:1, :8], 9))
            q, k = (proj(x)[0].view(8, encoder.heads, -1).transpose(0, 1) for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj))
            logits = (q @ k.transpose(1, 2)) * layer.self_attn.scale + torch.full((8, 8), float("-inf")).triu(1)
        peak = logits.softmax(-1)[:, 1:].max(-1).values.mean().item()  # the words' strongest attention, per head
        return torch.nn.functional.cosine_similarity(out[0, 2], out[1, 2], 0).item(), peak

    plain_cosine, plain_peak = colour_cosine_and_peak_attention(build(False))
    shaped_cosine, shaped_peak = colour_cosine_and_peak_attention(build(True))
    assert plain_cosine > 0.9 and shaped_cosine < 0.5
    assert shaped_peak > plain_peak + 0.2
