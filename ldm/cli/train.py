"""Train a CatVersion concept on frozen Stable Diffusion v1.x, with the flags of the LDM / Textual Inversion code bases.

    python main.py --base configs/stable-diffusion/v1-finetune.yaml -t --actual_resume models/sd/v1-5.ckpt \\
        -n teddybear --gpus 0, --data_root data/teddybear --init_word teddybear
"""
import argparse
import datetime
import glob
import logging
import os
import shutil
import sys

from omegaconf import OmegaConf

from ldm.callbacks import (AdapterCheckpoint, AdapterSummary, ContinuingCSVLogger, StepProgressBar, TrainingGuard,
                           quiet_lightning)
from ldm.config import _one_line, hardware, load_config
from ldm.files import new_folder
from ldm.util import HelpFormatter, instantiate_from_config, one_line_errors

# Rank zero's run folder, for the processes Lightning's DDP launcher starts by running the same command again (under
# SLURM, export it in the job script so that every node names the same folder).
RUN_DIR_ENV = "CATVERSION_RUN_DIR"
_BOOLS = dict.fromkeys(("yes", "true", "t", "y", "1"), True) | dict.fromkeys(("no", "false", "f", "n", "0"), False)


class TrainingStopped(Exception):
    """Training ended early but cleanly (signal, non-finite loss); carries the exit code."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def str2bool(v):
    if v.lower() not in _BOOLS:
        raise argparse.ArgumentTypeError("Boolean value expected.")
    return _BOOLS[v.lower()]


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=[],
                   help="config files, merged left to right; then `key=value` overrides from the command line")
    p.add_argument("-t", "--train", type=str2bool, const=True, default=False, nargs="?", help="train")
    p.add_argument("-n", "--name", default="", help="postfix of the run folder name")
    p.add_argument("-r", "--resume", default="", help="resume from a run folder or a checkpoint inside it")
    p.add_argument("--actual_resume", default=None, help="the base model: an SD v1.x .ckpt, .safetensors or diffusers folder")
    p.add_argument("--data_root", nargs="+", default=None,
                   help="folder with the concept's photos; several folders train several concepts in one run, each "
                        "saved in checkpoints/<folder name>/")
    p.add_argument("--init_word", nargs="+", default=None,
                   help="the concept's base class word, e.g. teddybear (the training caption); one per --data_root folder")
    p.add_argument("-l", "--logdir", default="logs", help="where run folders are made")
    p.add_argument("-s", "--seed", type=int, default=23, help="seed for everything")
    p.add_argument("--gpus", default=None, help="GPU ids as Lightning takes them: `0,` one GPU, `0,1` two; short for "
                   "lightning.trainer.accelerator=gpu lightning.trainer.devices=<ids> (set one or the other); CPU when omitted, an error where there is no such GPU")
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
                   help="scale base_lr by accumulate_grad_batches * n_devices * batch_size")
    p.add_argument("--allow_any_target", action="store_true",
                   help="let config targets name any importable class or function (only for configs you wrote)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def take_back_overrides(opt, unknown):
    """`--init_word a b key=value`: nargs="+" swallows the `key=value` overrides after the last word or folder; give
    them back (so a folder or word given there cannot contain `=`)."""
    for name in ("data_root", "init_word"):
        values = getattr(opt, name) or []
        unknown = [v for v in values if "=" in v] + list(unknown)
        setattr(opt, name, [v for v in values if "=" not in v] or None)
    return unknown


def learning_rate(config, trainer_config, ngpu, scale_lr=True):
    """The reference's rule: base_lr times the number of images per optimizer step; returns (lr, printed line).
    `ngpu` counts processes on all nodes, each with its own batch (the reference counted one node's GPUs)."""
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
        return os.path.dirname(os.path.dirname(os.path.abspath(opt.resume))), opt.resume
    ckpt = os.path.join(opt.resume, "checkpoints", "last.ckpt")
    if not os.path.isfile(ckpt):
        raise ValueError(f"cannot resume: {ckpt} not found; the run saved no checkpoint yet, start it again without --resume")
    return opt.resume.rstrip("/"), ckpt


def check_resumable(path):
    """Read the resumable checkpoint ourselves first: Lightning would fail on a bad one with a bare traceback."""
    from ldm.weights import WeightsError, check_finite, load

    fix = "pass an earlier checkpoints/*.ckpt of the run to --resume, or start again without it"
    try:
        # Lightning's own bookkeeping may hold infinities (an unset best score), so only the numbers the run
        # trains are checked for finiteness: the adapter and the optimizer's state.
        state = load(path, fix=fix, finite=False)
        if isinstance(state, dict):
            check_finite({k: state[k] for k in ("trainable", "optimizer_states") if k in state}, path)
    except WeightsError as e:
        raise WeightsError(f"cannot resume: {e}") from None
    if not isinstance(state, dict) or "global_step" not in state:
        raise WeightsError(f"cannot resume: {path} is not a checkpoint of a training run; pass a run folder under logs/")


def _build(opt, config, lightning_config, trainer_kwargs, logdir, now, extra_callbacks):
    """The Trainer (first: Lightning checks accelerator, devices and strategy), the data, the model and the run's
    saved configs; returns (trainer, data, model, guard, print on rank zero)."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger
    from pytorch_lightning.trainer.setup import _log_device_info
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from ldm.checkpoint import load_checkpoint_into

    ckptdir = os.path.join(logdir, "checkpoints")
    every = lightning_config.get("modelcheckpoint", {}).get("params", {}).get("every_n_train_steps", 250)
    adapter_checkpoint = AdapterCheckpoint(
        ckptdir, every_n_train_steps=every, base_class_word=config.data.params.train.params.get("base_class_word"))
    guard = TrainingGuard(adapter_checkpoint)
    # Reading the loss for the progress bar and the loggers waits for the GPU; every 10 steps it costs little.
    trainer_kwargs.setdefault("log_every_n_steps", 10)
    callbacks = [
        guard,  # first: it settles the last step's loss check before anything below saves
        StepProgressBar(refresh_rate=trainer_kwargs["log_every_n_steps"]),
        *([AdapterSummary()] if trainer_kwargs.pop("enable_model_summary", True) else []),  # in place of Lightning's
        # No version counter: AdapterCheckpoint has just written last.ckpt when this one saves it at the end, and a
        # stray `last-v1.ckpt` beside it would be a second "last" checkpoint.
        ModelCheckpoint(dirpath=ckptdir, filename="{epoch:06}-{step:09}", every_n_train_steps=every, save_last=True,
                        save_top_k=-1, enable_version_counter=False),
        adapter_checkpoint,
        *[instantiate_from_config(c) for c in lightning_config.get("callbacks", {}).values()],
        *extra_callbacks,
    ]
    quiet_lightning()
    # Built before the model loads: Lightning checks the accelerator, devices and strategy here. Its "GPU available"
    # lines wait until the model has loaded, so that bad input (data, checkpoint) still ends as one line on stderr.
    lightning_log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)
    try:
        trainer = pl.Trainer(
            **{"max_epochs": -1, **trainer_kwargs},
            default_root_dir=logdir,
            callbacks=callbacks,
            logger=[TensorBoardLogger(logdir, name="tensorboard", version=""), ContinuingCSVLogger(logdir, name="csv", version="")],
            enable_model_summary=False,  # AdapterSummary above replaces Lightning's, which counts no adapter
            use_distributed_sampler=False,  # the datamodule's sampler gives each process its shard (exact --resume)
        )
    except (MisconfigurationException, TypeError, ValueError) as e:
        raise ValueError(f"lightning.trainer: {_one_line(e)}") from None
    finally:
        lightning_log.setLevel(level)
    say = print if trainer.is_global_zero else (lambda *a: None)

    pl.seed_everything(opt.seed, verbose=False)
    data = instantiate_from_config(config.data)
    data.setup()  # bad data fails here, before the model costs minutes to load
    model = instantiate_from_config(config.model)
    if opt.actual_resume:
        load_checkpoint_into(model, opt.actual_resume)
    elif not opt.resume:
        say("Warning: no --actual_resume; training on a randomly initialised base model")
    _log_device_info(trainer)
    model.learning_rate, message = learning_rate(config, trainer_kwargs, trainer.world_size, opt.scale_lr)
    say(message)
    if trainer.world_size > 1:
        # DDP all-reduces the gradients of registered parameters only, and the adapter is kept out of them on purpose
        # (FrozenCLIPEmbedder): here it is registered for the run. The checkpoints hold no state_dict (LatentDiffusion).
        model.ddp_trainable = torch.nn.ParameterList(model.trainable_parameters())
        os.environ[RUN_DIR_ENV] = logdir  # for the processes Lightning starts
    if trainer.is_global_zero:
        os.makedirs(os.path.join(logdir, "configs"), exist_ok=True)
        OmegaConf.save(OmegaConf.merge(config, {"run": {"actual_resume": opt.actual_resume}}),
                       os.path.join(logdir, "configs", f"{now}-project.yaml"))
        # --gpus is kept in the run config under the reference's key (trainer.gpus), so that --resume needs no flag to use the same GPUs
        gpus = {"lightning": {"trainer": {"gpus": opt.gpus}}} if opt.gpus is not None else {}
        OmegaConf.save(OmegaConf.merge({"lightning": lightning_config}, gpus), os.path.join(logdir, "configs", f"{now}-lightning.yaml"))
    return trainer, data, model, guard, say


def run(opt, unknown, extra_callbacks=()):
    """Set up (and with -t, train) a run; returns (run folder, model)."""
    from pytorch_lightning.utilities import rank_zero_only
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from ldm.checkpoint import check_exists
    from ldm.sampling import check_output_dir

    # Everything cheap is checked first, so that a typo costs seconds, not a model load, and leaves no run folder.
    unknown = take_back_overrides(opt, unknown)
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    ckpt_path = None
    if opt.resume:
        logdir, ckpt_path = resolve_resume(opt)
        check_resumable(ckpt_path)
        opt.base = opt.base or sorted(glob.glob(os.path.join(logdir, "configs", "*.yaml")))
    else:
        if not opt.base:
            raise ValueError("no config; pass --base configs/stable-diffusion/v1-finetune.yaml (or configs/tiny/v1-finetune.yaml)")
        roots = [os.path.basename(os.path.normpath(r)) for r in opt.data_root or []]
        data_name = (roots[0] + (f"+{len(roots) - 1}more" if len(roots) > 1 else "")) if roots else ""
        logdir = os.path.join(opt.logdir, f"{data_name}{now}_{opt.name}" if opt.name else f"{data_name}{now}")
    check_output_dir(logdir, flag="-l/--logdir")
    config = load_config(opt, unknown)
    # The run's own inputs travel with its config, so that --resume needs nothing but the run folder.
    run_inputs = config.pop("run", {})
    opt.actual_resume = opt.actual_resume or run_inputs.get("actual_resume")
    if opt.actual_resume:
        check_exists(opt.actual_resume)
    lightning_config = config.pop("lightning", OmegaConf.create())
    trainer_kwargs = hardware(opt.gpus, OmegaConf.to_container(lightning_config).get("trainer", {}))
    claimed = None
    # rank_zero_only.rank is the rank a launcher set before any Trainer exists (Lightning's own for the ranks it starts,
    # torchrun, SLURM). Rank zero claims the folder: another run started in the same second may have taken the name.
    if not opt.resume:
        if os.environ.get(RUN_DIR_ENV):  # a process Lightning started for another rank: rank zero's folder
            logdir = os.environ[RUN_DIR_ENV]
        elif rank_zero_only.rank == 0:
            parent_existed = os.path.isdir(os.path.dirname(os.path.abspath(logdir)))
            logdir = claimed = new_folder(logdir.rstrip("/"))
    try:
        trainer, data, model, guard, say = _build(opt, config, lightning_config, trainer_kwargs, logdir, now,
                                                  extra_callbacks)
    except BaseException:
        if claimed:  # bad input found after the folder was claimed: leave no empty run folder behind
            shutil.rmtree(claimed if parent_existed else os.path.dirname(os.path.abspath(claimed)), ignore_errors=True)
        raise

    if opt.train:
        restore_signals = guard.install()
        try:
            trainer.fit(model, data, ckpt_path=ckpt_path, weights_only=True)
        except SIGTERMException:  # Lightning's own answer to SIGTERM, after TrainingGuard saved the step
            if guard.signal is None:
                raise
        except FloatingPointError as e:
            raise TrainingStopped(f"training stopped: {e}; the last good adapter is in {logdir}/checkpoints/adapter; "
                                  "lower model.base_learning_rate or check the images", 3) from None
        finally:
            restore_signals()
            os.environ.pop(RUN_DIR_ENV, None)
        if guard.signal is not None:
            raise TrainingStopped(f"interrupted at step {trainer.global_step}; adapter and resumable checkpoint saved "
                                  f"in {logdir}/checkpoints; continue with: python main.py --resume {logdir}",
                                  128 + guard.signal)
    say(f"Run folder: {logdir}")
    return logdir, model


def main(argv=None):
    opt, unknown = get_parser().parse_known_args(argv)
    with one_line_errors(opt.debug):
        try:
            return run(opt, unknown)
        except TrainingStopped as e:
            from pytorch_lightning.utilities import rank_zero_only

            if rank_zero_only.rank == 0:  # every rank stops the same way; one says so
                print(f"error: {e}" if e.code == 3 else str(e), file=sys.stderr)
            sys.exit(e.code)


if __name__ == "__main__":
    main()
