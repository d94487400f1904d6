#!/usr/bin/env python
"""Render a CatVersion concept with diffusers' StableDiffusionPipeline (a local SD v1.x diffusers folder).

    python scripts/diffusers_example.py --model models/sd/stable-diffusion-v1-5 \\
        --adapter logs/teddybear/checkpoints/adapter --prompt "teddybear on the beach" --seed 78

The concept is applied with `ldm.interop.diffusers.apply_catversion`. To render what scripts/txt2img.py renders:
the empty prompt encoded WITHOUT the concept as `negative_prompt_embeds`, DDIM as in SD v1 / LDM (steps_offset=1,
set_alpha_to_one=False, no clipping, eta 0), and x_T drawn as txt2img draws it (`torch.manual_seed(seed)`, then
`torch.randn` on the CPU).
"""
import argparse
import os

from ldm.files import atomic_write
from ldm.util import HelpFormatter, one_line_errors


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="models/sd/stable-diffusion-v1-5",
                   help="local diffusers folder of SD v1.x (model_index.json, unet/, vae/, text_encoder/, ...)")
    p.add_argument("--variant", default=None, help="weights variant of the folder, e.g. fp16")
    p.add_argument("--adapter", nargs="+", required=True,
                   help="CatVersion adapter(s): a training run's checkpoints/adapter folder, a catversion.safetensors "
                        "or the authors' pytorch_adapter.bin; several stack concepts")
    p.add_argument("--strength", type=float, default=1.0, help="concept strength: 0 = base model, 1 = as trained")
    p.add_argument("--prompt", default="teddybear on the beach", help="prompt, written with the concept's class word")
    p.add_argument("--seed", type=int, default=42, help="seed of the initial latents (as txt2img's --seed)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--scale", type=float, default=10.0, help="classifier-free guidance scale")
    p.add_argument("--H", type=int, default=512, help="image height in pixels (a multiple of 8)")
    p.add_argument("--W", type=int, default=512, help="image width in pixels (a multiple of 8)")
    p.add_argument("--out", default="outputs/diffusers-example.png", help="PNG to write")
    p.add_argument("--device", default=None, help="torch device; default: cuda if available, else cpu")
    p.add_argument("--half", action="store_true", help="run in float16 (CUDA)")
    return p


def run(opt):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ldm.config import resolve_device
    from ldm.interop.diffusers import apply_catversion

    if opt.H % 8 or opt.W % 8:
        raise ValueError(f"--H {opt.H} and --W {opt.W} must be multiples of 8")
    if not os.path.isfile(os.path.join(opt.model, "model_index.json")):
        raise ValueError(f"{opt.model} is not a diffusers pipeline folder (no model_index.json); "
                         "pass --model with a local SD v1.x diffusers folder")
    device = str(resolve_device(opt.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    dtype = torch.float16 if opt.half else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(opt.model, variant=opt.variant, dtype=dtype,
                                                   safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, beta_schedule="scaled_linear",
                                               steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    for path in opt.adapter:  # a second call on the same text encoder stacks a further concept
        patch = apply_catversion(pipe.text_encoder, path, strength=opt.strength)
    with torch.no_grad(), patch.disabled():
        negative = pipe.encode_prompt("", device, 1, False)[0]

    torch.manual_seed(opt.seed)
    latents = torch.randn((1, pipe.unet.config.in_channels, opt.H // 8, opt.W // 8)).to(device, dtype)
    image = pipe(opt.prompt, height=opt.H, width=opt.W, num_inference_steps=opt.steps, guidance_scale=opt.scale,
                 negative_prompt_embeds=negative, latents=latents, eta=0.0).images[0]
    os.makedirs(os.path.dirname(os.path.abspath(opt.out)), exist_ok=True)
    atomic_write(opt.out, lambda tmp: image.save(tmp, format="PNG"))
    print(f"Wrote {opt.out}")
    return opt.out


def main(argv=None):
    opt = get_parser().parse_args(argv)
    with one_line_errors():
        return run(opt)


if __name__ == "__main__":
    main()
