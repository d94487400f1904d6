#!/usr/bin/env python
"""Measure what a GPU (or a CPU) does with CatVersion: training-step variants against the reference-equivalent path
and diffusers' UNet alone, a whole 1000-step concept through main.py, 50-step sampling against diffusers' pipeline,
many concepts per step, loading each weights format.

The command's code is in ldm/cli/gpu_report.py.
"""
from ldm.cli.gpu_report import main

if __name__ == "__main__":
    main()
