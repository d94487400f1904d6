#!/usr/bin/env python
"""Sample Stable Diffusion v1.5 with learned CatVersion concepts (the reference's scripts/txt2img_generator.py).

The command's code is in ldm/cli/txt2img.py.
"""
from ldm.cli.txt2img import main

if __name__ == "__main__":
    main()
