#!/usr/bin/env python
"""Pretrain the toy world's text-to-image model (ldm/toy/base_model.py) and write it in the SD checkpoint format.

The command's code is in ldm/cli/train_toy_base.py.
"""
from ldm.cli.train_toy_base import main

if __name__ == "__main__":
    main()
