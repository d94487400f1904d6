#!/usr/bin/env python
"""Concepts per hour: N concepts trained in one run against N sequential one-concept runs (N = 1, 2, 4, 8).
The command's code is in ldm/cli/concepts_benchmark.py."""
from ldm.cli.concepts_benchmark import main

if __name__ == "__main__":
    main()
