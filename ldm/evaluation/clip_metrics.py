"""CLIP scores for personalization: CLIP-I, CLIP-T, their geometric mean, masked CLIP-I.

All features are L2-normalised, so every similarity below is a cosine.

* CLIP-I: mean cosine over all (reference image, generated image) pairs.
* CLIP-T: mean cosine between the prompt's text feature and each generated image.
* geometric mean: ``sqrt(max(CLIP-I, 0) * max(CLIP-T, 0))``. Each score is clamped at 0 first:
  a negative cosine means "no similarity", and clamping the factors (not the product) keeps two
  negative scores from producing a positive mean.
* masked CLIP-I (CatVersion paper): CLIP-I on the concept region only, so that agreeing
  backgrounds do not inflate the score. Reference and generated images go through the same rule:

  1. every pixel outside the mask is set to the grey ``FILL``: the CLIP mean colour
     (0.48145466, 0.4578275, 0.40821073) * 255 rounded, i.e. RGB (123, 117, 104), which CLIP's
     normalisation maps to about zero;
  2. the image is cropped to the bounding box of the mask;
  3. the crop is padded to a square with the same grey, centred, so that CLIP's resize does not
     distort it and its centre crop does not cut the concept;
  4. CLIP's usual preprocessing (resize, centre crop, normalise) follows.

  A mask is a 2-D boolean array (True = concept). Mask PNGs are read as greyscale with
  pixel > 127 = concept. A mask whose size differs from its image (e.g. an upsampled attention
  map) is resized to the image with nearest-neighbour sampling. Note that for a non-square image
  an all-ones mask is padded, not centre-cropped, so its masked score can differ from plain CLIP-I.
"""

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN
from PIL import Image
from tqdm import tqdm

from ldm.images import list_images, load_grey
from ldm.weights import read_tensors

MASK_RULES = {
    "masks": "masks: outside the mask CLIP's mean grey, cropped to the mask's box, padded square (ours)",
    "rm_mask": "rm_mask: background-removed copies from <dir>/rm_mask/ scored as stored (the authors' layout)",
}
# CLIP's mean colour as 8-bit RGB, (123, 117, 104): CLIP's normalisation maps it to about zero.
FILL = tuple(round(channel * 255) for channel in OPENAI_DATASET_MEAN)


@dataclass(frozen=True)
class ClipModel:
    """An open_clip model with the image transform and tokenizer that belong to it."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable
    device: torch.device


def load_clip(model_name: str, weights_path, device="cpu", quick_gelu: bool = True) -> ClipModel:
    """Build open_clip `model_name` and load its weights from a local file; never downloads.

    `quick_gelu` forces QuickGELU, which OpenAI's CLIP weights (the reference's ViT-B/32) were
    trained with; turn it off for open_clip weights trained with GELU (e.g. laion2b). Images are
    preprocessed the way open_clip does for OpenAI's weights: bicubic resize of the short side,
    centre crop, OpenAI mean/std.
    """
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise ValueError(
            f"CLIP weights not found: {weights_path}. Download open_clip's {model_name} 'openai' "
            f"weights (open_clip_pytorch_model.bin) on a machine with internet and pass --clip_weights PATH."
        )
    # Names with a schema ('hf-hub:', 'local-dir:') would fetch or ignore the weights file.
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown CLIP model '{model_name}'; pick a name from open_clip.list_models(), e.g. ViT-B-32")
    state_dict = read_tensors(weights_path, fix="pass an open_clip state dict (.bin/.pt/.pth or .safetensors, not "
                                               "OpenAI's TorchScript .pt)")
    # Built with random weights, then loaded strictly by us: open_clip's own checkpoint loader
    # would silently resize mismatched position embeddings instead of reporting the wrong file.
    # open_clip logs a root-logger warning that the model is randomly initialised; it is not.
    logging.disable(logging.WARNING)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, force_quick_gelu=quick_gelu, pretrained_text=False
        )
    finally:
        logging.disable(logging.NOTSET)
    _check_keys(model.state_dict(), state_dict, weights_path, model_name)
    model.load_state_dict(state_dict)
    device = torch.device(device)
    model = model.to(device).eval().requires_grad_(False)
    return ClipModel(model, preprocess, open_clip.get_tokenizer(model_name), device)


def _check_keys(expected: dict, found: dict, path: Path, model_name: str):
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & found.keys() if expected[k].shape != found[k].shape)
    problems = [
        f"{len(keys)} {what} (e.g. {keys[0]})"
        for keys, what in (
            (missing, "missing keys"), (unexpected, "unexpected keys"), (reshaped, "keys of another shape")
        )
        if keys
    ]
    if problems:
        raise ValueError(
            f"CLIP weights {path} do not fit {model_name}: {', '.join(problems)}; pass the weights of "
            f"--clip_model {model_name} or the --clip_model they belong to"
        )


def load_mask_folder(folder, stems: Sequence[str]) -> dict:
    """{stem: boolean mask} for each of `stems` from same-stem image files (pixel > 127 = concept)."""
    available = list_images(folder)
    masks = {}
    for stem in stems:
        if stem not in available:
            raise ValueError(f"no mask for image '{stem}' in {folder}; add {stem}.png (white = concept)")
        masks[stem] = np.asarray(load_grey(available[stem])) > 127
    return masks


def masked_view(image: Image.Image, mask, fill=FILL) -> Image.Image:
    """The concept region of `image`: background set to `fill`, cropped to the mask, padded square."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != bool:
        raise ValueError(
            f"a mask must be a 2-D boolean array (True = concept), got {mask.dtype} {mask.shape}; threshold it first"
        )
    if mask.shape != (image.height, image.width):
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(image.size, Image.Resampling.NEAREST)
        mask = np.asarray(resized) > 127
    if not mask.any():
        raise ValueError("a mask has no concept pixels; give every image a mask covering its concept")
    pixels = np.asarray(image.convert("RGB")).copy()
    pixels[~mask] = fill
    rows, cols = np.nonzero(mask)
    crop = pixels[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = crop.shape[:2]
    side = max(height, width)
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = fill
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = crop
    return Image.fromarray(canvas)


@torch.no_grad()
def encode_images(
    clip: ClipModel, images: Sequence[Image.Image], batch_size: int = 16, desc: str = "encoding images"
) -> torch.Tensor:
    """L2-normalised image features, [len(images), dim], float32 on the CPU."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    features = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch"):
        batch = torch.stack([clip.preprocess(img) for img in images[start : start + batch_size]])
        features.append(clip.model.encode_image(batch.to(clip.device)).float().cpu())
    return F.normalize(torch.cat(features), dim=-1)


@torch.no_grad()
def encode_text(clip: ClipModel, text: str) -> torch.Tensor:
    """The L2-normalised text feature of `text`, [dim], float32 on the CPU."""
    if not text.strip():
        raise ValueError("the prompt is empty; pass the text the images were generated from")
    tokens = clip.tokenizer([text]).to(clip.device)
    return F.normalize(clip.model.encode_text(tokens).float().cpu(), dim=-1)[0]


def geometric_mean(clip_i: float, clip_t: float) -> float:
    """sqrt(CLIP-I * CLIP-T) with each score clamped at 0 (see the module docstring)."""
    return math.sqrt(max(clip_i, 0.0) * max(clip_t, 0.0))


def compute_metrics(
    clip: ClipModel,
    ref_images: Mapping[str, Image.Image],
    gen_images: Mapping[str, Image.Image],
    prompt: str,
    ref_masks: Optional[Mapping[str, np.ndarray]] = None,
    gen_masks: Optional[Mapping[str, np.ndarray]] = None,
    batch_size: int = 16,
    ref_removed: Optional[Mapping[str, Image.Image]] = None,
    gen_removed: Optional[Mapping[str, Image.Image]] = None,
) -> dict:
    """All scores for images keyed by stem; masks (both or neither) are {stem: boolean array}.

    Masked CLIP-I comes from the masks (our rule) or, instead, from `ref_removed`/`gen_removed`: background-removed
    copies scored as they are (the authors' `rm_mask/` layout); "masked_clip_i_rule" names the rule that produced it.

    Returns {"clip_i", "clip_t", "geometric_mean", ["masked_clip_i", "masked_clip_i_rule"], "per_image"}, where
    "per_image" is a list of {"image": stem, "clip_i": mean over references, "clip_t",
    ["masked_clip_i"]} in the order of `gen_images`.
    """
    if not ref_images or not gen_images:
        raise ValueError("need at least one reference and one generated image")
    if (ref_masks is None) != (gen_masks is None) or (ref_removed is None) != (gen_removed is None):
        raise ValueError("masks given for only one side; pass both reference and generated masks, or neither")
    if ref_masks is not None and ref_removed is not None:
        raise ValueError("two masked CLIP-I rules at once; pass masks or background-removed copies, not both")
    text_feat = encode_text(clip, prompt)
    ref_feats = encode_images(clip, list(ref_images.values()), batch_size, "encoding reference images")
    gen_feats = encode_images(clip, list(gen_images.values()), batch_size, "encoding generated images")
    # Rows: generated images, columns: references; the mean of a row is that image's CLIP-I.
    clip_i_rows = (gen_feats @ ref_feats.T).mean(dim=1)
    clip_t_rows = gen_feats @ text_feat
    result = {"clip_i": clip_i_rows.mean().item(), "clip_t": clip_t_rows.mean().item()}
    result["geometric_mean"] = geometric_mean(result["clip_i"], result["clip_t"])
    per_image = [
        {"image": stem, "clip_i": ci.item(), "clip_t": ct.item()}
        for stem, ci, ct in zip(gen_images, clip_i_rows, clip_t_rows)
    ]
    if ref_masks is not None:
        ref_removed = _masked_views(ref_images, ref_masks, "reference")
        gen_removed = _masked_views(gen_images, gen_masks, "generated")
    if ref_removed is not None:
        masked_ref = encode_images(clip, list(ref_removed.values()), batch_size, "encoding masked reference images")
        masked_gen = encode_images(clip, list(gen_removed.values()), batch_size, "encoding masked generated images")
        masked_rows = (masked_gen @ masked_ref.T).mean(dim=1)
        result["masked_clip_i"] = masked_rows.mean().item()
        result["masked_clip_i_rule"] = MASK_RULES["masks" if ref_masks is not None else "rm_mask"]
        by_stem = dict(zip(gen_removed, masked_rows.tolist()))
        for row in per_image:
            if row["image"] in by_stem:  # the rm_mask/ copies need not share the generated images' stems
                row["masked_clip_i"] = by_stem[row["image"]]
    result["per_image"] = per_image
    return result


def _masked_views(images, masks, side):
    missing = [stem for stem in images if stem not in masks]
    if missing:
        raise ValueError(f"no mask for {side} image '{missing[0]}'; give every image a mask")
    views = {}
    for stem, image in images.items():
        try:
            views[stem] = masked_view(image, masks[stem])
        except ValueError as err:
            raise ValueError(f"{side} image '{stem}': {err}") from None
    return views
