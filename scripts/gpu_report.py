#!/usr/bin/env python
"""Measure what a GPU (or a CPU) does with CatVersion: training, sampling, many concepts, loading.
The command's code is in ldm/cli/gpu_report.py."""
from ldm.cli.gpu_report import main

if __name__ == "__main__":
    main()
