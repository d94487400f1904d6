"""A CatVersion concept inside a diffusers StableDiffusionPipeline renders what our own sampler renders."""
import copy

import pytest
import torch

from ldm.interop.diffusers import apply_catversion
from ldm.models.diffusion.ddim import DDIMSampler

from .conftest import diffusers_models

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


def encode(pipe, prompt):
    return pipe.encode_prompt(prompt, torch.device("cpu"), 1, False)[0]


@torch.no_grad()
def test_patched_text_encoder_gives_our_conditioning(concept):
    model, adapter_dir = concept
    text_encoder = diffusers_text_encoder(model)
    tokens = model.cond_stage_model.tokenize([PROMPT, "a photo", ""])
    base = text_encoder(tokens)[0]

    patch = apply_catversion(text_encoder, adapter_dir)
    ours = model.get_learned_conditioning([PROMPT, "a photo", ""])
    theirs = text_encoder(tokens)[0]
    assert (theirs - ours).abs().max() < 1e-5
    assert (theirs - base).abs().max() > 0.1  # the concept changes the conditioning far beyond the tolerance
    with patch.disabled():
        assert torch.equal(text_encoder(tokens)[0], base)
        with model.cond_stage_model.adapter_disabled():
            assert (model.get_learned_conditioning([PROMPT]) - base[:1]).abs().max() < 1e-5

    patch.adapters[0].strength = 0.5
    model.cond_stage_model.adapters[0].strength = 0.5
    half = text_encoder(tokens)[0]
    assert (half - model.get_learned_conditioning([PROMPT, "a photo", ""])).abs().max() < 1e-5
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
    assert (text_encoder(tokens)[0] - embedder.encode_tokens(tokens)).abs().max() < 1e-5


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
    assert (cond - c).abs().max() < 1e-5 and (negative - uc).abs().max() < 1e-5

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
    assert (theirs - ours).abs().max() < 1e-3
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
