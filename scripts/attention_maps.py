#!/usr/bin/env python
"""Cross-attention maps of a prompt: one heat map per token, overlaid on the generated image, and automatic masks.

The command's code is in ldm/cli/attention_maps.py.
"""
from ldm.cli.attention_maps import main

if __name__ == "__main__":
    main()
