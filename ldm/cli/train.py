"""Train a CatVersion concept on frozen Stable Diffusion v1.x, with the flags of the LDM / Textual Inversion code bases.

    python main.py --base configs/stable-diffusion/v1-finetune.yaml -t --actual_resume models/sd/v1-5.ckpt \\
        -n teddybear --gpus 0, --data_root data/teddybear --init_word teddybear
"""
import argparse
import datetime
import difflib
import glob
import inspect
import os
import sys

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.callbacks import (AdapterCheckpoint, AdapterSummary, ContinuingCSVLogger, StepProgressBar, TrainingGuard,
                           quiet_lightning)
from ldm.util import HelpFormatter, one_line_errors

LOG_EVERY_N_STEPS = 10  # when a config sets no lightning.trainer.log_every_n_steps


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
    p.add_argument("--data_root", nargs="+", default=None,
                   help="folder with the concept's photos; several folders train several concepts in one run, each "
                        "saved in checkpoints/<folder name>/")
    p.add_argument("--init_word", nargs="+", default=None,
                   help="the concept's base class word, e.g. teddybear (the training caption); one per --data_root folder")
    p.add_argument("-l", "--logdir", default="logs", help="where run folders are made")
    p.add_argument("-s", "--seed", type=int, default=23, help="seed for everything")
    p.add_argument("--gpus", default=None, help="GPU ids as Lightning takes them, e.g. `0,`; CPU when omitted")
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


def check_trainer_keys(trainer_config):
    import pytorch_lightning as pl

    accepted = inspect.signature(pl.Trainer).parameters
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
        for i, part in enumerate(parts):
            if not OmegaConf.is_dict(node) or part not in node:
                known = list(node.keys()) if OmegaConf.is_dict(node) else []
                guess = difflib.get_close_matches(part, known, n=1)
                hint = f"did you mean {'.'.join(parts[:i] + guess)}?" if guess else "check the config files"
                raise ValueError(f"unknown config key {key!r} in override {item!r}; {hint}")
            node = node[part]


def take_back_overrides(opt, unknown):
    """`--init_word a b key=value`: nargs="+" swallows the `key=value` overrides after the last word or folder; give
    them back (so a folder or word given there cannot contain `=`)."""
    for name in ("data_root", "init_word"):
        values = getattr(opt, name) or []
        unknown = [v for v in values if "=" in v] + list(unknown)
        setattr(opt, name, [v for v in values if "=" not in v] or None)
    return unknown


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
    if opt.data_root is not None:  # one concept: the plain value, as before
        train.data_root = opt.data_root[0] if len(opt.data_root) == 1 else opt.data_root
    personalization = config.model.params.get("personalization_config")
    if opt.init_word is not None:
        if personalization is not None:  # Textual Inversion: the word only starts the vector; captions keep the placeholder
            if len(opt.init_word) > 1:
                raise ValueError("Textual Inversion trains one concept per run; give one --init_word (and one --data_root)")
            personalization.params.initializer_words = [opt.init_word[0]]
        else:  # CatVersion: the word is the caption
            train.base_class_word = opt.init_word[0] if len(opt.init_word) == 1 else opt.init_word
    if OmegaConf.is_list(train.get("data_root")) and len(train.data_root) > 1:  # several concepts in one run
        from ldm.data.personalized import concept_names

        if personalization is not None:
            raise ValueError("Textual Inversion trains one concept per run; give one --data_root (and one --init_word)")
        config.model.params.concepts = concept_names(train.data_root, train.get("base_class_word"))
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


def run(opt, unknown, extra_callbacks=()):
    """Set up (and with -t, train) a run; returns (run folder, model)."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from ldm.checkpoint import check_exists, load_checkpoint_into
    from ldm.sampling import check_output_dir
    from ldm.util import instantiate_from_config

    # Everything cheap is checked first, so that a typo costs seconds, not a model load, and leaves no run folder.
    unknown = take_back_overrides(opt, unknown)
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    ckpt_path = None
    if opt.resume:
        logdir, ckpt_path = resolve_resume(opt)
        check_resumable(ckpt_path)
        if not opt.base:
            opt.base = sorted(glob.glob(os.path.join(logdir, "configs", "*.yaml")))
    else:
        if not opt.base:
            raise ValueError("no config; pass --base configs/stable-diffusion/v1-finetune.yaml (or configs/tiny/v1-finetune.yaml)")
        roots = [os.path.basename(os.path.normpath(r)) for r in opt.data_root or []]
        data_name = (roots[0] + (f"+{len(roots) - 1}more" if len(roots) > 1 else "")) if roots else ""
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
    trainer_kwargs = dict(OmegaConf.to_container(trainer_config, resolve=True))
    trainer_kwargs.pop("gpus", None)
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
    trainer = pl.Trainer(
        **{"max_epochs": -1, **trainer_kwargs},
        accelerator="gpu" if use_gpu else "cpu",
        devices=ngpu if use_gpu else 1,
        default_root_dir=logdir,
        callbacks=callbacks,
        logger=[TensorBoardLogger(logdir, name="tensorboard", version=""), ContinuingCSVLogger(logdir, name="csv", version="")],
        enable_progress_bar=True,
        enable_model_summary=False,  # AdapterSummary above replaces Lightning's, which counts no adapter
    )
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
        if guard.signal is not None:
            raise TrainingStopped(
                f"interrupted at step {trainer.global_step}; adapter and resumable checkpoint saved in {ckptdir}; "
                f"continue with: python main.py --resume {logdir}", 128 + guard.signal)
    print(f"Run folder: {logdir}")
    return logdir, model


def main(argv=None):
    opt, unknown = get_parser().parse_known_args(argv)
    with one_line_errors(opt.debug):
        try:
            return run(opt, unknown)
        except TrainingStopped as e:
            print(f"error: {e}" if e.code == 3 else str(e), file=sys.stderr)
            sys.exit(e.code)


if __name__ == "__main__":
    main()
