#!/usr/bin/env python
"""Long runs hold: peak memory of a 1000-step tiny training run after step 100 and after step 1000.
The command's code is in ldm/cli/memory_check.py."""
from ldm.cli.memory_check import main

if __name__ == "__main__":
    main()
