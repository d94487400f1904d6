#!/usr/bin/env python
"""The README's first command: teach the toy world's model (models/toy/toy-sd.ckpt, shipped) a concept it has never
seen, a circle striped purple and orange, from 5 images captioned only `circle`; then show base model vs CatVersion
on a few prompts, as a grid and as toy metrics. Runs on 2 CPU cores in about a minute; nothing is downloaded.

The command's code is in ldm/cli/demo.py.
"""
from ldm.cli.demo import main

if __name__ == "__main__":
    main()
