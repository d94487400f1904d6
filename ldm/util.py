"""Config plumbing in the CompVis style: every model is built from a `target:` path and its `params:`."""
import importlib
import sys
from contextlib import contextmanager

from omegaconf import OmegaConf

from ldm.files import atomic_write  # noqa: F401  (its home is ldm.files; many callers import it from here)


def get_obj_from_str(string, reload=False):
    module, cls = string.rsplit(".", 1)
    if reload:
        importlib.reload(importlib.import_module(module))
    return getattr(importlib.import_module(module, package=None), cls)


def instantiate_from_config(config):
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("Expected key `target` to instantiate.")
    params = config.get("params", dict())
    if OmegaConf.is_config(params):
        params = OmegaConf.to_container(params, resolve=True)
    return get_obj_from_str(config["target"])(**params)


def load_model_from_config(config, ckpt_path=None, device="cpu", verbose=True):
    """Build `config.model` and load an SD-format checkpoint into it (see `ldm.checkpoint`); eval mode."""
    from ldm.checkpoint import load_checkpoint_into

    if "model" in config:
        config = config.model
    model = instantiate_from_config(config)
    if ckpt_path is not None:
        load_checkpoint_into(model, ckpt_path, verbose=verbose)
    return model.to(device).eval()


@contextmanager
def one_line_errors(debug=False, code=2):
    """The CLIs' convention: bad input (ValueError, OSError) ends as one `error: ...` line on stderr and exit code
    `code`, with no traceback unless --debug asked for it."""
    try:
        yield
    except (ValueError, OSError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(code)


def add_sampling_args(parser):
    """The sampling flags txt2img and attention_maps share, with SD's defaults (the authors' run.sh)."""
    parser.add_argument("--ddim_steps", type=int, default=50, help="number of DDIM (or PLMS) sampling steps")
    parser.add_argument("--H", type=int, default=512, help="image height in pixels (a multiple of 8)")
    parser.add_argument("--W", type=int, default=512, help="image width in pixels (a multiple of 8)")
    parser.add_argument("--scale", type=float, default=10.0,
                        help="classifier-free guidance: eps = eps(x, empty) + scale * (eps(x, prompt) - eps(x, empty))")
    parser.add_argument("--seed", type=int, default=42,
                        help="seed of the noise x_T of the first iteration; iteration i uses seed + i")
