"""CLIP scores for personalization, on L2-normalised features (every similarity is a cosine): CLIP-I (mean over all
(reference, generated) pairs), CLIP-T (the prompt against each generated image), their geometric mean, and masked
CLIP-I (the CatVersion paper's CLIP-I on the concept region only, so that agreeing backgrounds do not inflate it).
"""
import logging
import math
import os
from collections import namedtuple

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN
from PIL import Image
from tqdm import tqdm

from ldm.images import list_images, load_grey
from ldm.weights import mismatch, read_tensors

MASK_RULES = {
    "masks": "masks: outside the mask CLIP's mean grey, cropped to the mask's box, padded square (ours)",
    "rm_mask": "rm_mask: background-removed copies from <dir>/rm_mask/ scored as stored (the authors' layout)",
}
# CLIP's mean colour as 8-bit RGB, (123, 117, 104): CLIP's normalisation maps it to about zero.
FILL = tuple(round(channel * 255) for channel in OPENAI_DATASET_MEAN)
# An open_clip model with the image transform and tokenizer that belong to it.
ClipModel = namedtuple("ClipModel", "model preprocess tokenizer device")


def load_clip(model_name, weights_path, device="cpu", quick_gelu=True):
    """Build open_clip `model_name` and load its weights from a local file; never downloads.

    `quick_gelu` forces QuickGELU, which OpenAI's CLIP weights (the reference's ViT-B/32) were trained with; turn it
    off for open_clip weights trained with GELU (e.g. laion2b). Images are preprocessed as open_clip does for OpenAI's
    weights: bicubic resize of the short side, centre crop, OpenAI mean/std."""
    if not os.path.isfile(weights_path):
        raise ValueError(f"CLIP weights not found: {weights_path}. Download open_clip's {model_name} 'openai' weights "
                         "(open_clip_pytorch_model.bin) on a machine with internet and pass --clip_weights PATH.")
    # Names with a schema ('hf-hub:', 'local-dir:') would fetch or ignore the weights file.
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown CLIP model '{model_name}'; pick a name from open_clip.list_models(), e.g. ViT-B-32")
    found = read_tensors(weights_path, fix="pass an open_clip state dict (.bin/.pt/.pth or .safetensors, not "
                                          "OpenAI's TorchScript .pt)")
    # Built with random weights, then loaded strictly by us: open_clip's own checkpoint loader would silently resize
    # mismatched position embeddings instead of reporting the wrong file. Its warning that the model is randomly
    # initialised (on the root logger) is silenced: it is not.
    logging.disable(logging.WARNING)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, force_quick_gelu=quick_gelu,
                                                                     pretrained_text=False)
    finally:
        logging.disable(logging.NOTSET)
    problem = mismatch(model.state_dict(), found)
    if problem:
        raise ValueError(f"CLIP weights {weights_path} do not fit {model_name}: {problem}; pass the weights of "
                         f"--clip_model {model_name} or the --clip_model they belong to")
    model.load_state_dict(found)
    device = torch.device(device)
    model = model.to(device).eval().requires_grad_(False)
    return ClipModel(model, preprocess, open_clip.get_tokenizer(model_name), device)


def load_mask_folder(folder, stems):
    """{stem: boolean mask} for each of `stems` from same-stem image files (pixel > 127 = concept)."""
    available = list_images(folder)
    masks = {}
    for stem in stems:
        if stem not in available:
            raise ValueError(f"no mask for image '{stem}' in {folder}; add {stem}.png (white = concept)")
        masks[stem] = np.asarray(load_grey(available[stem])) > 127
    return masks


def masked_view(image, mask, fill=FILL):
    """The concept region of `image` (a mask is a 2-D boolean array, True = concept), as reference and generated
    images both go into CLIP for masked CLIP-I: every pixel outside the mask set to `fill`, CLIP's mean grey, which
    its normalisation maps to about zero; cropped to the mask's bounding box; padded to a centred square of the same
    grey, so that CLIP's resize does not distort it and its centre crop does not cut the concept. A mask of another
    size (e.g. an upsampled attention map) is resized to the image (nearest). For a non-square image an all-ones
    mask is padded, not centre-cropped, so its masked score can differ from plain CLIP-I."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != bool:
        raise ValueError(f"a mask must be a 2-D boolean array (True = concept), got {mask.dtype} {mask.shape}; "
                         "threshold it first")
    if mask.shape != (image.height, image.width):
        mask = Image.fromarray(mask.astype(np.uint8) * 255).resize(image.size, Image.Resampling.NEAREST)
        mask = np.asarray(mask) > 127
    if not mask.any():
        raise ValueError("a mask has no concept pixels; give every image a mask covering its concept")
    pixels = np.asarray(image.convert("RGB")).copy()
    pixels[~mask] = fill
    rows, cols = np.nonzero(mask)
    crop = pixels[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    height, width = crop.shape[:2]
    side = max(height, width)
    canvas = np.full((side, side, 3), fill, dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top:top + height, left:left + width] = crop
    return Image.fromarray(canvas)


@torch.no_grad()
def encode_images(clip, images, batch_size=16):
    """L2-normalised image features, [len(images), dim], float32 on the CPU."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    features = []
    for start in tqdm(range(0, len(images), batch_size), desc="encoding images", unit="batch"):
        batch = torch.stack([clip.preprocess(img) for img in images[start:start + batch_size]])
        features.append(clip.model.encode_image(batch.to(clip.device)).float().cpu())
    return F.normalize(torch.cat(features), dim=-1)


@torch.no_grad()
def encode_text(clip, text):
    """The L2-normalised text feature of `text`, [dim], float32 on the CPU."""
    if not text.strip():
        raise ValueError("the prompt is empty; pass the text the images were generated from")
    return F.normalize(clip.model.encode_text(clip.tokenizer([text]).to(clip.device)).float().cpu(), dim=-1)[0]


def clip_scores(clip, refs, gens, texts=(), batch_size=16):
    """Per generated image (lists of PIL images): CLIP-I, its mean cosine to the references, and, where `texts` holds
    one text per generated image, CLIP-T, its cosine to its text (else None); two tensors [len(gens)]."""
    text_feats = {text: encode_text(clip, text) for text in set(texts)}
    ref_feats, gen_feats = encode_images(clip, refs, batch_size), encode_images(clip, gens, batch_size)
    # Rows: generated images, columns: references; the mean of a row is that image's CLIP-I.
    clip_i_rows = (gen_feats @ ref_feats.T).mean(dim=1)
    if not texts:
        return clip_i_rows, None
    return clip_i_rows, (gen_feats * torch.stack([text_feats[text] for text in texts])).sum(dim=1)


def geometric_mean(clip_i, clip_t):
    """sqrt(CLIP-I * CLIP-T), each score clamped at 0 first: a negative cosine means "no similarity", and clamping the
    factors (not the product) keeps two negative scores from giving a positive mean."""
    return math.sqrt(max(clip_i, 0.0) * max(clip_t, 0.0))


def compute_metrics(clip, ref_images, gen_images, prompt, ref_masks=None, gen_masks=None, batch_size=16,
                    ref_removed=None, gen_removed=None):
    """All scores for PIL images keyed by stem; masks (both or neither) are {stem: boolean array}.

    Masked CLIP-I comes from the masks (`masked_view`) or else from `ref_removed`/`gen_removed`: background-removed
    copies scored as they are (the authors' `rm_mask/` layout); "masked_clip_i_rule" names the rule that produced it.
    Returns {"clip_i", "clip_t", "geometric_mean", ["masked_clip_i", "masked_clip_i_rule"], "per_image"}, where
    "per_image" is a list of {"image": stem, "clip_i", "clip_t", ["masked_clip_i"]} in the order of `gen_images`."""
    if (ref_masks is None) != (gen_masks is None) or (ref_removed is None) != (gen_removed is None):
        raise ValueError("masks given for only one side; pass both reference and generated masks, or neither")
    clip_i_rows, clip_t_rows = clip_scores(clip, list(ref_images.values()), list(gen_images.values()),
                                           [prompt] * len(gen_images), batch_size)
    result = {"clip_i": clip_i_rows.mean().item(), "clip_t": clip_t_rows.mean().item()}
    result["geometric_mean"] = geometric_mean(result["clip_i"], result["clip_t"])
    per_image = [{"image": stem, "clip_i": ci, "clip_t": ct}
                 for stem, ci, ct in zip(gen_images, clip_i_rows.tolist(), clip_t_rows.tolist())]
    if ref_masks is not None:
        ref_removed = _masked_views(ref_images, ref_masks, "reference")
        gen_removed = _masked_views(gen_images, gen_masks, "generated")
    if ref_removed is not None:
        masked_rows, _ = clip_scores(clip, list(ref_removed.values()), list(gen_removed.values()), (), batch_size)
        result["masked_clip_i"] = masked_rows.mean().item()
        result["masked_clip_i_rule"] = MASK_RULES["masks" if ref_masks is not None else "rm_mask"]
        by_stem = dict(zip(gen_removed, masked_rows.tolist()))
        for row in per_image:
            if row["image"] in by_stem:  # the rm_mask/ copies need not share the generated images' stems
                row["masked_clip_i"] = by_stem[row["image"]]
    result["per_image"] = per_image
    return result


def _masked_views(images, masks, side):
    views = {}
    for stem, image in images.items():
        if stem not in masks:
            raise ValueError(f"no mask for {side} image '{stem}'; give every image a mask")
        try:
            views[stem] = masked_view(image, masks[stem])
        except ValueError as err:
            raise ValueError(f"{side} image '{stem}': {err}") from None
    return views
