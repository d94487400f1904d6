"""Our guided DDIM sampler against diffusers' StableDiffusionPipeline holding the same weights.

The pipeline is assembled in memory from our model through diffusers' own converters and shares its tensors (no
second copy of the weights). Both sides do the whole job of one txt2img iteration: encode the prompt and the empty
prompt, 50 DDIM steps with classifier-free guidance, decode with the VAE, images in [0, 1] on the CPU. Both start
from the same x_T and run the base model (adapter off), so their images can be compared as well as their times.
"""
import copy
import time

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import keys_to_sd
from ldm.perf.device import synchronize
from ldm.sampling import LATENT_FACTOR, sample_images

PROMPT = "teddybear on the beach"


def diffusers_pipeline(model, config):
    """StableDiffusionPipeline sharing `model`'s UNet, VAE and text-encoder tensors; DDIM set up as SD v1."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)
    from transformers import CLIPTextModel

    original = OmegaConf.to_container(config, resolve=True)
    ckpt = keys_to_sd({k: v.detach() for k, v in model.state_dict().items()})
    unet_config = create_unet_diffusers_config_from_ldm(original, ckpt)
    vae_config = create_vae_diffusers_config_from_ldm(original, ckpt)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text_encoder = CLIPTextModel._from_config(copy.deepcopy(model.cond_stage_model.transformer.config),
                                                  attn_implementation="sdpa")
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, unet_config), strict=True, assign=True)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, vae_config), strict=True, assign=True)
    ours = model.cond_stage_model.transformer.state_dict()
    text_encoder.load_state_dict(ours, strict=True, assign=True)
    # Buffers transformers does not save (position ids) are rebuilt on the model's device.
    for name, buf in list(text_encoder.named_buffers()):
        if buf.is_meta:
            module = text_encoder.get_submodule(name.rsplit(".", 1)[0])
            module.register_buffer(name.rsplit(".", 1)[1], torch.arange(buf.shape[-1], device=model.device).expand(buf.shape),
                                   persistent=False)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), unet=unet.eval(),
                                   tokenizer=model.cond_stage_model.tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(model.device)


def x_T(model, n, H, W, seed):
    torch.manual_seed(seed)
    return torch.randn((n, model.channels, H // LATENT_FACTOR, W // LATENT_FACTOR))  # as sample_images draws it


@torch.no_grad()
def ours(model, n, H, W, steps, scale, seed):
    with model.cond_stage_model.adapter_disabled():
        uc = model.get_learned_conditioning([""] * n)
        cond = model.get_learned_conditioning([PROMPT] * n)
    return sample_images(model, cond, uc, seed, H, W, steps, scale, progress=False)


@torch.no_grad()
def theirs(pipe, model, n, H, W, steps, scale, seed):
    latents = x_T(model, n, H, W, seed).to(model.device)
    out = pipe([PROMPT] * n, height=H, width=W, num_inference_steps=steps, guidance_scale=scale, negative_prompt=[""] * n,
               latents=latents, eta=0.0, output_type="pt")
    return out.images.float().cpu()


def measure(model, config, n, H, W, steps=50, scale=10.0, seed=42, repeats=3):
    """Seconds per 50-step batch for ours and diffusers' pipeline (median of `repeats` after a warm-up each), and
    the largest pixel difference between their images."""
    model.fast = model.check_fast_options({"gradient_checkpointing": False, "channels_last": False, "precision": "fp32"})
    model.prepare_fast_path()  # what txt2img runs: fp32, contiguous, nothing recomputed
    model.eval()
    pipe = diffusers_pipeline(model, config)
    device = model.device
    results, images = {}, {}
    for name, fn in (("ours", lambda: ours(model, n, H, W, steps, scale, seed)),
                     ("diffusers", lambda: theirs(pipe, model, n, H, W, steps, scale, seed))):
        images[name] = fn()  # warm-up
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        results[f"{name}_s"] = sorted(times)[len(times) // 2]
    results["ours_over_diffusers"] = results["ours_s"] / results["diffusers_s"]
    results["max_abs_pixel_diff"] = float((images["ours"] - images["diffusers"]).abs().max())
    results.update({"batch": n, "steps": steps, "scale": scale, "precision": "fp32"})
    return results
