#!/usr/bin/env python
"""Write a seeded, random miniature of SD v1.5 in the real SD checkpoint format (nothing is downloaded).

The same seed gives the same bytes of weights on every run, so demos and tests are reproducible.
"""
import argparse

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import save_checkpoint
from ldm.util import HelpFormatter, instantiate_from_config


def make_tiny_model(config_path="configs/tiny/v1-inference.yaml", seed=0):
    """The tiny LatentDiffusion with every weight random.

    A fresh UNet zeroes each block's output projection and PyTorch's default initialisation shrinks the signal at
    every layer: a random context would move its prediction by a tenth of its size, and no adapter could be seen
    learning. So the UNet's linear and convolution weights are He normal (std sqrt(2 / fan_in), zero biases), the
    VAE's zeroed layers get PyTorch's default initialisation, and CLIP keeps transformers' own."""
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.load(config_path).model)
    for module in model.model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            torch.nn.init.normal_(module.weight, 0.0, (2.0 / module.weight[0].numel()) ** 0.5)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    for module in model.first_stage_model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and hasattr(module, "reset_parameters") and not weight.any():
            module.reset_parameters()
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="models/tiny/tiny-sd.ckpt", help=".ckpt or .safetensors path to write")
    p.add_argument("--config", default="configs/tiny/v1-inference.yaml", help="model config")
    p.add_argument("--seed", type=int, default=0, help="weights seed")
    opt = p.parse_args(argv)
    model = make_tiny_model(opt.config, opt.seed)
    extra = {"betas": model.betas, "alphas_cumprod": model.alphas_cumprod}  # real SD files carry the schedule too
    save_checkpoint(model, opt.out, extra=extra)
    n = sum(p.numel() for p in model.parameters())
    print(f"Wrote {opt.out} ({n / 1e6:.1f}M parameters, seed {opt.seed})")


if __name__ == "__main__":
    main()
