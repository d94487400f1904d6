"""Shared CLI plumbing: building a model from its config and checkpoint, one-line errors, --help formatting."""
import argparse
import errno
import re
import signal
import sys
import threading
import textwrap
from contextlib import contextmanager

# Their homes are ldm.files and ldm.config; many callers import them from here.
from ldm.config import instantiate_from_config  # noqa: F401
from ldm.files import atomic_write  # noqa: F401


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
    `code`, with no traceback unless --debug asked for it. SIGXFSZ is ignored, so that a file-size limit (ulimit -f)
    fails a write with an OSError to report instead of killing the process, leaving a half-written file."""
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    except (ValueError, OSError) as e:
        if debug:
            raise
        if isinstance(e, OSError) and e.errno in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT):  # a library's write
            e = (f"cannot write {e.filename or 'an output file'} ({e.strerror}); free disk space or raise the "
                 "file-size limit (ulimit -f), or write elsewhere")
        print(f"error: {e}", file=sys.stderr)
        sys.exit(code)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every CLI's --help: each flag shows its default (unless it is None, False or empty, or its help speaks of it).
    A description or epilog paragraph with an indented line (a command, a list of files) stays as written; the others
    are re-wrapped to the terminal's width (argparse re-wraps all text into one paragraph, or wraps none)."""

    def _get_help_string(self, action):
        not_given = action.default is None or action.default is False or action.default in ("", [])
        if not_given or re.search(r"\bdefault\b", action.help or ""):  # the help says it already
            return action.help
        return super()._get_help_string(action)

    def _fill_text(self, text, width, indent):
        paragraphs = []
        for paragraph in re.split(r"\n[ \t]*\n", text.strip("\n")):
            lines = paragraph.splitlines()
            if any(line[:1].isspace() for line in lines):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(textwrap.fill(" ".join(line.strip() for line in lines), width,
                                                initial_indent=indent, subsequent_indent=indent))
        return "\n\n".join(paragraphs)


def add_sampling_args(parser):
    """The sampling flags txt2img and attention_maps share, with SD's defaults (the authors' run.sh)."""
    parser.add_argument("--ddim_steps", type=int, default=50, help="number of DDIM (or PLMS) sampling steps")
    parser.add_argument("--H", type=int, default=512, help="image height in pixels (a multiple of 8)")
    parser.add_argument("--W", type=int, default=512, help="image width in pixels (a multiple of 8)")
    parser.add_argument("--scale", type=float, default=10.0,
                        help="classifier-free guidance: eps = eps(x, empty) + scale * (eps(x, prompt) - eps(x, empty))")
    parser.add_argument("--seed", type=int, default=42,
                        help="seed of the noise x_T of the first iteration; iteration i uses seed + i")
