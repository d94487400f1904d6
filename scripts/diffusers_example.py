#!/usr/bin/env python
"""Render a CatVersion concept with diffusers' StableDiffusionPipeline (a local SD v1.x diffusers folder).

The command's code is in ldm/cli/diffusers_example.py.
"""
from ldm.cli.diffusers_example import main

if __name__ == "__main__":
    main()
