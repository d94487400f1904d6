"""Train a CatVersion concept on frozen Stable Diffusion v1.x, with the flags of the LDM / Textual Inversion code bases.

    python main.py --base configs/stable-diffusion/v1-finetune.yaml -t --actual_resume models/sd/v1-5.ckpt \\
        -n teddybear --gpus 0, --data_root data/teddybear --init_word teddybear
"""
import argparse
import datetime
import difflib
import glob
import inspect
import logging
import os
import sys

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.callbacks import (AdapterCheckpoint, AdapterSummary, ContinuingCSVLogger, StepProgressBar, TrainingGuard,
                           quiet_lightning)
from ldm.util import HelpFormatter, one_line_errors

LOG_EVERY_N_STEPS = 10  # when a config sets no lightning.trainer.log_every_n_steps
# The run folder's time stamp, handed to the other processes of a multi-process run so that all name the same folder
# (Lightning's DDP launcher starts them by running the same command again; under SLURM export it in the job script).
RUN_TIME_ENV = "CATVERSION_RUN_TIME"


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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=[],
                   help="config files, merged left to right; then `key=value` overrides from the command line")
    p.add_argument("-t", "--train", type=str2bool, const=True, default=False, nargs="?", help="train")
    p.add_argument("-n", "--name", default="", help="postfix of the run folder name")
    p.add_argument("-r", "--resume", default="", help="resume from a run folder or a checkpoint inside it")
    p.add_argument("--actual_resume", default=None, help="the base model: an SD v1.x .ckpt, .safetensors or diffusers folder")
    p.add_argument("--data_root", default=None, help="folder with the concept's photos")
    p.add_argument("--init_word", default=None, help="the concept's base class word, e.g. teddybear (the training caption)")
    p.add_argument("-l", "--logdir", default="logs", help="where run folders are made")
    p.add_argument("-s", "--seed", type=int, default=23, help="seed for everything")
    p.add_argument("--gpus", default=None, help="GPU ids as Lightning takes them: `0,` one GPU, `0,1` two; short for "
                   "lightning.trainer.accelerator=gpu lightning.trainer.devices=<ids> (set one or the other); CPU when omitted")
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
                   help="scale base_lr by accumulate_grad_batches * n_devices * batch_size")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _one_line(err):
    """The first line of a YAML/OmegaConf error (theirs span several lines with context we do not need)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        return f"{err.problem} at line {err.problem_mark.line + 1}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def read_config_file(path):
    if not os.path.isfile(path):
        raise ValueError(f"config file not found: {path}; pass --base configs/stable-diffusion/v1-finetune.yaml "
                         "(or configs/tiny/v1-finetune.yaml)")
    try:
        config = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ValueError(f"cannot parse config {path}: {_one_line(e)}; fix the YAML syntax") from None
    if not OmegaConf.is_dict(config):
        raise ValueError(f"config {path} is not a mapping of keys to values; start from configs/stable-diffusion/v1-finetune.yaml")
    return config


def parse_override(item):
    try:
        return OmegaConf.from_dotlist([item])
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ValueError(f"cannot parse the value of override {item!r} ({_one_line(e)}); "
                         "write it as YAML, e.g. key=3, key=[1,2] or key='a:b'") from None


def _unknown_key(key, accepted, owner):
    """The error for a config key that nothing takes, with the closest key that something does take."""
    parent, _, name = key.rpartition(".")
    guess = difflib.get_close_matches(name, list(accepted), n=1)
    hint = f"did you mean {parent}.{guess[0]}?" if guess else "check the config files"
    return ValueError(f"unknown config key {key!r} ({owner} takes no {name!r}); {hint}")


def check_targets(node, where=""):
    """Every `target:` of the config imports, and its `params:` are arguments it takes.

    Otherwise a typo in a config file surfaces minutes later as a TypeError from deep inside a constructor, or not at
    all. Classes that swallow unknown keyword arguments (`**ignored`, for the reference's keys) cannot be checked."""
    from ldm.util import get_obj_from_str

    if OmegaConf.is_list(node):
        for i, child in enumerate(node):
            check_targets(child, f"{where}[{i}]")
        return
    if not OmegaConf.is_dict(node):
        return
    if "target" in node:
        try:
            obj = get_obj_from_str(str(node.target))
        except (ImportError, AttributeError, ValueError) as e:
            raise ValueError(f"config {where}.target {node.target!r} cannot be imported ({_one_line(e)}); check its spelling") from None
        params = node.get("params") or {}
        accepted = inspect.signature(obj).parameters
        name = getattr(obj, "__name__", str(node.target))
        if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
            for key in params:
                if key not in accepted:
                    raise _unknown_key(f"{where}.params.{key}", accepted, name)
        for arg, p in accepted.items():
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and arg not in params:
                raise ValueError(f"config key {where}.params.{arg} is missing; {name} needs it")
    for key, child in node.items():
        check_targets(child, f"{where}.{key}" if where else str(key))


def _trainer_args():
    import pytorch_lightning as pl

    return inspect.signature(pl.Trainer).parameters


def check_trainer_keys(trainer_config):
    accepted = _trainer_args()
    for key in trainer_config:
        if key != "gpus" and key not in accepted:  # `gpus` is the reference's Lightning 1.x spelling, dropped in run()
            raise _unknown_key(f"lightning.trainer.{key}", accepted, "pytorch_lightning.Trainer")


def check_overrides(config, dotlist):
    """A typo in `key=value` must not silently add a key that nothing reads."""
    for item in dotlist:
        if "=" not in item:
            raise ValueError(f"cannot parse argument {item!r}; overrides look like lightning.trainer.max_steps=20")
        key = item.split("=", 1)[0]
        node, parts = config, key.split(".")
        if parts[:2] == ["lightning", "trainer"] and len(parts) == 3 and parts[2] in _trainer_args():
            continue  # any Trainer argument may be set (issue 18); TODO(integrator): ldm/config.py does this in general
        for i, part in enumerate(parts):
            if not OmegaConf.is_dict(node) or part not in node:
                known = list(node.keys()) if OmegaConf.is_dict(node) else []
                guess = difflib.get_close_matches(part, known, n=1)
                hint = f"did you mean {'.'.join(parts[:i] + guess)}?" if guess else "check the config files"
                raise ValueError(f"unknown config key {key!r} in override {item!r}; {hint}")
            node = node[part]


def load_config(opt, unknown):
    """The merged config files and `key=value` overrides, checked: every key is one that something reads."""
    config = OmegaConf.merge(*[read_config_file(c) for c in opt.base])
    check_overrides(config, unknown)
    config = OmegaConf.merge(config, *[parse_override(item) for item in unknown])
    try:
        OmegaConf.resolve(config)
    except OmegaConfBaseException as e:
        raise ValueError(f"config: {_one_line(e)}; check the ${{...}} interpolations") from None
    check_targets(config)
    check_trainer_keys(config.get("lightning", {}).get("trainer", {}))
    train = config.data.params.train.params
    if opt.data_root is not None:
        train.data_root = opt.data_root
    if opt.init_word is not None:
        personalization = config.model.params.get("personalization_config")
        if personalization is not None:  # Textual Inversion: the word only starts the vector; captions keep the placeholder
            personalization.params.initializer_words = [opt.init_word]
        else:  # CatVersion: the word is the caption
            train.base_class_word = opt.init_word
    return config


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
        logdir = os.path.dirname(os.path.dirname(os.path.abspath(opt.resume)))
        return logdir, opt.resume
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


def hardware(opt, trainer_kwargs):
    """Lightning's accelerator and devices from --gpus (the reference's flag) or from lightning.trainer, not both."""
    gpus = trainer_kwargs.pop("gpus", None)  # the reference's config key, read as --gpus; the flag wins
    gpus = gpus if opt.gpus is None else opt.gpus
    if gpus is not None:
        import torch

        if "devices" in trainer_kwargs or trainer_kwargs.get("accelerator", "gpu") not in ("gpu", "cuda"):
            raise ValueError(f"--gpus {gpus} and lightning.trainer.devices/accelerator both choose the devices; "
                             "keep one of them")
        if not torch.cuda.is_available():
            raise ValueError(f"--gpus {gpus} asks for CUDA GPUs, but torch finds none here; leave out --gpus to train "
                             "on the CPU")
        trainer_kwargs.update(accelerator="gpu", devices=str(gpus))
    trainer_kwargs.setdefault("accelerator", "cpu")
    devices = trainer_kwargs.get("devices")
    if trainer_kwargs["accelerator"] == "cpu" and isinstance(devices, int) and devices > (os.cpu_count() or 1):
        raise ValueError(f"lightning.trainer.devices={devices} asks for {devices} CPU processes, but this machine has "
                         f"{os.cpu_count()} cores; ask for at most that many")
    return trainer_kwargs


def run(opt, unknown, extra_callbacks=()):
    """Set up (and with -t, train) a run; returns (run folder, model)."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger
    from pytorch_lightning.trainer.setup import _log_device_info
    from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException

    from ldm.checkpoint import check_exists, load_checkpoint_into
    from ldm.sampling import check_output_dir
    from ldm.util import instantiate_from_config

    # Everything cheap is checked first, so that a typo costs seconds, not a model load, and leaves no run folder.
    now = os.environ.get(RUN_TIME_ENV) or datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    ckpt_path = None
    if opt.resume:
        logdir, ckpt_path = resolve_resume(opt)
        check_resumable(ckpt_path)
        if not opt.base:
            opt.base = sorted(glob.glob(os.path.join(logdir, "configs", "*.yaml")))
    else:
        if not opt.base:
            raise ValueError("no config; pass --base configs/stable-diffusion/v1-finetune.yaml (or configs/tiny/v1-finetune.yaml)")
        data_name = os.path.basename(os.path.normpath(opt.data_root)) if opt.data_root else ""
        logdir = os.path.join(opt.logdir, f"{data_name}{now}_{opt.name}" if opt.name else f"{data_name}{now}")
    check_output_dir(logdir, flag="-l/--logdir")
    config = load_config(opt, unknown)
    # The run's own inputs travel with its config, so that --resume needs nothing but the run folder.
    run_config = config.pop("run", OmegaConf.create())
    opt.actual_resume = opt.actual_resume or run_config.get("actual_resume")
    if opt.actual_resume:
        check_exists(opt.actual_resume)
    lightning_config = config.pop("lightning", OmegaConf.create())
    trainer_config = lightning_config.get("trainer", OmegaConf.create())
    ckptdir = os.path.join(logdir, "checkpoints")
    trainer_kwargs = hardware(opt, dict(OmegaConf.to_container(trainer_config, resolve=True)))

    every = lightning_config.get("modelcheckpoint", {}).get("params", {}).get("every_n_train_steps", 250)
    adapter_checkpoint = AdapterCheckpoint(
        ckptdir, every_n_train_steps=every, base_class_word=config.data.params.train.params.get("base_class_word"))
    guard = TrainingGuard(adapter_checkpoint)
    # Reading the loss for the progress bar and the loggers waits for the GPU; every 10 steps it costs little.
    trainer_kwargs.setdefault("log_every_n_steps", LOG_EVERY_N_STEPS)
    callbacks = [
        guard,  # first: it settles the last step's loss check before anything below saves
        StepProgressBar(refresh_rate=trainer_kwargs["log_every_n_steps"]),
        *([AdapterSummary()] if trainer_kwargs.pop("enable_model_summary", True) else []),  # in place of Lightning's
        # No version counter: AdapterCheckpoint has just written last.ckpt when this one saves it at the end, and a
        # stray `last-v1.ckpt` beside it would be a second "last" checkpoint.
        ModelCheckpoint(dirpath=ckptdir, filename="{epoch:06}-{step:09}", every_n_train_steps=every, save_last=True,
                        save_top_k=-1, enable_version_counter=False),
        adapter_checkpoint,
    ]
    quiet_lightning()
    for cb_cfg in lightning_config.get("callbacks", {}).values():
        callbacks.append(instantiate_from_config(cb_cfg))
    callbacks.extend(extra_callbacks)
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
            enable_progress_bar=True,
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
    model.learning_rate, message = learning_rate(config, trainer_config, trainer.world_size, opt.scale_lr)
    say(message)
    if trainer.world_size > 1:
        # DDP all-reduces the gradients of registered parameters only, and the adapter is kept out of them on purpose
        # (FrozenCLIPEmbedder): here it is registered for the run. The checkpoints hold no state_dict (LatentDiffusion).
        model.ddp_trainable = torch.nn.ParameterList(model.trainable_parameters())
        os.environ[RUN_TIME_ENV] = now  # for the processes Lightning starts

    if trainer.is_global_zero:
        os.makedirs(os.path.join(logdir, "configs"), exist_ok=True)
        project = OmegaConf.merge(config, {"run": {"actual_resume": opt.actual_resume}})
        OmegaConf.save(project, os.path.join(logdir, "configs", f"{now}-project.yaml"))
        # --gpus is kept as the reference keeps it (trainer.gpus), so that --resume needs no flag to use the same GPUs
        gpus = {"lightning": {"trainer": {"gpus": opt.gpus}}} if opt.gpus is not None else {}
        OmegaConf.save(OmegaConf.merge({"lightning": lightning_config}, gpus), os.path.join(logdir, "configs", f"{now}-lightning.yaml"))
    if opt.train:
        restore_signals = guard.install()
        try:
            trainer.fit(model, data, ckpt_path=ckpt_path, weights_only=True)
        except SIGTERMException:  # Lightning's own answer to SIGTERM, after TrainingGuard saved the step
            if guard.signal is None:
                raise
        except FloatingPointError as e:
            raise TrainingStopped(
                f"training stopped: {e}; the last good adapter is in {os.path.join(ckptdir, 'adapter')}; "
                "lower model.base_learning_rate or check the images", 3) from None
        finally:
            restore_signals()
            os.environ.pop(RUN_TIME_ENV, None)
        if guard.signal is not None:
            raise TrainingStopped(
                f"interrupted at step {trainer.global_step}; adapter and resumable checkpoint saved in {ckptdir}; "
                f"continue with: python main.py --resume {logdir}", 128 + guard.signal)
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
