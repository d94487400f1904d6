#!/usr/bin/env python
"""Where to concatenate: train -> sample -> evaluate CatVersion variants (and the Textual Inversion baseline).

The command's code is in ldm/cli/ablation.py.
"""
from ldm.cli.ablation import main

if __name__ == "__main__":
    main()
