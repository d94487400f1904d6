#!/usr/bin/env python
"""Train a CatVersion concept (the reference's main.py); the command's code is in ldm/cli/train.py.

The names below stay importable from `main`, as in the LDM code bases (whose configs name `main.ImageLogger`)."""
from ldm.callbacks import ImageLogger  # noqa: F401
from ldm.cli.train import TrainingStopped, check_resumable, get_parser, learning_rate, main, run  # noqa: F401
from ldm.data.datamodule import DataModuleFromConfig  # noqa: F401

if __name__ == "__main__":
    main()
