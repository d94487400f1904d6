#!/usr/bin/env python
"""The paper's comparison in miniature, on the toy world: CatVersion (layers 9-11) vs Textual Inversion vs
CatVersion on shallow layers (0-2), each trained on the demo concept with a few seeds, scored with the toy metrics.

The command's code is in ldm/cli/toy_benchmark.py.
"""
from ldm.cli.toy_benchmark import main

if __name__ == "__main__":
    main()
