#!/usr/bin/env python
"""Draw the demo concept (a circle striped purple and orange, base class word `circle`) into a folder of photos.

The command's code is in ldm/cli/make_example_data.py.
"""
from ldm.cli.make_example_data import main

if __name__ == "__main__":
    main()
