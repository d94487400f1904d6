"""A CatVersion concept inside a diffusers StableDiffusionPipeline renders what our own sampler renders."""
import copy
import math

import pytest
import torch

from ldm.interop.diffusers import apply_catversion
from ldm.models.diffusion.ddim import DDIMSampler

from .conftest import diffusers_models
from .test_concat_kv import reference_conditioning, reference_layout

PROMPT = "teddybear on the beach"


@pytest.fixture
def concept(tiny_finetune_model, tmp_path):
    """Our tiny model with a trained-looking adapter (random K/V, far from zero), and its saved folder."""
    adapter = tiny_finetune_model.cond_stage_model.adapters[0]
    with torch.no_grad():
        adapter.control_trans.copy_(torch.randn(adapter.control_trans.shape, generator=torch.Generator().manual_seed(7)))
    tiny_finetune_model.cond_stage_model.adapter_save(str(tmp_path / "adapter"))
    return tiny_finetune_model, str(tmp_path / "adapter")


def diffusers_text_encoder(model):
    """A stock transformers CLIPTextModel (default attention) holding our text encoder's weights."""
    from transformers import CLIPTextModel

    ours = model.cond_stage_model.transformer
    # A copy of the config: transformers models share the config object they are built from.
    text_encoder = CLIPTextModel._from_config(copy.deepcopy(ours.config), attn_implementation="sdpa")
    text_encoder.load_state_dict(ours.state_dict(), strict=True)
    return text_encoder.eval()


def diffusers_pipeline(model, ckpt_path):
    """StableDiffusionPipeline from our tiny checkpoint via diffusers' own converters, DDIM set up as SD v1."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    unet, vae, _ = diffusers_models(ckpt_path)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=diffusers_text_encoder(model),
                                   tokenizer=model.cond_stage_model.tokenizer, unet=unet.eval(), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def by_formula(model, tokens, *adapters):
    """The conditioning written out in tests/test_concat_kv.py (softmax of [q K^T; q k_a^T + 1 + log s]), from the
    text encoder's weights and each (flat K/V, strength): our attention function plays no part in it."""
    extras = {}
    for control_trans, strength in adapters:
        for layer, (k, v) in reference_layout(control_trans, len(tokens), 1, [9, 10, 11], 4).items():
            extras.setdefault(layer, []).append((k, v, 1.0 + math.log(strength)))
    return reference_conditioning(model.cond_stage_model.transformer, tokens, extras)


def encode(pipe, prompt):
    return pipe.encode_prompt(prompt, torch.device("cpu"), 1, False)[0]


@torch.no_grad()
def test_patched_text_encoder_gives_our_conditioning(concept):
    model, adapter_dir = concept
    text_encoder = diffusers_text_encoder(model)
    tokens = model.cond_stage_model.tokenize([PROMPT, "a photo", ""])
    base = text_encoder(tokens)[0]

    patch = apply_catversion(text_encoder, adapter_dir)
    kv = model.cond_stage_model.adapters[0].control_trans
    expected = by_formula(model, tokens, (kv, 1.0))
    ours = model.get_learned_conditioning([PROMPT, "a photo", ""])
    theirs = text_encoder(tokens)[0]
    # Measured: 1.4e-6 for both (float32 sums in other orders); the tolerance is about 10x that.
    assert (theirs - expected).abs().max() < 1.5e-5 and (ours - expected).abs().max() < 1.5e-5
    assert (theirs - base).abs().max() > 0.1  # the concept changes the conditioning far beyond the tolerance
    with patch.disabled():
        assert torch.equal(text_encoder(tokens)[0], base)
        with model.cond_stage_model.adapter_disabled():
            assert (model.get_learned_conditioning([PROMPT]) - base[:1]).abs().max() < 1e-5

    patch.adapters[0].strength = 0.5
    model.cond_stage_model.adapters[0].strength = 0.5
    half = text_encoder(tokens)[0]
    expected = by_formula(model, tokens, (kv, 0.5))
    ours = model.get_learned_conditioning([PROMPT, "a photo", ""])
    assert (half - expected).abs().max() < 1.5e-5 and (ours - expected).abs().max() < 1.5e-5  # measured 1.8e-6
    assert (half - theirs).abs().max() > 0.01

    patch.remove()
    assert text_encoder.config._attn_implementation == "sdpa"
    assert torch.equal(text_encoder(tokens)[0], base)
    assert not list(text_encoder._forward_pre_hooks.values())


@torch.no_grad()
def test_concepts_stack_as_in_our_embedder(concept, tmp_path):
    model, adapter_dir = concept
    second = torch.randn(model.cond_stage_model.adapters[0].control_trans.shape, generator=torch.Generator().manual_seed(8))
    embedder = model.cond_stage_model
    with torch.no_grad():
        embedder.adapters[0].control_trans.copy_(second)
    embedder.adapter_save(str(tmp_path / "second"))
    embedder.adapter_load(adapter_dir, stack=True, strength=0.7)  # the first concept, stacked after the second

    text_encoder = diffusers_text_encoder(model)
    patch = apply_catversion(text_encoder, str(tmp_path / "second"))
    assert apply_catversion(text_encoder, adapter_dir, strength=0.7) is patch and len(patch.adapters) == 2
    tokens = embedder.tokenize([PROMPT])
    first = embedder.adapters[1].control_trans
    expected = by_formula(model, tokens, (second, 1.0), (first, 0.7))
    assert (text_encoder(tokens)[0] - expected).abs().max() < 1.5e-5  # measured 1.4e-6
    assert (embedder.encode_tokens(tokens) - expected).abs().max() < 1.5e-5  # measured 1.4e-6


def test_bad_inputs_are_refused_and_leave_the_text_encoder_alone(concept, tmp_path):
    model, _ = concept
    text_encoder = diffusers_text_encoder(model)
    with pytest.raises(ValueError, match="adapter not found"):
        apply_catversion(text_encoder, str(tmp_path / "missing.safetensors"))
    assert text_encoder.config._attn_implementation == "sdpa" and not text_encoder._forward_pre_hooks
    with pytest.raises(ValueError, match="needs a transformers CLIPTextModel"):
        apply_catversion(torch.nn.Linear(2, 2), str(tmp_path))


@torch.no_grad()
def test_pipeline_renders_our_images(concept, tiny_ckpt):
    model, adapter_dir = concept
    pipe = diffusers_pipeline(model, tiny_ckpt)
    patch = apply_catversion(pipe.text_encoder, adapter_dir)
    # Our sampler encodes the empty prompt WITHOUT the adapter; the pipeline would use the patched encoder for it.
    with patch.disabled():
        negative = encode(pipe, "")
    cond = encode(pipe, PROMPT)
    with model.cond_stage_model.adapter_disabled():
        uc = model.get_learned_conditioning([""])
    c = model.get_learned_conditioning([PROMPT])
    kv = model.cond_stage_model.adapters[0].control_trans
    expected_c = by_formula(model, model.cond_stage_model.tokenize([PROMPT]), (kv, 1.0))
    expected_uc = by_formula(model, model.cond_stage_model.tokenize([""]))  # no adapter
    for tensor, expected in ((cond, expected_c), (c, expected_c), (negative, expected_uc), (uc, expected_uc)):
        assert (tensor - expected).abs().max() < 1.5e-5  # measured 1.2e-6 to 1.4e-6

    steps, scale = 4, 10.0
    x_T = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(78))
    z, _ = DDIMSampler(model).sample(steps, 1, (4, 8, 8), conditioning=c, unconditional_conditioning=uc,
                                     unconditional_guidance_scale=scale, eta=0.0, x_T=x_T, verbose=False)
    ours = ((model.decode_first_stage(z) + 1) / 2).clamp(0, 1)

    def render(**kwargs):
        return pipe(PROMPT, height=64, width=64, num_inference_steps=steps, guidance_scale=scale,
                    latents=x_T.clone(), output_type="pt", **kwargs).images

    theirs = render(negative_prompt_embeds=negative)
    assert theirs.shape == ours.shape == (1, 3, 64, 64)
    assert (theirs - ours).abs().max() < 1.5e-5  # measured 1.55e-6 (pixels in [0, 1])
    # Each ingredient matters far beyond the tolerance: the concept, and the adapter-free negative embedding.
    assert (render() - ours).abs().max() > 1e-2
    with patch.disabled():
        assert (render(negative_prompt_embeds=negative) - ours).abs().max() > 1e-2


def test_example_script_renders_what_txt2img_renders(concept, tiny_ckpt, tmp_path):
    import numpy as np
    from PIL import Image

    from ldm.sampling import sample_images, to_uint8
    from ldm.cli.diffusers_example import main

    model, adapter_dir = concept
    folder = str(tmp_path / "pipeline")
    diffusers_pipeline(model, tiny_ckpt).save_pretrained(folder)
    out = main(["--model", folder, "--adapter", adapter_dir, "--prompt", PROMPT, "--seed", "231", "--steps", "4",
                "--H", "64", "--W", "64", "--out", str(tmp_path / "out.png"), "--device", "cpu"])
    theirs = np.asarray(Image.open(out).convert("RGB")).astype(int)

    with torch.no_grad():
        with model.cond_stage_model.adapter_disabled():
            uc = model.get_learned_conditioning([""])
        c = model.get_learned_conditioning([PROMPT])
    ours = to_uint8(sample_images(model, c, uc, 231, 64, 64, ddim_steps=4, scale=10.0, progress=False))[0].numpy()
    # diffusers rounds to uint8 where txt2img truncates (as the reference): at most one level apart, plus noise.
    assert theirs.shape == ours.shape == (64, 64, 3)
    assert np.abs(theirs - ours.astype(int)).max() <= 2 and ours.std() > 10


def test_example_script_refuses_a_folder_without_pipeline(tmp_path, capsys):
    from ldm.cli.diffusers_example import main

    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path), "--adapter", str(tmp_path)])
    assert e.value.code == 2 and "not a diffusers pipeline folder" in capsys.readouterr().err
