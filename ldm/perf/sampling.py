"""Our guided DDIM sampler against diffusers' StableDiffusionPipeline holding the same tensors (built in memory by
diffusers' own converters): the whole txt2img job, prompt to decoded image, from the same x_T with the adapter off,
so that their images can be compared as well as their times."""
import copy
import statistics

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import keys_to_sd
from ldm.perf.device import timed
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
    text_encoder.load_state_dict(model.cond_stage_model.transformer.state_dict(), strict=True, assign=True)
    embeddings = text_encoder.embeddings  # its position ids are no weights: made as transformers makes them
    embeddings.position_ids = torch.arange(embeddings.position_ids.shape[-1], device=model.device).expand(1, -1)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), unet=unet.eval(),
                                   tokenizer=model.cond_stage_model.tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(model.device)


@torch.no_grad()
def measure(model, config, n, H, W, steps=50, scale=10.0, seed=42, repeats=3):
    """Seconds per 50-step batch for ours and diffusers' pipeline (median of `repeats` after a warm-up each), and
    the largest pixel difference between their images."""
    plain = {"gradient_checkpointing": False, "channels_last": False, "precision": "fp32"}
    model.fast = model.check_fast_options(plain)  # what txt2img runs: fp32, contiguous, nothing recomputed
    model.prepare_fast_path()
    model.eval()
    pipe = diffusers_pipeline(model, config)

    def ours():
        with model.cond_stage_model.adapter_disabled():
            uc, cond = model.get_learned_conditioning([""] * n), model.get_learned_conditioning([PROMPT] * n)
        return sample_images(model, cond, uc, seed, H, W, steps, scale, progress=False)

    def theirs():
        torch.manual_seed(seed)  # x_T as sample_images draws it
        latents = torch.randn((n, model.channels, H // LATENT_FACTOR, W // LATENT_FACTOR)).to(model.device)
        return pipe([PROMPT] * n, height=H, width=W, num_inference_steps=steps, guidance_scale=scale,
                    negative_prompt=[""] * n, latents=latents, eta=0.0, output_type="pt").images.float().cpu()

    results, images = {"batch": n, "steps": steps, "scale": scale, "precision": "fp32"}, {}
    for name, fn in (("ours", ours), ("diffusers", theirs)):
        images[name] = fn()  # warm-up
        results[f"{name}_s"] = statistics.median(timed(fn, 1, model.device) for _ in range(repeats))
    results["ours_over_diffusers"] = results["ours_s"] / results["diffusers_s"]
    results["max_abs_pixel_diff"] = float((images["ours"] - images["diffusers"]).abs().max())
    return results
