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


def test_vae_from_keeps_the_vae_and_shapes_a_fresh_text_encoder_and_unet(tmp_path):
    """Only the VAE is taken; the text encoder is drawn and shaped as in a full run (here with a doubled end token)."""
    from .conftest import TOY_CKPT

    out = tmp_path / "unet-only.ckpt"
    main(["--out", str(out), "--vae_from", TOY_CKPT, "--text_end_scale", "20", "--unet_steps", "2",
          "--unet_batch_size", "4", "--scenes", "8"])
    before = torch.load(TOY_CKPT, weights_only=True)["state_dict"]
    after = torch.load(out, weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("first_stage_model."))
    tokens = after["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    shipped_tokens = before["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    eos = 49407
    assert torch.equal(tokens[eos], 2 * shipped_tokens[eos]) and torch.equal(tokens[:eos], shipped_tokens[:eos])
    unet = [k for k in before if k.startswith("model.diffusion_model.")]
    assert sorted(unet) == sorted(k for k in after if k.startswith("model.diffusion_model."))
    assert not all(torch.equal(before[k], after[k]) for k in unet)


def test_the_shipped_text_encoder_is_the_default_shaping_of_the_seed_0_init():
    """The toy model's text encoder is never trained: the script's defaults must rebuild the shipped one bit for bit."""
    from ldm.checkpoint import keys_from_sd
    from ldm.util import instantiate_from_config

    from .conftest import TOY_CKPT

    torch.manual_seed(0)  # as main() does before building the model
    model = instantiate_from_config(OmegaConf.load(TOY_INFERENCE).model)
    shape_text_encoder(model.cond_stage_model)
    prefix = "cond_stage_model.transformer."
    shipped = keys_from_sd(torch.load(TOY_CKPT, weights_only=True)["state_dict"])
    shipped = {k[len(prefix):]: v for k, v in shipped.items() if k.startswith(prefix)}
    rebuilt = model.cond_stage_model.transformer.state_dict()
    assert len(shipped) > 100
    for k, v in shipped.items():
        assert torch.equal(v.float(), rebuilt[k]), k


# The first toy model's shaping (embedding sizes only), and experiment 1 on top of it (README, "The toy world").
PLAIN = dict(position_scale=30.0, qk_scale=1.0, value_scale=1.0, confidence=0.0, start_scale=1.0, end_scale=1.0,
             word_queries=())
EXPERIMENT = dict(PLAIN, qk_scale=3.0, value_scale=4.0, confidence=4.0)


def _encoder(**shape):
    from ldm.util import instantiate_from_config

    torch.manual_seed(0)
    encoder = instantiate_from_config(OmegaConf.load("configs/toy/v1-finetune.yaml").model.params.cond_stage_config)
    shape_text_encoder(encoder, **shape)  # with concat_kv: an untrained randn adapter
    return encoder


def test_confident_attention_and_unit_values_keep_an_untrained_adapter_from_moving_the_encoder():
    """The randn extra key/value of an untrained CatVersion adapter repaint the plain toy encoder's prompts; with
    `confidence` and `value_scale` (as in a trained CLIP) they barely move them, and those two change nothing else."""
    prompts = ["square on a blue background", "a red circle on a green background"]

    def outputs(**shape):
        encoder = _encoder(**shape)
        with torch.no_grad():
            adapted = encoder(prompts)
            with encoder.adapter_disabled():
                plain = encoder(prompts)
        words = ((adapted - plain).norm(dim=-1) / plain.norm(dim=-1))[:, 1:7].mean().item()
        return plain, words

    _, plain_change = outputs(**PLAIN)
    shaped, shaped_change = outputs(**EXPERIMENT)
    assert plain_change > 0.3 and shaped_change < 0.05, (plain_change, shaped_change)
    # the same projected queries and keys with (almost) no shared component: the same outputs
    little_confidence, _ = outputs(**{**EXPERIMENT, "confidence": 1e-3})
    torch.testing.assert_close(shaped, little_confidence, atol=1e-4, rtol=1e-4)  # exact up to fp16 rounding
    no_value_scale, _ = outputs(**{**EXPERIMENT, "value_scale": 1.0})
    torch.testing.assert_close(shaped, no_value_scale, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(shaped, outputs(**{**EXPERIMENT, "qk_scale": 1.0})[0], atol=1e-4, rtol=1e-4)


def test_word_queries_give_each_word_its_own_query_in_the_adapted_layers():
    """With the default shaping, `circle` has nearly the same query wherever it stands, and other words' queries
    overlap it less than without the refit (random queries overlap, which lets `square` read circle's key)."""
    prompts = ["circle", "square on a blue background", "a red circle on a white background"]

    def overlaps(**shape):
        encoder = _encoder(**shape)
        queries = {}
        layers = encoder.transformer.encoder.layers
        hooks = [layers[i].self_attn.q_proj.register_forward_hook(
            lambda module, args, out, i=i: queries.__setitem__(i, torch.nn.functional.normalize(out, dim=-1)))
            for i in (9, 10, 11)]
        with torch.no_grad(), encoder.adapter_disabled():
            encoder(prompts)
        for hook in hooks:
            hook.remove()
        circle = [q[0, 1] for q in queries.values()]
        same = min((c @ q[2, 3]).item() for c, q in zip(circle, queries.values()))
        others = max((c @ q[1, j]).abs().item() for c, q in zip(circle, queries.values()) for j in (1, 3, 4, 5))
        return same, others

    same, others = overlaps()
    _, unfitted_others = overlaps(word_queries=())
    assert same > 0.85 and others < 0.35, (same, others)  # measured: 0.91, 0.30
    assert unfitted_others > 0.45, unfitted_others  # measured: 0.52


def test_text_lr_trains_the_text_encoder_with_the_unet(tmp_path):
    from .conftest import TOY_CKPT

    out = tmp_path / "joint.ckpt"
    main(["--out", str(out), "--vae_from", TOY_CKPT, "--text_lr", "1e-3", "--unet_steps", "250", "--unet_batch_size", "2",
          "--scenes", "8"])
    before = torch.load(TOY_CKPT, weights_only=True)["state_dict"]
    after = torch.load(out, weights_only=True)["state_dict"]
    text = [k for k in before if k.startswith("cond_stage_model.") and "embeddings" not in k]
    moved = [k for k in text if not torch.equal(before[k], after[k])]
    assert len(moved) > len(text) // 2
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("first_stage_model."))
