#!/usr/bin/env python
"""Train a CatVersion concept on frozen Stable Diffusion v1.x, with the flags of the LDM / Textual Inversion code bases.

    python main.py --base configs/stable-diffusion/v1-finetune.yaml -t --actual_resume models/sd/v1-5.ckpt \\
        -n teddybear --gpus 0, --data_root data/teddybear --init_word teddybear
"""
import argparse
import datetime
import difflib
import glob
import os
import sys

from omegaconf import OmegaConf

from ldm.data.datamodule import DataModuleFromConfig  # noqa: F401  (reference configs name `main.DataModuleFromConfig`)
from ldm.callbacks import AdapterCheckpoint, ImageLogger, TrainingGuard  # noqa: F401  (and `main.ImageLogger`)


class TrainingStopped(Exception):
    """Training ended early but cleanly (signal, non-finite loss); carries the exit code."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError("Boolean value expected.")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=[],
                   help="config files, merged left to right; then `key=value` overrides from the command line")
    p.add_argument("-t", "--train", type=str2bool, const=True, default=False, nargs="?", help="train")
    p.add_argument("-n", "--name", default="", help="postfix of the run folder name")
    p.add_argument("-r", "--resume", default="", help="resume from a run folder or a checkpoint inside it")
    p.add_argument("--actual_resume", default=None, help="the base model: an SD v1.x .ckpt or .safetensors")
    p.add_argument("--data_root", default=None, help="folder with the concept's photos")
    p.add_argument("--init_word", default=None, help="the concept's base class word, e.g. teddybear (the training caption)")
    p.add_argument("-l", "--logdir", default="logs", help="where run folders are made")
    p.add_argument("-s", "--seed", type=int, default=23, help="seed for everything")
    p.add_argument("--gpus", default=None, help="GPU ids as Lightning takes them, e.g. `0,`; CPU when omitted")
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
                   help="scale base_lr by accumulate_grad_batches * n_devices * batch_size")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def check_overrides(config, dotlist):
    """A typo in `key=value` must not silently add a key that nothing reads."""
    for item in dotlist:
        if "=" not in item:
            raise ValueError(f"cannot parse argument {item!r}; overrides look like lightning.trainer.max_steps=20")
        key = item.split("=", 1)[0]
        node, parts = config, key.split(".")
        for i, part in enumerate(parts):
            if not OmegaConf.is_dict(node) or part not in node:
                known = list(node.keys()) if OmegaConf.is_dict(node) else []
                guess = difflib.get_close_matches(part, known, n=1)
                hint = f"did you mean {'.'.join(parts[:i] + guess)}?" if guess else "check the config files"
                raise ValueError(f"unknown config key {key!r} in override {item!r}; {hint}")
            node = node[part]


def load_config(opt, unknown):
    configs = [OmegaConf.load(c) for c in opt.base]
    config = OmegaConf.merge(*configs)
    check_overrides(config, unknown)
    config = OmegaConf.merge(config, OmegaConf.from_dotlist(unknown))
    train = config.data.params.train.params
    if opt.data_root is not None:
        train.data_root = opt.data_root
    if opt.init_word is not None:
        train.base_class_word = opt.init_word
    return config


def learning_rate(config, trainer_config, ngpu, scale_lr=True):
    """The reference's rule: base_lr times the number of images per optimizer step; returns (lr, printed line)."""
    bs, base_lr = config.data.params.batch_size, config.model.base_learning_rate
    accumulate = trainer_config.get("accumulate_grad_batches", 1)
    if not scale_lr:
        return base_lr, f"++++ NOT USING LR SCALING ++++\nSetting learning rate to {base_lr:.2e}"
    lr = accumulate * ngpu * bs * base_lr
    return lr, (f"Setting learning rate to {lr:.2e} = {accumulate} (accumulate_grad_batches) * {ngpu} (num_gpus) * "
                f"{bs} (batchsize) * {base_lr:.2e} (base_lr)")


def resolve_resume(opt):
    """(run folder, checkpoint path) for --resume given a folder or a file inside it."""
    if not os.path.exists(opt.resume):
        raise ValueError(f"cannot resume: {opt.resume} does not exist; pass a run folder under {opt.logdir}/")
    if os.path.isfile(opt.resume):
        logdir = os.path.dirname(os.path.dirname(os.path.abspath(opt.resume)))
        return logdir, opt.resume
    ckpt = os.path.join(opt.resume, "checkpoints", "last.ckpt")
    if not os.path.isfile(ckpt):
        raise ValueError(f"cannot resume: {ckpt} not found; the run saved no checkpoint yet, start it again without --resume")
    return opt.resume.rstrip("/"), ckpt


def run(opt, unknown, extra_callbacks=()):
    """Set up (and with -t, train) a run; returns (run folder, model)."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    from ldm.checkpoint import load_checkpoint_into
    from ldm.util import instantiate_from_config

    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    ckpt_path = None
    if opt.resume:
        logdir, ckpt_path = resolve_resume(opt)
        if not opt.base:
            opt.base = sorted(glob.glob(os.path.join(logdir, "configs", "*.yaml")))
    else:
        if not opt.base:
            raise ValueError("no config; pass --base configs/stable-diffusion/v1-finetune.yaml (or configs/tiny/v1-finetune.yaml)")
        data_name = os.path.basename(os.path.normpath(opt.data_root)) if opt.data_root else ""
        logdir = os.path.join(opt.logdir, f"{data_name}{now}_{opt.name}" if opt.name else f"{data_name}{now}")
    config = load_config(opt, unknown)
    # The run's own inputs travel with its config, so that --resume needs nothing but the run folder.
    run_config = config.pop("run", OmegaConf.create())
    opt.actual_resume = opt.actual_resume or run_config.get("actual_resume")
    lightning_config = config.pop("lightning", OmegaConf.create())
    trainer_config = lightning_config.get("trainer", OmegaConf.create())
    ckptdir = os.path.join(logdir, "checkpoints")

    pl.seed_everything(opt.seed, verbose=False)
    data = instantiate_from_config(config.data)
    data.setup()  # bad data fails here, before the model costs minutes to load
    model = instantiate_from_config(config.model)
    if opt.actual_resume:
        load_checkpoint_into(model, opt.actual_resume)
    elif not opt.resume:
        print("Warning: no --actual_resume; training on a randomly initialised base model")

    use_gpu = opt.gpus is not None and torch.cuda.is_available()
    ngpu = len([g for g in str(opt.gpus).strip(",").split(",") if g.strip()]) if use_gpu else 1
    model.learning_rate, message = learning_rate(config, trainer_config, ngpu, opt.scale_lr)
    print(message)

    os.makedirs(os.path.join(logdir, "configs"), exist_ok=True)
    project = OmegaConf.merge(config, {"run": {"actual_resume": opt.actual_resume}})
    OmegaConf.save(project, os.path.join(logdir, "configs", f"{now}-project.yaml"))
    OmegaConf.save(OmegaConf.create({"lightning": lightning_config}), os.path.join(logdir, "configs", f"{now}-lightning.yaml"))

    every = lightning_config.get("modelcheckpoint", {}).get("params", {}).get("every_n_train_steps", 250)
    adapter_checkpoint = AdapterCheckpoint(
        ckptdir, every_n_train_steps=every, base_class_word=config.data.params.train.params.get("base_class_word"))
    guard = TrainingGuard(adapter_checkpoint)
    callbacks = [
        ModelCheckpoint(dirpath=ckptdir, filename="{epoch:06}-{step:09}", every_n_train_steps=every, save_last=True, save_top_k=-1),
        adapter_checkpoint,
        guard,
    ]
    for cb_cfg in lightning_config.get("callbacks", {}).values():
        callbacks.append(instantiate_from_config(cb_cfg))
    callbacks.extend(extra_callbacks)
    trainer_kwargs = dict(OmegaConf.to_container(trainer_config, resolve=True))
    trainer_kwargs.pop("gpus", None)
    trainer = pl.Trainer(
        **{"max_epochs": -1, "log_every_n_steps": 1, **trainer_kwargs},
        accelerator="gpu" if use_gpu else "cpu",
        devices=ngpu if use_gpu else 1,
        default_root_dir=logdir,
        callbacks=callbacks,
        logger=[TensorBoardLogger(logdir, name="tensorboard", version=""), CSVLogger(logdir, name="csv", version="")],
        enable_progress_bar=True,
    )
    if opt.train:
        restore_signals = guard.install()
        try:
            trainer.fit(model, data, ckpt_path=ckpt_path)
        except FloatingPointError as e:
            raise TrainingStopped(
                f"training stopped: {e}; the last good adapter is in {os.path.join(ckptdir, 'adapter')}; "
                "lower model.base_learning_rate or check the images", 3) from None
        finally:
            restore_signals()
        if guard.signal is not None:
            raise TrainingStopped(
                f"interrupted at step {trainer.global_step}; adapter and resumable checkpoint saved in {ckptdir}; "
                f"continue with: python main.py --resume {logdir}", 128 + guard.signal)
    print(f"Run folder: {logdir}")
    return logdir, model


def main(argv=None):
    opt, unknown = get_parser().parse_known_args(argv)
    try:
        return run(opt, unknown)
    except TrainingStopped as e:
        print(f"error: {e}" if e.code == 3 else str(e), file=sys.stderr)
        sys.exit(e.code)
    except (ValueError, OSError) as e:
        if opt.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
