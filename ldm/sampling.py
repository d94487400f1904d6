"""Text-to-image sampling with CatVersion adapters, after the authors' `scripts/txt2img_generator.py`.

The pieces `scripts/txt2img.py` and the demo share: loading SD plus adapters, the cached unconditional embedding,
prompt-to-file naming, argument checks, and `generate()`, which writes the images and grids.

Kept from the authors' sampler:
- seeds: `torch.manual_seed(seed)` before each iteration, `seed + 1` for the next; every prompt starts at `seed`, so
  prompts of one run share their noise;
- pixels are `uint8(255 * clamp((x + 1) / 2, 0, 1))`, truncated as their numpy cast does, not rounded.
Chosen differently (docs/fidelity.md has each difference with the authors' file:line):
- x_T is drawn on the CPU and then moved, so CPU and GPU runs start alike (theirs draws on the GPU);
- the unconditional embedding is the empty prompt encoded WITHOUT the adapters, of batch 1, broadcast over the batch
  by the guidance (theirs loads a shipped `models/uc.pt`, most likely the same tensor);
- PNG files (theirs: JPEG, quality 75) and seed 42 by default (theirs: 8888).
`scripts/txt2img.py --authors` switches all of these back at once.
"""
import hashlib
import math
import os
import re
import warnings
from dataclasses import dataclass, fields

import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision.utils import make_grid

from ldm.checkpoint import CheckpointError
from ldm.models.diffusion.ddim import DDIMSampler, ddim_timesteps
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.encoders.modules import AUTHORS_WEIGHTS, OUR_WEIGHTS
from ldm.util import atomic_write, load_model_from_config

UC_DIR = "models/uc"
LATENT_FACTOR = 8  # the SD v1 VAE (and the tiny one) halves the resolution three times
MAX_NAME_BYTES = 100  # file-name stems stay far below the usual 255-byte limit, room left for `_<seed>_<k>.png`
SD_WEIGHTS_HINT = ("v1-5-pruned-emaonly.ckpt from the stable-diffusion-v1-5/stable-diffusion-v1-5 model card, saved as "
                   "models/sd/v1-5.ckpt")

_UNSAFE = re.compile(r'[/\\:*?"<>|\x00-\x1f\x7f]')


def prompt_to_name(prompt, max_bytes=MAX_NAME_BYTES):
    """A file-system-safe stem for `prompt`: each whitespace character -> `-` (the authors replace spaces only),
    `/ \\ : * ? " < > |` and control characters dropped (the authors keep them), no leading/trailing dots (no `..`,
    no hidden folders). A longer name is cut at `max_bytes` of UTF-8 and ends in 8 hex digits of the prompt's SHA-1,
    so that two long prompts that differ only at the end keep apart."""
    if not prompt.strip():
        return "empty-prompt"
    name = _UNSAFE.sub("", re.sub(r"\s", "-", prompt)).strip(".")
    if not name:
        return "prompt-" + hashlib.sha1(prompt.encode()).hexdigest()[:8]
    if len(name.encode()) > max_bytes:
        head = name.encode()[: max_bytes - 9].decode("utf-8", "ignore").rstrip(".")
        name = f"{head}-{hashlib.sha1(prompt.encode()).hexdigest()[:8]}"
    return name


def prompt_names(prompts):
    """{prompt: stem}; refuses two different prompts that would write into the same folder."""
    names = {}
    for prompt in prompts:
        name = prompt_to_name(prompt)
        clash = next((p for p, n in names.items() if n == name and p != prompt), None)
        if clash is not None:
            raise ValueError(f"prompts {clash!r} and {prompt!r} both map to the folder name {name!r}; reword one of them")
        names[prompt] = name
    return names


# --- checks that run before anything is loaded or written --------------------------------------------------------
@dataclass(frozen=True)
class SamplingOptions:
    """What the sampler is asked to do, named after the reference's txt2img flags: one object from the command line to
    the sampler. Iteration i of a prompt uses seed `seed + i`; `noise_device` is where x_T is drawn (see
    `sample_images`)."""

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
        """The options an argparse namespace holds (flags it lacks keep their defaults)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def check(self, num_timesteps=1000):
        """One ValueError naming the first bad option (and its command-line flag) and the fix; run it before anything
        is loaded or written."""
        for flag, value in (("--H", self.H), ("--W", self.W)):
            if value < LATENT_FACTOR or value % LATENT_FACTOR:
                near = max(LATENT_FACTOR, value // LATENT_FACTOR * LATENT_FACTOR)
                raise ValueError(f"{flag} {value} must be a positive multiple of {LATENT_FACTOR} (the VAE works on "
                                 f"{LATENT_FACTOR}x{LATENT_FACTOR} pixel blocks); try {near}")
        if not self.scale >= 0 or math.isinf(self.scale):
            raise ValueError(f"--scale {self.scale} must be a finite number >= 0 (1 = no guidance, the reference uses 10)")
        for flag, value in (("--n_samples", self.n_samples), ("--n_iter", self.n_iter), ("--ddim_steps", self.ddim_steps)):
            if value < 1:
                raise ValueError(f"{flag} {value} must be at least 1")
        if not self.ddim_eta >= 0 or math.isinf(self.ddim_eta):
            raise ValueError(f"--ddim_eta {self.ddim_eta} must be a finite number >= 0 (0 = deterministic DDIM)")
        if self.plms and self.ddim_eta != 0:
            raise ValueError(f"--plms is deterministic and takes no --ddim_eta (got {self.ddim_eta}); drop --ddim_eta or --plms")
        if self.seed < 0:
            raise ValueError(f"--seed {self.seed} must be >= 0")
        try:
            ddim_timesteps(self.ddim_steps, num_timesteps)
        except ValueError as e:
            raise ValueError(f"--ddim_steps {self.ddim_steps}: {e}") from None
        return self

    def sample(self, model, cond, uc, seed, progress=True):
        """`sample_images` with these options, from `seed`."""
        return sample_images(model, cond, uc, seed, self.H, self.W, self.ddim_steps, self.scale, self.ddim_eta,
                             self.plms, progress, self.noise_device)


def check_output_dir(path, flag="--outdir"):
    """Refuse an output folder that cannot be created or written, before any work is done; `flag` names the option."""
    path = os.path.abspath(path)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"cannot write to output folder {path}: {existing} is a file, not a folder; pass another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to output folder {path}: {existing} is not writable; pass another {flag}")


def check_adapter_path(path):
    """An adapter is a training run's `checkpoints/adapter*` folder, a catversion .safetensors or a pytorch_adapter.bin."""
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f)) for f in (OUR_WEIGHTS, AUTHORS_WEIGHTS)):
            raise ValueError(f"adapter folder {path} holds neither {OUR_WEIGHTS} nor {AUTHORS_WEIGHTS}; pass the "
                             "checkpoints/adapter (or adapter_gs-<step>) folder of a training run")
    elif not os.path.isfile(path):
        raise ValueError(f"adapter not found: {path}; pass an adapter folder, a .safetensors or a pytorch_adapter.bin")


def check_checkpoint_path(path):
    from ldm.weights import parse_folder_path

    if not (os.path.isfile(path) or parse_folder_path(path)):
        raise CheckpointError(f"checkpoint not found: {path}; pass --ckpt_path with an SD v1.x .ckpt/.safetensors, "
                              f"e.g. {SD_WEIGHTS_HINT}")


def expand_strengths(strengths, n_adapters):
    """One strength for every adapter, or one per adapter -> a list of `n_adapters` floats."""
    strengths = [float(s) for s in strengths]
    for s in strengths:
        if not s >= 0 or math.isinf(s):
            raise ValueError(f"--strength {s} must be a finite number >= 0 (0 = base model, 1 = as trained)")
    if n_adapters == 0:
        if any(s != 1.0 for s in strengths):
            raise ValueError("--strength needs an adapter to act on; pass --embedding_path too")
        return []
    if len(strengths) == 1:
        return strengths * n_adapters
    if len(strengths) != n_adapters:
        raise ValueError(f"{len(strengths)} --strength values for {n_adapters} --embedding_path adapters; "
                         "give one value for all, or one per adapter in the same order")
    return strengths


# --- model and conditioning ----------------------------------------------------------------------------------------
def load_model(config, ckpt_path, device="cpu", embedding_paths=(), strengths=(1.0,), verbose=True):
    """LatentDiffusion from `config` (a path or an OmegaConf) and an SD checkpoint, in eval mode on `device`.

    `ckpt_path=None` builds the model with random weights (seeded, the same every time): for smoke tests only.
    `embedding_paths` are CatVersion adapters; the first replaces any adapter of the config, the others are
    stacked onto it as further concepts. `strengths`: one for all adapters, or one per adapter. A path ending in
    `.pt` is a Textual Inversion `embeddings.pt` instead (its placeholder, e.g. `*`, goes in the prompt).
    """
    embeddings = [p for p in embedding_paths if str(p).endswith(".pt")]
    embedding_paths = [p for p in embedding_paths if not str(p).endswith(".pt")]
    strengths = expand_strengths(strengths, len(embedding_paths))
    for path in embedding_paths:
        check_adapter_path(path)
    if ckpt_path is not None:
        check_checkpoint_path(ckpt_path)
    if isinstance(config, (str, os.PathLike)):
        if not os.path.isfile(config):
            raise ValueError(f"config not found: {config}; pass --config configs/stable-diffusion/v1-inference.yaml")
        config = OmegaConf.load(config)
    if ckpt_path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = load_model_from_config(config, None, verbose=verbose)
    else:
        model = load_model_from_config(config, ckpt_path, verbose=verbose)
    for i, (path, strength) in enumerate(zip(embedding_paths, strengths)):
        model.cond_stage_model.adapter_load(path, strength=strength, stack=i > 0)
        trained_on = _adapter_base_fingerprint(path)
        if trained_on and model.base_fingerprint and trained_on != model.base_fingerprint:
            warnings.warn(f"adapter {path} was trained on base model {trained_on}, but this one is {model.base_fingerprint}; "
                          "its concept may not come through")
    for path in embeddings:
        from ldm.modules.embedding_manager import load_embeddings_into

        if not os.path.isfile(path):
            raise ValueError(f"embeddings not found: {path}; pass the embeddings.pt of a Textual Inversion run")
        load_embeddings_into(model.cond_stage_model, path)
    return model.to(device)


def _adapter_base_fingerprint(path):
    """The base model an adapter was trained on, if its catversion.safetensors metadata records it."""
    from ldm.weights import read_metadata

    if os.path.isdir(path):
        path = os.path.join(path, OUR_WEIGHTS)
    if not (path.endswith(".safetensors") and os.path.isfile(path)):
        return None
    return read_metadata(path).get("base_fingerprint") or None


def _device_and_dtype(model):
    p = next(model.parameters())
    return p.device, p.dtype


@torch.no_grad()
def unconditional_embedding(model, cache_dir=UC_DIR):
    """The empty prompt encoded without adapters, shape (1, 77, width): the reference's `models/uc.pt`.

    Cached as `<cache_dir>/<base fingerprint>.safetensors` (one file per base model; the adapters never enter it).
    A model without fingerprint (random weights) or `cache_dir` None/"" is not cached. An unreadable or misshapen
    cache file is recomputed and replaced, with a warning; a cache folder that cannot be written only warns.
    """
    encoder = model.cond_stage_model
    device, dtype = _device_and_dtype(model)
    fingerprint = getattr(model, "base_fingerprint", None)
    path = os.path.join(cache_dir, f"{fingerprint}.safetensors") if fingerprint and cache_dir else None
    expected = (1, encoder.max_length, encoder.width)
    if path and os.path.exists(path):
        uc = _read_uc(path, expected)
        if uc is not None:
            return uc.to(device, dtype)
    with encoder.adapter_disabled():
        uc = model.get_learned_conditioning([""])
    if path:
        try:
            _write_uc(path, uc, fingerprint)
        except OSError as e:
            warnings.warn(f"could not cache the unconditional embedding at {path} ({e}); it is recomputed next time")
    return uc


def _read_uc(path, expected):
    from safetensors.torch import load_file

    try:
        uc = load_file(path)["uc"]
    except Exception as e:  # truncated file, garbage bytes, missing key: the cache is only a shortcut
        warnings.warn(f"ignoring unreadable cache {path} ({type(e).__name__}); recomputing the unconditional embedding")
        return None
    if tuple(uc.shape) != expected:
        warnings.warn(f"ignoring cache {path}: shape {tuple(uc.shape)}, expected {expected}; recomputing it")
        return None
    return uc


def _write_uc(path, uc, fingerprint):
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: save_file({"uc": uc.detach().to("cpu", torch.float32).contiguous()}, tmp,
                                              metadata={"base_fingerprint": fingerprint, "prompt": ""}))


# --- sampling ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_images(model, cond, uc, seed, H=512, W=512, ddim_steps=50, scale=10.0, ddim_eta=0.0, plms=False,
                  progress=True, noise="cpu"):
    """One iteration of the reference loop: images in [0, 1], (batch of `cond`, 3, H, W), on the CPU.

    `noise`: "cpu" draws x_T with the CPU generator, so every device starts from the same x_T (ours); "device" draws
    it on the sampling device after the same `torch.manual_seed(seed)`, as the authors' sampler does (on a GPU
    another x_T, their images)."""
    device, _ = _device_and_dtype(model)
    shape = (model.channels, H // LATENT_FACTOR, W // LATENT_FACTOR)
    torch.manual_seed(seed)
    if noise == "device":
        x_T = torch.randn((cond.shape[0], *shape), device=device)
    else:
        x_T = torch.randn((cond.shape[0], *shape)).to(device)
    sampler = PLMSSampler(model) if plms else DDIMSampler(model)
    z, _ = sampler.sample(S=ddim_steps, batch_size=cond.shape[0], shape=shape, conditioning=cond, x_T=x_T,
                          unconditional_guidance_scale=scale, unconditional_conditioning=uc, eta=ddim_eta,
                          verbose=progress)
    return ((model.decode_first_stage(z).float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu()


def to_uint8(images):
    """[0, 1] floats (..., 3, h, w) -> uint8 (..., h, w, 3), truncated like the reference's `astype(np.uint8)`."""
    return (255.0 * images).to(torch.uint8).movedim(-3, -1)


def save_image(array, path, jpeg=False):
    """Write an (h, w, 3) uint8 array as PNG (or JPEG at PIL's default quality 75, the authors' files) through a
    temporary name: no half-written image is ever visible."""
    options = {"format": "JPEG", "quality": 75} if jpeg else {"format": "PNG"}
    atomic_write(path, lambda tmp: Image.fromarray(array.numpy()).save(tmp, **options))
    return path


def read_uc(path, model):
    """A saved unconditional embedding such as the authors' `models/uc.pt`: one tensor (1, 77, width) or (77, width),
    read safely (no pickled code, finite), on the model's device and dtype."""
    from ldm.weights import load

    obj = load(path)
    values = list(obj.values()) if isinstance(obj, dict) else [obj]
    enc = model.cond_stage_model
    expected = (1, enc.max_length, enc.width)
    uc = values[0] if len(values) == 1 and isinstance(values[0], torch.Tensor) else None
    if uc is not None and uc.dim() == 2:
        uc = uc[None]
    if uc is None or tuple(uc.shape) != expected:
        raise ValueError(f"--uc_path {path} should hold one tensor of shape {expected} (the empty prompt's embedding "
                         f"for this model), found {_shapes(obj)}; pass the uc.pt that belongs to the base model")
    device, dtype = _device_and_dtype(model)
    return uc.to(device, dtype)


def _shapes(obj):
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, dict):
        return f"{len(obj)} entries ({', '.join(list(map(str, obj))[:3])})"
    return type(obj).__name__


def generate(model, prompts, outdir="outputs/txt2img-samples", options=SamplingOptions(), uc=None, uc_dir=UC_DIR,
             progress=True, jpeg=False):
    """Sample every prompt and write `<outdir>/<name>/<name>_<seed>.png` and `<outdir>/<name>/grid.png`.

    With `jpeg`, the authors' files instead: `<name>_<seed>.jpg` at quality 75 and the grid as `<name>/<name>.jpg`.
    `<name>` is `prompt_to_name(prompt)`; with `n_samples > 1` the k-th image of a batch is `<name>_<seed>_<k>.png`.
    Iteration i uses seed `seed + i`; the grid has one row per iteration, `n_samples` images per row. A prompt given
    twice is sampled once.
    `uc` defaults to `unconditional_embedding(model, uc_dir)` (only needed when `scale != 1`).
    Returns `{prompt: {"folder": ..., "images": [paths], "grid": path}}`.
    """
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
        paths, rows = [], []
        for seed in range(options.seed, options.seed + options.n_iter):
            images = options.sample(model, cond, uc, seed, progress)
            for k, image in enumerate(images):
                stem = f"{name}_{seed}" if options.n_samples == 1 else f"{name}_{seed}_{k}"
                paths.append(save_image(to_uint8(image), os.path.join(folder, stem + (".jpg" if jpeg else ".png")), jpeg))
            rows.append(images)
        grid = make_grid(torch.cat(rows), nrow=options.n_samples)
        grid_path = os.path.join(folder, f"{name}.jpg" if jpeg else "grid.png")
        results[prompt] = {"folder": folder, "images": paths, "grid": save_image(to_uint8(grid), grid_path, jpeg)}
    return results
