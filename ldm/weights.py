"""The one reader of every weights file we load: pickles (.ckpt/.pt/.bin), .safetensors, diffusers folders.

Pickles are only ever opened with `weights_only=True`: a file from a stranger must not be able to run code. What
cannot be read ends in one `WeightsError` line naming the fix: the pickle-refusal or the corrupt-file message.
"""
import json
import os
import pickle
import re
import zipfile

import torch
from safetensors import safe_open
from safetensors.torch import load_file

COMPONENTS = ("unet", "vae", "text_encoder")
_BASE_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")
_EXTENSIONS = ("safetensors", "bin")
# `<base>.<variant>.<ext>` or a sharded variant's `<base>.<ext>.index.<variant>.json`
_VARIANT_FILE = re.compile(rf"(?:{'|'.join(_BASE_NAMES)})"
                           r"(?:\.(\w+)\.(?:safetensors|bin)|\.(?:safetensors|bin)\.index\.(\w+)\.json)")
_LAYOUT_HINT = ("a diffusers SD v1 folder holds unet/, vae/ and text_encoder/, each with "
                "diffusion_pytorch_model.safetensors (or .bin, model.safetensors, pytorch_model.bin)")


class WeightsError(ValueError):
    """A weights file that cannot be used; the message is one line naming the problem and the fix."""


def load(path, fix=None, allow=(), finite=True):
    """The object stored in a weights file, opened without running code: a `.safetensors` file's tensors, or a
    pickle's contents (memory-mapped when it is a zip, as torch writes them). `allow` names further classes the
    unpickler may build (e.g. the reference's nn.ParameterDict); `fix` replaces the fix the error messages suggest.
    With `finite`, every floating tensor must be finite; a caller whose file also holds bookkeeping checks itself."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}; pass the path of an existing file")
    try:
        if path.endswith(".safetensors"):
            obj = read_safetensors(path)
        else:
            with torch.serialization.safe_globals(list(allow)):
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # a pickle carrying code; or a truncated zip, garbage bytes, a bad safetensors header, ...
        raise _unreadable(path, e, fix) from None
    if finite:
        check_finite(obj, path)
    return obj


def check_finite(obj, path, name=""):
    """Refuse NaN or infinity in any floating tensor of `obj` (dicts and lists are walked), naming the tensor.

    A NaN in a base model or an adapter turns into black images or a NaN loss far from its cause. The check reads
    every byte once: 1.0 s for SD v1.5's 4.1 GB of fp32 weights on this project's 2-core machine, pages read."""
    if isinstance(obj, torch.Tensor):
        # min and max propagate NaN and infinity: one reduction pass, several times faster than isfinite(t).all()
        if obj.is_floating_point() and obj.numel() and not torch.isfinite(torch.stack(torch.aminmax(obj))).all():
            kind = "NaN" if bool(torch.isnan(obj).any()) else "infinite values"
            raise WeightsError(f"{path}: tensor {name or '(the file)'} holds {kind}; the file is damaged or was saved "
                               "from a run that diverged, use another copy")
    elif hasattr(obj, "items"):  # dicts, and the reference's nn.ParameterDict
        for key, value in obj.items():
            check_finite(value, path, f"{name}.{key}" if name else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_finite(value, path, f"{name}[{i}]")


def read_tensors(path, fix=None):
    """All tensors of a weights file as a flat dict (a training checkpoint's `state_dict` unwrapped)."""
    obj = load(path, fix)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} is not a state dict of tensors; pass a file saved from a model's state_dict()")
    return obj


def mismatch(expected, found, ignore=lambda key: False):
    """In words, what keeps state dict `found` from loading into a model whose state dict is `expected` ('' if it
    fits): keys missing and unexpected (those `ignore` accepts aside), and the first tensor of another shape."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(k for k in found.keys() - expected.keys() if not ignore(k))
    parts = [f"{what} {', '.join(keys[:3])}" + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")
             for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    parts += [f"shape mismatch for {k}: checkpoint {tuple(found[k].shape)}, model {tuple(v.shape)}"
              for k, v in expected.items() if k in found and v.shape != found[k].shape][:1]
    return "; ".join(parts)


def read_metadata(path):
    """The string metadata of a `.safetensors` file's header ({} if it has none)."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return f.metadata() or {}
    except Exception as e:
        raise _unreadable(path, e) from None


def _unreadable(path, err, fix=None):
    """The one pickle-refusal message, or else the one corrupt-file message, for `err` raised reading `path`.

    torch's refusal spans a dozen lines with terminal colour codes; the line that matters is `Unsupported global:
    GLOBAL io.open ...` (or, for modules torch blocks outright, `Trying to load unsupported GLOBAL posix.system`).
    Garbage bytes fail differently (`Unsupported operand ...`)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = isinstance(err, pickle.UnpicklingError) and re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", text)
    if found:
        return WeightsError(f"{path} holds pickled Python objects beyond tensors, which are refused because unpickling "
                            f"them could run code (it would call {found.group(1)}); "
                            f"{fix or 'convert it to .safetensors with a tool you trust'}")
    # the gist on one line: for torch's refusals, the unpickler's own complaint rather than the preamble
    lines = [line.strip() for line in text.split("WeightsUnpickler error:", 1)[-1].splitlines() if line.strip()]
    gist = re.split(r"(?<=\.)\s", lines[0])[0][:120] if lines else "no detail"
    return WeightsError(f"{path} is corrupt or truncated ({type(err).__name__}: {gist}); {fix or 'download it again'}")


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def read_safetensors(path):
    """The tensors of a `.safetensors` file as views of one private, lazily read mapping of it: nothing is copied.

    safetensors' own `load_file` copies every tensor out of its mapping, so a 4 GB file briefly holds 8 GB; here a
    page is read only when its tensor is used. The library still checks the header. A file whose layout we cannot
    map (an unknown dtype, an unaligned tensor) is read by the library instead."""
    with safe_open(path, framework="pt", device="cpu") as f:  # validates the header: offsets, sizes, dtypes
        keys = list(f.keys())
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=os.path.getsize(path))
    out = {}
    for key in keys:
        entry = header[key]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        start = 8 + n + entry["data_offsets"][0]
        if dtype is None or start % dtype.itemsize:
            return load_file(path, device="cpu")
        out[key] = torch.empty(0, dtype=dtype).set_(storage, start // dtype.itemsize, tuple(entry["shape"]))
    return out


# --- diffusers folders: read file by file, as tensors under diffusers' own names (ldm.interop.diffusers_folder maps
# them to ours). In each component folder, in this order of preference: diffusion_pytorch_model, model or
# pytorch_model [.<variant>], as .safetensors or .bin, single or sharded (with the .index[.<variant>].json that
# diffusers and transformers write). `folder:variant` chooses a variant; else the plain files, or the only variant.
def parse_folder_path(path):
    """`(folder, variant)` if `path` names a folder (`dir`, or `dir:variant` such as `sd-v1-5:fp16`), else None."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path, None
    head, sep, tail = path.rpartition(":")
    if sep and re.fullmatch(r"\w+", tail) and os.path.isdir(head):
        return head, tail
    return None


def folder_files(path):
    """{component: [files]} that `read_folder(path)` reads."""
    parsed = parse_folder_path(path)
    if parsed is None:
        raise WeightsError(f"diffusers folder not found: {path}; pass a folder with unet/, vae/ and text_encoder/")
    folder, variant = parsed
    if not any(os.path.isdir(os.path.join(folder, c)) for c in COMPONENTS):
        raise WeightsError(f"{folder} is a folder but not a diffusers model: no unet/, vae/ or text_encoder/ inside; "
                           "pass an SD v1.x .ckpt/.safetensors file or a diffusers folder")
    return {c: _component_files(folder, c, variant) for c in COMPONENTS}


def read_folder(path):
    """{component: its tensors under diffusers' names}, fp16/bf16 weights converted to fp32."""
    return {component: {k: v.float() if v.is_floating_point() else v for f in files for k, v in read_tensors(f).items()}
            for component, files in folder_files(path).items()}


def _component_files(folder, component, variant):
    sub = os.path.join(folder, component)
    if not os.path.isdir(sub):
        raise WeightsError(f"diffusers folder {folder} has no {component}/; {_LAYOUT_HINT}")
    names = set(os.listdir(sub))
    if variant is None and not _find_weights(sub, names, None):
        variants = sorted({m[1] or m[2] for n in names if (m := _VARIANT_FILE.fullmatch(n))})
        if len(variants) > 1:
            raise WeightsError(f"{sub} holds only variant weights ({', '.join(variants)}); "
                               f"choose one by passing {folder}:{variants[0]}")
        variant = (variants or [None])[0]
    found = _find_weights(sub, names, variant)
    if not found:
        what = f"no {variant} weights" if variant else "no weights"
        listing = ", ".join(sorted(names)[:6]) + (", ..." if len(names) > 6 else "")
        raise WeightsError(f"{sub} has {what} (found {listing or 'nothing'}); {_LAYOUT_HINT}")
    return found


def _find_weights(sub, names, variant):
    """The files of the first weights found: one file, or the shards an index names."""
    v = f".{variant}" if variant else ""
    for base in _BASE_NAMES:
        for ext in _EXTENSIONS:
            if f"{base}{v}.{ext}" in names:
                return [os.path.join(sub, f"{base}{v}.{ext}")]
            index = f"{base}.{ext}.index{v}.json"
            if index in names:
                return _shards(os.path.join(sub, index))
    return []


def _shards(index_path):
    try:
        with open(index_path, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise WeightsError(f"cannot read shard index {index_path} ({type(e).__name__}); "
                           "the folder is incomplete, download it again") from None
    paths = [os.path.join(os.path.dirname(index_path), s) for s in shards]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise WeightsError(f"{index_path} names {len(missing)} shard(s) that are not there, e.g. {missing[0]}; "
                           "the folder is incomplete, download it again")
    return paths
