#!/usr/bin/env python
"""Write a seeded, random miniature of SD v1.5 in the real SD checkpoint format (nothing is downloaded).

The command's code is in ldm/cli/make_tiny_model.py.
"""
from ldm.cli.make_tiny_model import main

if __name__ == "__main__":
    main()
