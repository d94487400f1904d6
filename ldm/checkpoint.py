"""The SD v1 checkpoint key layout (CompVis): checking a file against our model, loading it in, saving it out.

SD checkpoints spell the text encoder's keys as transformers 4.x did (`...transformer.text_model.embeddings...`);
5.x dropped the `text_model` level, so `keys_from_sd` and `keys_to_sd` are the one place that knows both spellings.
"""
import hashlib
import os
import re

import torch

from ldm.files import atomic_write
from ldm.interop.diffusers_folder import unet_to_ldm, vae_to_ldm
from ldm.weights import WeightsError, folder_files, mismatch, parse_folder_path, read_folder, read_tensors

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


class CheckpointError(WeightsError):
    """A checkpoint that does not fit the model; the message is one line naming the problem and the fix."""


def read_state_dict(path):
    """All tensors of an SD checkpoint (`.ckpt`/`.safetensors` file, or diffusers folder `dir` or `dir:variant`) as one
    flat dict in the SD checkpoint spelling, read by `ldm.weights` without unpickling code."""
    path = os.fspath(path)
    if parse_folder_path(path):
        parts = read_folder(path)
        text = {TEXT_PREFIX + k: v for k, v in parts["text_encoder"].items()}
        return keys_to_sd({**unet_to_ldm(parts["unet"]), **vae_to_ldm(parts["vae"]), **text})
    check_exists(path)
    return read_tensors(path)


def check_exists(path):
    """Fail fast, before a model costs time to build, on a checkpoint path that names no file or diffusers folder."""
    path = os.fspath(path)
    if not (os.path.isfile(path) or parse_folder_path(path)):
        raise CheckpointError(f"checkpoint not found: {path}; pass the path of an SD v1.x .ckpt or .safetensors file "
                              "or of a diffusers folder (unet/, vae/, text_encoder/)")


def keys_from_sd(state_dict):
    """SD-checkpoint keys (transformers 4.x spelling; 5.x passes through) to our model's keys."""
    return {(TEXT_PREFIX + k[len(TEXT_4X_PREFIX):] if k.startswith(TEXT_4X_PREFIX) else k): v
            for k, v in state_dict.items()}


def keys_to_sd(state_dict):
    """Our model's keys (SD-spelled ones are left as they are) to the SD-checkpoint spelling other tools read."""
    return {(TEXT_4X_PREFIX + k[len(TEXT_PREFIX):] if k.startswith(TEXT_PREFIX) else k): v
            for k, v in keys_from_sd(state_dict).items()}


def check_fits(model_state, ckpt_state, path):
    """Raise one clear CheckpointError unless `ckpt_state` has exactly the model's keys and shapes."""
    if any(k.startswith(("cond_stage_model.model.", "conditioner.")) for k in ckpt_state):
        raise CheckpointError(f"{path} is an SD 2.x/SDXL checkpoint (OpenCLIP text encoder); this project needs SD "
                              "v1.x, e.g. v1-5-pruned-emaonly.ckpt")
    if not any(k.startswith("model.diffusion_model.") for k in ckpt_state):
        raise CheckpointError(f"{path} has no `model.diffusion_model.*` keys, so it is not a Stable Diffusion v1.x "
                              "checkpoint")
    problem = mismatch(model_state, ckpt_state, _KNOWN_EXTRAS.match)
    if problem:
        raise CheckpointError(f"{path} does not match the model config: {problem}; the checkpoint was made for "
                              "another model size or config, check --config / --base")


def load_checkpoint_into(model, path, verbose=True):
    """Load an SD-format checkpoint strictly into `model` (a LatentDiffusion) and remember its fingerprint.

    The file's (mapped) tensors are assigned, not copied, cast to the model's dtype where the file holds another: the
    model's initial tensors are freed, so loading never holds two copies of the weights."""
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
    state = {k: v.contiguous() for k, v in {**state, **(extra or {})}.items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        return atomic_write(path, lambda tmp: save_file(state, tmp))
    return atomic_write(path, lambda tmp: torch.save({"state_dict": state}, tmp))


def fingerprint(path, chunk=1 << 22):
    """A cheap identity for a (multi-GB) weights file: size plus hashes of its first and last 4 MiB."""
    if parse_folder_path(path):  # a diffusers folder (and variant): the fingerprints of its files, combined
        files = [f for fs in folder_files(path).values() for f in fs]
        return hashlib.sha256(" ".join(fingerprint(f) for f in files).encode()).hexdigest()[:16]
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read())
    return h.hexdigest()[:16]
