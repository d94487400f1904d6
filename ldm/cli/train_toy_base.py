#!/usr/bin/env python
"""Pretrain the toy world's text-to-image model (ldm/toy/base_model.py) and write it in the SD checkpoint format.

Writes `--out`, `<out>.png` (loss curves) and `<out>.json` (command, seed, options, text-encoder shaping, losses, time).
The shipped models/toy/toy-sd.ckpt was made by the defaults with the VAE of the first toy model (14 minutes on two CPU
cores): `git show 5d938ba:models/toy/toy-sd.ckpt > vae.ckpt && python scripts/train_toy_base.py --vae_from vae.ckpt`.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path


import torch
from omegaconf import OmegaConf

from ldm.checkpoint import save_checkpoint
from ldm.toy.base_model import train_base_model
from ldm.toy.shaping import SHIPPED
from ldm.util import HelpFormatter, atomic_write, one_line_errors


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="models/toy/toy-sd.ckpt", help="SD checkpoint to write (.ckpt or .safetensors)")
    p.add_argument("--config", default="configs/toy/v1-inference.yaml", help="model config")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the scenes and the noise")
    p.add_argument("--vae_steps", type=int, default=1000, help="VAE training steps")
    p.add_argument("--vae_batch_size", type=int, default=16, help="VAE batch size")
    p.add_argument("--vae_lr", type=float, default=1e-3, help="VAE peak learning rate")
    p.add_argument("--unet_steps", type=int, default=4500, help="UNet training steps")
    p.add_argument("--unet_batch_size", type=int, default=64, help="UNet batch size")
    p.add_argument("--unet_lr", type=float, default=1e-3, help="UNet peak learning rate")
    p.add_argument("--scenes", type=int, default=40000, help="scenes the UNet sees (encoded once)")
    p.add_argument("--vae_from", default=None,
                   help="take the (trained) VAE from this toy checkpoint instead of training one (the VAE depends only "
                        "on the seed, the --vae_* options and the scenes)")
    p.add_argument("--fp32", action="store_true", help="write fp32 weights (default fp16, as shipped)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def check(opt):
    """Bad options fail here, not after minutes of training."""
    for name in ("vae_steps", "vae_batch_size", "unet_steps", "unet_batch_size", "scenes"):
        if getattr(opt, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(opt, name)}")


def plot_losses(curves, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(curves), 3.5), dpi=100)
    FigureCanvasAgg(figure)
    for ax, (title, values) in zip(figure.subplots(1, len(curves), squeeze=False)[0], curves.items()):
        k = max(1, len(values) // 100)  # averages of k steps: about 100 points per curve
        ax.plot(range(0, len(values) - k + 1, k), torch.tensor(values).unfold(0, k, k).mean(1).tolist())
        ax.set(title=title, xlabel="step", yscale="log")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    opt = get_parser().parse_args(argv)
    with one_line_errors(opt.debug):
        check(opt)
        start = time.time()
        model, curves, record = train_base_model(
            OmegaConf.load(opt.config), opt.seed, opt.vae_steps, opt.vae_batch_size, opt.vae_lr, opt.unet_steps,
            opt.unet_batch_size, opt.unet_lr, opt.scenes, opt.vae_from)
        report = {"command": " ".join(["python", "scripts/train_toy_base.py", *argv]), "seed": opt.seed,
                  "options": vars(opt), "text_shaping": SHIPPED._asdict(), "torch": torch.__version__,
                  "threads": torch.get_num_threads(), **record, "minutes": (time.time() - start) / 60}
        save_checkpoint(model, opt.out, dtype=None if opt.fp32 else torch.float16,
                        extra={"betas": model.betas, "alphas_cumprod": model.alphas_cumprod})
        stem = os.path.splitext(opt.out)[0]
        plot_losses(curves, stem + ".png")
        atomic_write(stem + ".json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1) + "\n"))
    print(f"Wrote {opt.out} ({os.path.getsize(opt.out) / 2**20:.1f} MiB), {stem}.png and {stem}.json "
          f"in {report['minutes']:.1f} min")


if __name__ == "__main__":
    main()
