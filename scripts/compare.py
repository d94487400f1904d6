#!/usr/bin/env python
"""Compare personalization methods the way papers do: methods x concepts x prompts, DINO / CLIP-I / CLIP-T, one
table. The command's code is in ldm/cli/compare.py.
"""
from ldm.cli.compare import main

if __name__ == "__main__":
    main()
