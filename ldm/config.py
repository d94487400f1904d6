"""Configs in the CompVis style (`target:` + `params:`): reading, overrides, building, and the checks that run before
anything loads: every key is one that something reads, every value has the type and range its consumer takes, every
target is code we trust, and every hardware request names hardware this machine has."""
import difflib
import importlib
import inspect
import math
import os
import types
import typing
from collections.abc import Mapping

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Configs are data: a `target:` is code, so by default only classes of our package and of a few library modules whose
# constructors run nothing of the config's choosing may be built (not functions, not Lightning's CLI, not torch.hub).
TRUSTED_TARGETS = ("ldm.", "pytorch_lightning.callbacks.", "pytorch_lightning.loggers.", "lightning.pytorch.callbacks.",
                   "lightning.pytorch.loggers.", "torch.nn.", "torch.optim.")
ALLOW_ANY_TARGET = False  # set by main.py --allow_any_target, for a config the user wrote
# What our own table adds to the signatures (many constructors are not annotated): key name -> (type, low, high),
# bounds inclusive, None for none. It applies wherever the name is a key of a target's params or of the trainer.
_COUNT, _AT_LEAST_1, _FRACTION = (int, 0, None), (int, 1, None), (float, 0, 1)
TABLE = {"max_steps": (int, -1, None), "max_epochs": (int, -1, None), "min_steps": _COUNT, "min_epochs": _COUNT,
         "accumulate_grad_batches": _AT_LEAST_1, "log_every_n_steps": _AT_LEAST_1, "num_nodes": _AT_LEAST_1,
         "check_val_every_n_epoch": _AT_LEAST_1, "gradient_clip_val": (float, 0, None), "num_sanity_val_steps": (int, -1, None),
         "overfit_batches": (float, 0, None), "limit_train_batches": (float, 0, None), "limit_val_batches": (float, 0, None),
         "batch_size": _AT_LEAST_1, "num_workers": _COUNT, "repeats": _AT_LEAST_1, "size": _AT_LEAST_1, "flip_p": _FRACTION,
         "timesteps": _AT_LEAST_1, "linear_start": _FRACTION, "linear_end": _FRACTION, "batch_frequency": _COUNT,
         "max_images": _COUNT, "ddim_steps": _AT_LEAST_1, "num_tokens": _AT_LEAST_1, "every_n_train_steps": _AT_LEAST_1,
         "base_learning_rate": (float, 0, None), "scale_factor": (float, 0, None), "logit_bias": (float, None, None)}
# The Python types a YAML value may have where a parameter is annotated with a type (an int is a float, a bool is not)
_YAML_TYPES = {bool: bool, int: int, float: (int, float), str: str, list: (list, tuple), tuple: (list, tuple),
               dict: dict}
_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def get_obj_from_str(string):
    string = str(string)
    if not ALLOW_ANY_TARGET and (not string.startswith(TRUSTED_TARGETS) or string.startswith("ldm.cli.")):
        raise ValueError(f"{string!r} is not a class this project builds from configs (only ldm.*, Lightning's callbacks "
                         "and loggers, torch.nn/torch.optim); configs are data: if you wrote this one, pass "
                         "--allow_any_target")
    module, cls = string.rsplit(".", 1)
    obj = getattr(importlib.import_module(module), cls)
    if not ALLOW_ANY_TARGET and not inspect.isclass(obj):
        raise ValueError(f"{string!r} is a function, not a class; configs may only name classes unless you pass "
                         "--allow_any_target")
    return obj


def instantiate_from_config(config):
    if "target" not in config:
        raise KeyError("Expected key `target` to instantiate.")
    params = config.get("params", dict())
    if OmegaConf.is_config(params):
        params = OmegaConf.to_container(params, resolve=True)
    return get_obj_from_str(config["target"])(**params)


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
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as e:
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


def _unknown_key(key, path, accepted, why):
    """The error for config key `key` that nothing takes (`path`: its part up to the unknown name), with the closest
    key that something does take."""
    parent, _, name = path.rpartition(".")
    guess = difflib.get_close_matches(name, list(accepted), n=1)
    hint = f"did you mean {parent + '.' if parent else ''}{guess[0]}?" if guess else "check the config files"
    return ValueError(f"unknown config key {key!r} {why}; {hint}")


def _fits(value, kind, alone=True):
    """Whether a YAML value (None, bool, int, float, str, list, dict) can be passed where `kind` is annotated.

    A type YAML cannot produce (a Logger, a timedelta) annotated alone is the consumer's to judge (it may convert);
    as one alternative of a Union, the value must fit one of the others."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a, alone=False) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if kind is inspect.Parameter.empty or kind is typing.Any:
        return True
    if kind is None or kind is type(None):
        return value is None
    base = origin or kind
    if base not in _YAML_TYPES:
        return alone
    items = value if args and base in (list, tuple) and isinstance(value, (list, tuple)) else []
    return (isinstance(value, _YAML_TYPES[base]) and (base is bool or not isinstance(value, bool))
            and all(_fits(v, args[0]) for v in items))


def _expected(param, hints):
    """What a parameter takes: its annotation, or else the type of its default (None, i.e. anything, when neither)."""
    if param.name in hints:
        return hints[param.name]
    # bool before int (a bool is an int); 0 and 0.0 are both written for floats in configs
    for python_types, kind in ((bool, bool), ((int, float), float), (str, str)):
        if isinstance(param.default, python_types):
            return kind
    return inspect.Parameter.empty


def _describe(kind):
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(kind))
    if typing.get_origin(kind) is typing.Literal:
        return " or ".join(map(repr, typing.get_args(kind)))
    return _NAMES.get(kind, getattr(kind, "__name__", str(kind)))


def check_value(key, value, kind=inspect.Parameter.empty):
    """Raise one line naming `key`, `value` and what was expected unless `value` has the type `kind` and what our
    TABLE says of the key's last part (a type and a range); dicts of values are walked."""
    if isinstance(value, dict):
        for k, v in value.items():
            check_value(f"{key}.{k}", v)
    typ, low, high = TABLE.get(key.rsplit(".", 1)[-1], (inspect.Parameter.empty, None, None))
    for expected in (kind, typ if value is not None else kind):  # None: "not set", if the signature allows it
        if not _fits(value, expected):
            raise ValueError(f"config key {key} = {value!r} has the wrong type; expected {_describe(expected)}")
    if value is None or typ is inspect.Parameter.empty:
        return
    if not math.isfinite(value):
        raise ValueError(f"config key {key} = {value!r} is not a finite number; expected {_describe(typ)}")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f"between {low} and {high}" if None not in (low, high) else (
            f"at least {low}" if low is not None else f"at most {high}")
        raise ValueError(f"config key {key} = {value!r} is out of range; expected {_describe(typ)} {span}")


def check_params(obj, params, where, name):
    """`params` are arguments `obj` takes, none missing, each of the type its annotation (or default) says."""
    try:
        accepted = inspect.signature(obj).parameters
    except (TypeError, ValueError):  # a builtin without one (only with --allow_any_target): its own errors will do
        return
    try:
        hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # annotations naming what cannot be imported here: types are then not checked
        hints = {}
    if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        for key in params:
            if key not in accepted:
                raise _unknown_key(f"{where}.{key}", f"{where}.{key}", accepted, f"({name} takes no {key!r})")
    for arg, p in accepted.items():
        if arg in params:
            check_value(f"{where}.{arg}", params[arg], _expected(p, hints))
        elif p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            raise ValueError(f"config key {where}.{arg} is missing; {name} needs it")


def check_targets(node, where=""):
    """Every `target:` of the config is trusted (see TRUSTED_TARGETS) and imports, and its `params:` are arguments it
    takes, of the types it takes; else a typo in a config file surfaces minutes later deep inside a constructor, or
    never. Classes that swallow unknown keyword arguments (`**ignored`, for the reference's keys) cannot be checked."""
    if OmegaConf.is_list(node):
        for i, child in enumerate(node):
            check_targets(child, f"{where}[{i}]")
        return
    if not OmegaConf.is_dict(node):
        return
    if "target" in node:
        try:
            obj = get_obj_from_str(node.target)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"config {where}.target {node.target!r} cannot be imported ({_one_line(e)}); check its spelling") from None
        except ValueError as e:
            raise ValueError(f"config {where}.target: {e}") from None
        params = OmegaConf.to_container(node.get("params") or OmegaConf.create(), resolve=True)
        check_params(obj, params, f"{where}.params", getattr(obj, "__name__", str(node.target)))
    for key, child in node.items():
        check_targets(child, f"{where}.{key}" if where else str(key))


def check_trainer_keys(trainer_config):
    """Every `lightning.trainer` key is an argument of pytorch_lightning.Trainer, of the type and range it takes."""
    import pytorch_lightning as pl

    values = {k: v for k, v in OmegaConf.to_container(OmegaConf.create(trainer_config), resolve=True).items() if k != "gpus"}
    check_params(pl.Trainer, values, "lightning.trainer", "pytorch_lightning.Trainer")  # `gpus`: Lightning 1.x, dropped


def check_overrides(config, dotlist):
    """A typo in `key=value` must not silently add a key that nothing reads; any Trainer argument may be added
    (`lightning.trainer.<arg>=...`, checked by check_trainer_keys)."""
    import pytorch_lightning as pl

    for item in dotlist:
        if "=" not in item:
            raise ValueError(f"cannot parse argument {item!r}; overrides look like lightning.trainer.max_steps=20")
        key = item.split("=", 1)[0]
        parts, node, start = key.split("."), config, 0
        if parts[:2] == ["lightning", "trainer"] and len(parts) == 3:
            node, start = dict.fromkeys(inspect.signature(pl.Trainer).parameters), 2
        for i, part in enumerate(parts[start:], start):
            known = node if isinstance(node, Mapping) else {}
            if part not in known:
                raise _unknown_key(key, ".".join(parts[:i + 1]), known, f"in override {item!r}")
            node = known[part]


def load_config(opt, unknown):
    """The merged config files and `key=value` overrides, checked: every key is one that something reads, every
    value one it takes, every target trusted (unless opt.allow_any_target)."""
    global ALLOW_ANY_TARGET
    ALLOW_ANY_TARGET = bool(getattr(opt, "allow_any_target", False))
    config = OmegaConf.merge(*[read_config_file(c) for c in opt.base])
    check_overrides(config, unknown)
    config = OmegaConf.merge(config, *[parse_override(item) for item in unknown])
    try:
        OmegaConf.resolve(config)
    except OmegaConfBaseException as e:
        raise ValueError(f"config: {_one_line(e)}; check the ${{...}} interpolations") from None
    check_targets(config)
    check_trainer_keys(config.get("lightning", {}).get("trainer", {}))
    if "base_learning_rate" in config.get("model", {}):
        check_value("model.base_learning_rate", config.model.base_learning_rate, float)
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


# --- hardware ---------------------------------------------------------------------------------------------------------
def _cuda_count():
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def machine():
    """What this machine offers, in words, for error messages."""
    n = _cuda_count()
    return f"this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})" if n else "this machine has no CUDA device"


def resolve_device(name, flag="--device"):
    """The torch.device `name` names, if this machine has it; else one line saying what it has and what to pass."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{flag} {name!r} is not a torch device; pass cpu or cuda (or cuda:N)") from None
    if device.type == "cuda" and (device.index or 0) >= _cuda_count():
        raise ValueError(f"{flag} {name}: {machine()}; pass {'cuda:0' if _cuda_count() else 'cpu'}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {name}: MPS is not available here; pass cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{flag} {name}: this project runs on cpu or cuda; pass one of them")
    return device


def hardware(gpus, trainer_kwargs):
    """The Trainer's arguments with `accelerator` and `devices` from --gpus (the reference's flag, also read from its
    `trainer.gpus` key; the flag wins) or from lightning.trainer, not both; refusing what this machine lacks.

    `--gpus` without CUDA is an error, not a silent CPU run: SD v1.5 on a CPU takes minutes per step, so a run the
    user meant for a GPU would look hung."""
    from pytorch_lightning.accelerators import AcceleratorRegistry

    config_gpus = trainer_kwargs.pop("gpus", None)
    gpus = config_gpus if gpus is None else gpus
    if gpus is not None:
        if "devices" in trainer_kwargs or trainer_kwargs.get("accelerator", "gpu") not in ("gpu", "cuda"):
            raise ValueError(f"--gpus {gpus} and lightning.trainer.devices/accelerator both choose the devices; "
                             "keep one of them")
        trainer_kwargs.update(accelerator="gpu", devices=str(gpus))
    accelerator, spec = str(trainer_kwargs.setdefault("accelerator", "cpu")), trainer_kwargs.get("devices", "auto")
    count, flag = _cuda_count(), "--gpus" if gpus is not None else "lightning.trainer.devices"
    try:  # Lightning's spelling: a count (2, -1, "auto"), or ids ("0," "0,1", [0, 1])
        if spec in ("auto", -1, "-1"):
            wanted = list(range(count))
        elif isinstance(spec, list) or "," in str(spec):
            wanted = [int(g) for g in (spec if isinstance(spec, list) else str(spec).split(",")) if str(g).strip()]
        else:
            wanted = list(range(int(spec)))
    except ValueError:
        raise ValueError(f"{flag} {spec!r} is not a GPU count or list of ids; pass e.g. --gpus 0, or --gpus 0,1") from None
    names = set(AcceleratorRegistry.available_accelerators()) | {"gpu", "auto"}
    if accelerator not in names:
        raise ValueError(f"lightning.trainer.accelerator {accelerator!r} is unknown; pass one of {', '.join(sorted(names))}")
    accelerator = ("cuda" if count else "cpu") if accelerator == "auto" else accelerator
    if accelerator not in ("cpu", "gpu", "cuda"):
        raise ValueError(f"accelerator {accelerator!r}: this project trains on cpu or cuda; pass one of them")
    if accelerator == "cpu" and isinstance(spec, int) and spec > (os.cpu_count() or 1):
        raise ValueError(f"lightning.trainer.devices={spec} asks for {spec} CPU processes, but this machine has "
                         f"{os.cpu_count()} cores; ask for at most that many")
    if accelerator != "cpu" and (not count or not wanted or max(wanted) >= count):
        what = f"GPU(s) {', '.join(map(str, wanted))}" if wanted else "a GPU"
        fix = "drop --gpus (and accelerator) to train on the CPU (fine for tiny configs; SD v1.5 takes minutes a step)" \
            if not count else f"pass GPU ids below {count}"
        raise ValueError(f"training asks for {what} but {machine()}; {fix}")
    return trainer_kwargs
