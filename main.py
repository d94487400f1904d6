#!/usr/bin/env python
"""Train a CatVersion concept on frozen Stable Diffusion v1.x, with the flags of the LDM / Textual Inversion code bases.

    python main.py --base configs/stable-diffusion/v1-finetune.yaml -t --actual_resume models/sd/v1-5.ckpt \\
        -n teddybear --gpus 0, --data_root data/teddybear --init_word teddybear

The command's code is in ldm/cli/train.py (also the console command catversion-train). The names below stay
importable from `main`, as in the LDM code bases: reference configs name `main.DataModuleFromConfig` and
`main.ImageLogger`.
"""
from ldm.callbacks import ImageLogger  # noqa: F401
from ldm.cli.train import TrainingStopped, check_resumable, get_parser, learning_rate, main, run  # noqa: F401
from ldm.data.datamodule import DataModuleFromConfig  # noqa: F401

if __name__ == "__main__":
    main()
