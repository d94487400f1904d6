#!/usr/bin/env python
"""Score generated images against reference images with CLIP: CLIP-I, CLIP-T, their geometric
mean and, when masks are given, masked CLIP-I (the concept region only).

The command's code is in ldm/cli/evaluate.py.
"""
from ldm.cli.evaluate import main

if __name__ == "__main__":
    main()
