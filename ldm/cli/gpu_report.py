#!/usr/bin/env python
"""Measure what a GPU (or a CPU) does with CatVersion: training-step variants against the reference-equivalent path
and diffusers' UNet alone, a whole 1000-step concept through main.py, 50-step sampling against diffusers' pipeline,
many concepts per step, loading each weights format.

    python scripts/gpu_report.py                         # SD v1.5 shapes, 512x512, batch 2, on the GPU
    python scripts/gpu_report.py --device cpu --config configs/tiny/v1-finetune.yaml --H 64 --W 64   # dry run
    python scripts/gpu_report.py --device cpu --H 256 --W 256 --threads 1 --sections training,diffusers   # SD on a CPU

Weights are random (speed does not depend on their values). Writes gpu_report.json and gpu_report.md to --out_dir,
rewritten after every section; sections that would not fit in --budget_s are skipped and say so.
"""
import argparse

from ldm.perf.gpu_report import SECTIONS, run
from ldm.util import HelpFormatter, one_line_errors


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default="configs/stable-diffusion/v1-finetune.yaml", help="finetune config (its shapes)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's). On a CPU shared with other work, 1 keeps timings stable")
    p.add_argument("--H", type=int, default=512, help="image height in pixels (a multiple of 64)")
    p.add_argument("--W", type=int, default=512, help="image width in pixels (a multiple of 64)")
    p.add_argument("--batch_size", type=int, default=2, help="images per concept per training step")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each variant's timed ones")
    p.add_argument("--concepts", type=int, nargs="+", default=[1, 4, 8], help="concepts per step to measure")
    p.add_argument("--sample_batches", type=int, nargs="+", default=[1, 4], help="sampling batch sizes")
    p.add_argument("--sample_steps", type=int, default=50, help="DDIM steps per sample")
    p.add_argument("--lightning_steps", type=int, default=200, help="steps of the main.py run")
    p.add_argument("--lightning_every", type=int, default=50, help="adapter snapshot interval of the main.py run")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help="comma-separated sections to run, in this order: " + ",".join(SECTIONS))
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile variants")
    p.add_argument("--budget_s", type=float, default=480, help="time budget; sections that would not fit are skipped")
    p.add_argument("--out_dir", default="gpu-report", help="folder for gpu_report.json and gpu_report.md")
    return p


def main(argv=None):
    opt = get_parser().parse_args(argv)
    with one_line_errors():
        return run(opt)


if __name__ == "__main__":
    main()
