"""Reading and writing Stable Diffusion v1 checkpoints (CompVis key layout), strictly and safely.

Real checkpoints are `.ckpt` pickles (a `state_dict` inside, or a bare dict) or `.safetensors` files. Pickles are
only ever opened with `weights_only=True`: a checkpoint from a stranger must not be able to run code.
The text encoder's keys follow transformers 4.x (`...transformer.text_model.embeddings...`); transformers 5.x
dropped the `text_model` level, so keys are mapped on the way in and out.
"""
import hashlib
import json
import os
import pickle
import re
import zipfile

import torch

from ldm.util import atomic_write

TEXT_PREFIX = "cond_stage_model.transformer."
TEXT_4X_PREFIX = TEXT_PREFIX + "text_model."

# Present in real checkpoints but derived from the config (schedule buffers), unused (EMA weights) or
# obsolete (position ids, which transformers now rebuilds): accepted and dropped without a word.
_KNOWN_EXTRAS = re.compile(
    r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod"
    r"|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2"
    r"|logvar|lvlb_weights|model_ema\..*|.*\.position_ids|first_stage_model\.loss\..*)$"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the problem and the fix."""


def read_state_dict(path):
    """All tensors of a `.ckpt`/`.pt`/`.bin`/`.safetensors` file as a flat dict, opened without unpickling code.

    A diffusers folder (`dir` or `dir:variant`) is read through our own key mapping into the same SD layout.
    """
    from ldm.interop.diffusers_folder import parse_folder_path, read_diffusers_folder

    path = os.fspath(path)
    if parse_folder_path(path):
        return read_diffusers_folder(path)
    check_exists(path)
    try:
        if path.endswith(".safetensors"):
            return read_safetensors(path)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # a pickle carrying code; or a truncated zip, garbage bytes, a bad safetensors header, ...
        wanted = refused_pickle_reason(e)
        if wanted:
            raise CheckpointError(
                f"{path} holds pickled Python objects beyond tensors, which are refused because unpickling them could "
                f"run code ({wanted}); convert it to .safetensors with a tool you trust"
            ) from None
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(e).__name__}: {brief_error(e)}); "
            "the file is corrupt or truncated, download it again"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors; pass an SD v1.x checkpoint")
    return obj


# safetensors' dtype names.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def read_safetensors(path):
    """The tensors of a `.safetensors` file as views of one private, lazily read mapping of it: nothing is copied.

    safetensors' own `load_file` copies every tensor out of its mapping, so a 4 GB file briefly holds 8 GB of the
    process's memory; here a page is read from disk only when its tensor is used (moving the model to a GPU reads
    each once). The library still reads and checks the header; only the mapping is ours. A file whose layout we
    cannot map (an unknown dtype, an unaligned tensor) is read by the library instead."""
    from safetensors import safe_open
    from safetensors.torch import load_file

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


def check_exists(path):
    """Fail fast, before a model costs time to build, on a checkpoint path that names no file or diffusers folder."""
    from ldm.interop.diffusers_folder import parse_folder_path

    path = os.fspath(path)
    if not (os.path.isfile(path) or parse_folder_path(path)):
        raise CheckpointError(f"checkpoint not found: {path}; pass the path of an SD v1.x .ckpt or .safetensors file "
                              "or of a diffusers folder (unet/, vae/, text_encoder/)")


def refused_pickle_reason(err):
    """If `err` is `torch.load(weights_only=True)` refusing a pickle that would call code: what it would call; else None.

    torch's message spans a dozen lines with terminal colour codes; the line that matters is
    `Unsupported global: GLOBAL io.open ...`. Garbage bytes fail differently (`Unsupported operand ...`)."""
    wanted = re.search(r"Unsupported global: GLOBAL (\S+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
    return f"it would call {wanted.group(1)}" if wanted else None


def brief_error(err, limit=120):
    """The gist of an exception's message on one line, without colour codes (for torch's weights-only refusals, the
    unpickler's own complaint rather than the preamble about torch versions)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    text = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "no detail"
    return re.split(r"(?<=\.)\s", lines[0])[0][:limit]


def keys_from_sd(state_dict):
    """SD-checkpoint keys (transformers 4.x spelling) to our model's keys."""
    return {(TEXT_PREFIX + k[len(TEXT_4X_PREFIX):] if k.startswith(TEXT_4X_PREFIX) else k): v for k, v in state_dict.items()}


def keys_to_sd(state_dict):
    """Our model's keys to the SD-checkpoint spelling that every other tool reads."""
    return {(TEXT_4X_PREFIX + k[len(TEXT_PREFIX):] if k.startswith(TEXT_PREFIX) else k): v for k, v in state_dict.items()}


def _describe(keys, n=3):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def check_fits(model_state, ckpt_state, path):
    """Raise one clear CheckpointError unless `ckpt_state` has exactly the model's keys and shapes."""
    if any(k.startswith("cond_stage_model.model.") for k in ckpt_state) or any(k.startswith("conditioner.") for k in ckpt_state):
        raise CheckpointError(
            f"{path} is an SD 2.x/SDXL checkpoint (OpenCLIP text encoder); this project needs SD v1.x, e.g. v1-5-pruned-emaonly.ckpt"
        )
    if not any(k.startswith("model.diffusion_model.") for k in ckpt_state):
        raise CheckpointError(f"{path} has no `model.diffusion_model.*` keys, so it is not a Stable Diffusion v1.x checkpoint")
    missing = set(model_state) - set(ckpt_state)
    unexpected = {k for k in set(ckpt_state) - set(model_state) if not _KNOWN_EXTRAS.match(k)}
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected {_describe(unexpected)}")
        raise CheckpointError(f"{path} does not match the model config: {'; '.join(parts)}; check --config / --base")
    for k, v in model_state.items():
        if tuple(v.shape) != tuple(ckpt_state[k].shape):
            raise CheckpointError(
                f"{path}: shape mismatch for {k}: checkpoint {tuple(ckpt_state[k].shape)}, model {tuple(v.shape)}; "
                "the checkpoint was made for another model size, check --config / --base"
            )


def load_checkpoint_into(model, path, verbose=True):
    """Load an SD-format checkpoint strictly into `model` (a LatentDiffusion) and remember its fingerprint.

    The file's tensors become the model's (assigned, not copied: a `.ckpt` or `.safetensors` is mapped, so its pages
    are read only when used), cast to the model's dtype where the file holds another (e.g. fp16 weights into an
    fp32 model). The model's own initial tensors are freed, so loading never holds two copies of the weights."""
    ckpt_state = keys_from_sd(read_state_dict(path))
    model_state = model.state_dict()
    check_fits(model_state, ckpt_state, path)
    model.load_state_dict({k: ckpt_state[k].to(v.dtype) for k, v in model_state.items()}, strict=True, assign=True)
    model.base_fingerprint = fingerprint(path)
    if verbose:
        print(f"Loaded {len(model_state)} tensors from {path}")
    return model


def save_checkpoint(model, path, dtype=None, extra=None):
    """Write `model` as an SD v1 checkpoint (`.ckpt` with a `state_dict`, or `.safetensors`), atomically."""
    path = os.fspath(path)
    state = keys_to_sd({k: v.detach().cpu().to(dtype) if dtype and v.is_floating_point() else v.detach().cpu()
                        for k, v in model.state_dict().items()})
    state.update(extra or {})
    state = {k: v.contiguous() for k, v in state.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        return atomic_write(path, lambda tmp: save_file(state, tmp))
    return atomic_write(path, lambda tmp: torch.save({"state_dict": state}, tmp))


def fingerprint(path, chunk=1 << 22):
    """A cheap identity for a (multi-GB) weights file: size plus hashes of its first and last 4 MiB."""
    from ldm.interop.diffusers_folder import folder_fingerprint, parse_folder_path

    if parse_folder_path(path):
        return folder_fingerprint(path)
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read())
    return h.hexdigest()[:16]
