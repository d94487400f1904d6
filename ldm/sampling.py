"""Text-to-image sampling with CatVersion adapters, after the authors' `scripts/txt2img_generator.py`: loading SD plus
adapters, the cached unconditional embedding, prompt-to-file naming, option checks, and `generate()`. What is kept
from their sampler and what differs (x_T drawn on the CPU, the unconditional embedding computed, PNG files, seed 42)
is in docs/fidelity.md, rows 48-61; `scripts/txt2img.py --authors` switches the differences back.
"""
import hashlib
import os
import re
import warnings
from dataclasses import dataclass, fields

import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision.utils import make_grid

from ldm.checkpoint import CheckpointError
from ldm.files import atomic_write
from ldm.models.diffusion.ddim import DDIMSampler, ddim_timesteps
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.encoders.modules import AUTHORS_WEIGHTS, OUR_WEIGHTS
from ldm.util import load_model_from_config
from ldm.weights import load, parse_folder_path, read_metadata

UC_DIR = "models/uc"
LATENT_FACTOR = 8  # the SD v1 VAE (and the tiny one) halves the resolution three times
WEIGHT_FILES = (OUR_WEIGHTS, AUTHORS_WEIGHTS)
MAX_NAME_BYTES = 100  # file-name stems stay far below the usual 255-byte limit, room left for `_<seed>_<k>.png`


def prompt_to_name(prompt):
    """A file-system-safe stem for `prompt`: each whitespace character -> `-` (the authors replace spaces only),
    `/ \\ : * ? " < > |` and control characters dropped (the authors keep them), no leading/trailing dots. A longer
    name is cut at MAX_NAME_BYTES of UTF-8 and ends in 8 hex digits of the prompt's SHA-1: long prompts keep apart."""
    digest = hashlib.sha1(prompt.encode()).hexdigest()[:8]
    if not prompt.strip():
        return "empty-prompt"
    name = re.sub(r'[/\\:*?"<>|\x00-\x1f\x7f]', "", re.sub(r"\s", "-", prompt)).strip(".")
    if not name:
        return "prompt-" + digest
    if len(name.encode()) > MAX_NAME_BYTES:
        head = name.encode()[: MAX_NAME_BYTES - 9].decode("utf-8", "ignore").rstrip(".")
        name = f"{head}-{digest}"
    return name


def prompt_names(prompts):
    """{prompt: stem}; refuses two different prompts that would write into the same folder."""
    names, owners = {}, {}
    for prompt in prompts:
        name = names[prompt] = prompt_to_name(prompt)
        if owners.setdefault(name, prompt) != prompt:
            raise ValueError(f"prompts {owners[name]!r} and {prompt!r} both map to the folder name {name!r}; "
                             "reword one of them")
    return names


def check_non_negative(flag, value, hint):
    if not 0 <= value < float("inf"):  # NaN fails too
        raise ValueError(f"{flag} {value} must be a finite number >= 0 ({hint})")


@dataclass(frozen=True)
class SamplingOptions:
    """The sampler's options, named after the reference's txt2img flags; iteration i of a prompt uses seed `seed + i`,
    x_T is drawn on `noise_device` (see `sample_images`)."""

    H: int = 512
    W: int = 512
    ddim_steps: int = 50
    scale: float = 10.0
    ddim_eta: float = 0.0
    plms: bool = False
    n_samples: int = 1
    n_iter: int = 1
    seed: int = 42
    noise_device: str = "cpu"

    @classmethod
    def from_args(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def check(self, num_timesteps=1000):
        """One ValueError naming the first bad option's flag and the fix; run before anything is loaded or written."""
        for flag, value in (("--H", self.H), ("--W", self.W)):
            if value < LATENT_FACTOR or value % LATENT_FACTOR:
                near = max(LATENT_FACTOR, value // LATENT_FACTOR * LATENT_FACTOR)
                raise ValueError(f"{flag} {value} must be a positive multiple of {LATENT_FACTOR} (the VAE works on "
                                 f"{LATENT_FACTOR}x{LATENT_FACTOR} pixel blocks); try {near}")
        check_non_negative("--scale", self.scale, "1 = no guidance, the reference uses 10")
        check_non_negative("--ddim_eta", self.ddim_eta, "0 = deterministic DDIM")
        for flag, least in (("n_samples", 1), ("n_iter", 1), ("ddim_steps", 1), ("seed", 0)):
            if getattr(self, flag) < least:
                raise ValueError(f"--{flag} {getattr(self, flag)} must be at least {least}")
        if self.plms and self.ddim_eta != 0:
            raise ValueError(f"--plms is deterministic and takes no --ddim_eta (got {self.ddim_eta}); "
                             "drop --ddim_eta or --plms")
        try:
            ddim_timesteps(self.ddim_steps, num_timesteps)
        except ValueError as e:
            raise ValueError(f"--ddim_steps {self.ddim_steps}: {e}") from None
        return self

    def sample(self, model, cond, uc, seed, progress=True):
        return sample_images(model, cond, uc, seed, self.H, self.W, self.ddim_steps, self.scale, self.ddim_eta,
                             self.plms, progress, self.noise_device)


def check_output_dir(path, flag="--outdir"):
    """Refuse an output folder that cannot be created or written, before any work is done; `flag` names the option."""
    path = os.path.abspath(path)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not (os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK)):
        problem = "is not writable" if os.path.isdir(existing) else "is a file, not a folder"
        raise ValueError(f"cannot write to output folder {path}: {existing} {problem}; pass another {flag}")


def expand_strengths(strengths, n_adapters):
    """One strength for every adapter, or one per adapter -> a list of `n_adapters` floats."""
    strengths = [float(s) for s in strengths]
    for s in strengths:
        check_non_negative("--strength", s, "0 = base model, 1 = as trained")
    if n_adapters == 0 and any(s != 1.0 for s in strengths):
        raise ValueError("--strength needs an adapter to act on; pass --embedding_path too")
    if len(strengths) == 1 or n_adapters == 0:
        return strengths[:1] * n_adapters
    if len(strengths) != n_adapters:
        raise ValueError(f"{len(strengths)} --strength values for {n_adapters} --embedding_path adapters; "
                         "give one value for all, or one per adapter in the same order")
    return strengths


def load_model(config, ckpt_path, device="cpu", embedding_paths=(), strengths=(1.0,), verbose=True):
    """LatentDiffusion from `config` (a path or an OmegaConf) and an SD checkpoint (None: seeded random weights, for
    smoke tests), in eval mode on `device`. The first CatVersion adapter replaces any of the config, the others stack
    onto it as concepts, at `strengths` (one for all or one per adapter); a `.pt` path is a Textual Inversion
    `embeddings.pt`, its manager `model.embedding_manager`."""
    from ldm.modules.embedding_manager import load_embeddings_into

    embeddings = [p for p in embedding_paths if str(p).endswith(".pt")]
    adapters = [p for p in embedding_paths if not str(p).endswith(".pt")]
    strengths = expand_strengths(strengths, len(adapters))
    for path in adapters:  # checked before the model costs time to build
        if not os.path.exists(path):
            raise ValueError(f"adapter not found: {path}; pass an adapter folder, a .safetensors or a "
                             "pytorch_adapter.bin")
        if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
            raise ValueError(f"adapter folder {path} holds neither {' nor '.join(WEIGHT_FILES)}; pass the "
                             "checkpoints/adapter (or adapter_gs-<step>) folder of a training run")
    for path in embeddings:
        if not os.path.isfile(path):
            raise ValueError(f"embeddings not found: {path}; pass the embeddings.pt of a Textual Inversion run")
    if ckpt_path is not None and not (os.path.isfile(ckpt_path) or parse_folder_path(ckpt_path)):
        raise CheckpointError(f"checkpoint not found: {ckpt_path}; pass --ckpt_path with an SD v1.x .ckpt/"
                              ".safetensors, e.g. v1-5-pruned-emaonly.ckpt from the stable-diffusion-v1-5/"
                              "stable-diffusion-v1-5 model card, saved as models/sd/v1-5.ckpt")
    if isinstance(config, (str, os.PathLike)):
        if not os.path.isfile(config):
            raise ValueError(f"config not found: {config}; pass --config configs/stable-diffusion/v1-inference.yaml")
        config = OmegaConf.load(config)
    with torch.random.fork_rng(devices=[], enabled=ckpt_path is None):
        if ckpt_path is None:
            torch.manual_seed(0)  # random weights: the same every time, and the global RNG is left alone
        model = load_model_from_config(config, ckpt_path, verbose=verbose)
    for i, (path, strength) in enumerate(zip(adapters, strengths)):
        model.cond_stage_model.adapter_load(path, strength=strength, stack=i > 0)
        meta = os.path.join(path, OUR_WEIGHTS) if os.path.isdir(path) else str(path)
        trained_on = meta.endswith(".safetensors") and os.path.isfile(meta) and read_metadata(meta).get(
            "base_fingerprint")
        if trained_on and model.base_fingerprint and trained_on != model.base_fingerprint:
            warnings.warn(f"adapter {path} was trained on base model {trained_on}, but this one is "
                          f"{model.base_fingerprint}; its concept may not come through")
    for path in embeddings:
        model.embedding_manager = load_embeddings_into(model.cond_stage_model, path)
    return model.to(device)


def _device_and_dtype(model):
    p = next(model.parameters())
    return p.device, p.dtype


@torch.no_grad()
def unconditional_embedding(model, cache_dir=UC_DIR):
    """The empty prompt encoded without adapters, (1, 77, width): the reference's `models/uc.pt`. Cached as
    `<cache_dir>/<base fingerprint>.safetensors` unless the model has no fingerprint (random weights) or `cache_dir`
    is empty; a bad cache file is recomputed and replaced, with a warning; an unwritable cache folder only warns."""
    from safetensors.torch import load_file, save_file

    encoder = model.cond_stage_model
    fingerprint = getattr(model, "base_fingerprint", None)
    path = os.path.join(cache_dir, f"{fingerprint}.safetensors") if fingerprint and cache_dir else None
    if path and os.path.exists(path):
        expected = (1, encoder.max_length, encoder.width)
        try:
            uc = load_file(path)["uc"]
            problem = None if tuple(uc.shape) == expected else f"shape {tuple(uc.shape)}, expected {expected}"
        except Exception as e:  # truncated file, garbage bytes, missing key: the cache is only a shortcut
            problem = f"unreadable: {type(e).__name__}"
        if problem is None:
            return uc.to(*_device_and_dtype(model))
        warnings.warn(f"ignoring cache {path} ({problem}); recomputing the unconditional embedding")
    with encoder.adapter_disabled():
        uc = model.get_learned_conditioning([""])
    if path:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            atomic_write(path, lambda tmp: save_file({"uc": uc.to("cpu", torch.float32).contiguous()}, tmp,
                                                      metadata={"base_fingerprint": fingerprint, "prompt": ""}))
        except OSError as e:
            warnings.warn(f"could not cache the unconditional embedding at {path} ({e}); it is recomputed next time")
    return uc


@torch.no_grad()
def sample_images(model, cond, uc, seed, H=512, W=512, ddim_steps=50, scale=10.0, ddim_eta=0.0, plms=False,
                  progress=True, noise="cpu"):
    """One iteration of the reference loop: images in [0, 1], (batch of `cond`, 3, H, W), on the CPU. `noise` "cpu"
    draws x_T with the CPU generator, the same on every device; "device" on the sampling device, as the authors do."""
    device, _ = _device_and_dtype(model)
    shape = (model.channels, H // LATENT_FACTOR, W // LATENT_FACTOR)
    torch.manual_seed(seed)
    x_T = torch.randn((cond.shape[0], *shape), device=device if noise == "device" else "cpu").to(device)
    sampler = PLMSSampler(model) if plms else DDIMSampler(model)
    z, _ = sampler.sample(S=ddim_steps, batch_size=cond.shape[0], shape=shape, conditioning=cond, x_T=x_T,
                          unconditional_guidance_scale=scale, unconditional_conditioning=uc, eta=ddim_eta,
                          verbose=progress)
    return ((model.decode_first_stage(z).float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu()


def to_uint8(images):
    """[0, 1] floats (..., 3, h, w) -> uint8 (..., h, w, 3), truncated like the reference's `astype(np.uint8)`."""
    return (255.0 * images).to(torch.uint8).movedim(-3, -1)


def save_image(array, path, jpeg=False):
    """Write an (h, w, 3) uint8 array as PNG (or JPEG at quality 75, the authors' files), atomically."""
    options = {"format": "JPEG", "quality": 75} if jpeg else {"format": "PNG"}
    return atomic_write(path, lambda tmp: Image.fromarray(array.numpy()).save(tmp, **options))


def read_uc(path, model):
    """A saved unconditional embedding such as the authors' `models/uc.pt`: one tensor (1, 77, width) or (77, width),
    read safely (no pickled code, finite), on the model's device and dtype."""
    obj = load(path)
    values = list(obj.values()) if isinstance(obj, dict) else [obj]
    uc = values[0] if len(values) == 1 and isinstance(values[0], torch.Tensor) else torch.zeros(0)
    uc = uc[None] if uc.dim() == 2 else uc
    expected = (1, model.cond_stage_model.max_length, model.cond_stage_model.width)
    if tuple(uc.shape) != expected:
        found = (f"a tensor of shape {tuple(obj.shape)}" if isinstance(obj, torch.Tensor) else
                 f"{len(obj)} entries ({', '.join(map(str, list(obj)[:3]))})" if isinstance(obj, dict) else
                 type(obj).__name__)
        raise ValueError(f"--uc_path {path} should hold one tensor of shape {expected} (the empty prompt's embedding "
                         f"for this model), found {found}; pass the uc.pt that belongs to the base model")
    return uc.to(*_device_and_dtype(model))


def generate(model, prompts, outdir="outputs/txt2img-samples", options=SamplingOptions(), uc=None, uc_dir=UC_DIR,
             progress=True, jpeg=False):
    """Sample every prompt (once, if given twice) into `<outdir>/<name>/<name>_<seed>.png` (`<name>_<seed>_<k>.png`
    for the k-th image of a batch) and a grid `<outdir>/<name>/grid.png`, one row per iteration; `jpeg` writes the
    authors' files instead, `.jpg` at quality 75 and the grid as `<name>/<name>.jpg`. `uc` defaults to
    `unconditional_embedding(model, uc_dir)`. Returns `{prompt: {"folder": ..., "images": [paths], "grid": path}}`."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    options.check(len(model.alphas_cumprod))
    check_output_dir(outdir)
    names = prompt_names(prompts)
    if uc is None and options.scale != 1.0:
        uc = unconditional_embedding(model, uc_dir)
    results = {}
    for prompt, name in names.items():
        cond = model.get_learned_conditioning(options.n_samples * [prompt])
        folder = os.path.join(outdir, name)
        os.makedirs(folder, exist_ok=True)
        paths, rows, ext = [], [], "jpg" if jpeg else "png"
        for seed in range(options.seed, options.seed + options.n_iter):
            images = options.sample(model, cond, uc, seed, progress)
            for k, image in enumerate(images):
                stem = f"{name}_{seed}" if options.n_samples == 1 else f"{name}_{seed}_{k}"
                paths.append(save_image(to_uint8(image), os.path.join(folder, f"{stem}.{ext}"), jpeg))
            rows.append(images)
        grid = make_grid(torch.cat(rows), nrow=options.n_samples)
        grid_path = os.path.join(folder, f"{name}.jpg" if jpeg else "grid.png")
        results[prompt] = {"folder": folder, "images": paths, "grid": save_image(to_uint8(grid), grid_path, jpeg)}
    return results
