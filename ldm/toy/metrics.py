"""Metrics of the toy world that need no CLIP: the scenes are flat colours from a known palette, so an image can be
read back into (object colours, background colour, shape) directly.

* Every pixel is assigned its nearest palette colour. The background colour is the most common one along the
  border (objects are drawn inside the frame); object pixels are all pixels of another colour.
* *fidelity*: how much of the object carries the concept's two colours (CONCEPT_STRIPES) in equal parts:
  ``2 * min(share of one, share of the other)`` over the object's pixels (1 for the striped concept, 0 for a plain
  object or no object). Computed per image, averaged.
* *editability*: the share of images whose background colour is the prompt's.
* *prior preservation*: for prompts of other classes, the mean absolute pixel change (in [0, 1]) between the base
  model's and the personalized model's image from the same noise, and the share of images whose read-back
  (object colour, background, shape) is unchanged.
"""
import math
import re

import torch

from ldm.toy.scenes import COLOURS, CONCEPT_STRIPES, SHAPES, concept_images, to_model_range

PALETTE_NAMES = list(COLOURS)
PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255.0
# Object area / bounding-box area of each shape as drawn (the star's from its 0.45 inner radius).
FILL_RATIOS = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5, "star": 0.38}
MIN_OBJECT_SHARE = 0.02  # fewer object pixels than this (about 80 of 64x64) counts as no object


def palette_indices(images):
    """(N, 3, H, W) floats in [0, 1] -> (N, H, W) index of the nearest palette colour."""
    pixels = images.float().movedim(1, -1)
    return torch.cdist(pixels.reshape(len(images), -1, 3), PALETTE.expand(len(images), -1, -1)).argmin(-1) \
        .reshape(pixels.shape[:-1])


def read_scene(indices):
    """One (H, W) palette-index map -> {background, object (most common object colour), shares, mask, shape}."""
    border = torch.cat([indices[0], indices[-1], indices[:, 0], indices[:, -1]])
    background = int(border.mode().values)
    mask = indices != background
    shares = torch.bincount(indices[mask], minlength=len(PALETTE_NAMES)).float() / max(1, int(mask.sum()))
    scene = {"background": PALETTE_NAMES[background], "mask": mask, "object_share": mask.float().mean().item(),
             "colour_shares": dict(zip(PALETTE_NAMES, shares.tolist())), "object": None, "shape": None}
    if scene["object_share"] >= MIN_OBJECT_SHARE:
        scene["object"] = PALETTE_NAMES[int(shares.argmax())]
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        ratio = mask.sum().item() / box.item()
        scene["shape"] = min(FILL_RATIOS, key=lambda s: abs(FILL_RATIOS[s] - ratio))
    return scene


def read_scenes(images):
    return [read_scene(i) for i in palette_indices(images)]


def fidelity(scene, stripes=CONCEPT_STRIPES):
    if scene["object"] is None:
        return 0.0
    return 2.0 * min(scene["colour_shares"][c] for c in stripes)


def parse_prompt(prompt):
    """The colours and shape a toy prompt asks for: {object, background, shape} (None where it says nothing)."""
    words = prompt.lower().split()
    background = re.search(r"on an? (\w+) background", prompt.lower())
    shape = next((w for w in words if w in SHAPES), None)
    colour = words[words.index(shape) - 1] if shape and words.index(shape) > 0 else None
    return {"object": colour if colour in COLOURS else None, "shape": shape,
            "background": background.group(1) if background else None}


def scores(images, prompt, base_images=None):
    """The toy metrics of `images` sampled for `prompt` (and, given, the base model's images from the same noise)."""
    scenes, wanted = read_scenes(images), parse_prompt(prompt)
    result = {"fidelity": sum(map(fidelity, scenes)) / len(scenes)}
    if wanted["background"]:
        result["editability"] = sum(s["background"] == wanted["background"] for s in scenes) / len(scenes)
    if wanted["object"]:
        result["colours_match"] = sum(s["background"] == wanted["background"] and s["object"] == wanted["object"]
                                      for s in scenes) / len(scenes)
    if base_images is not None:
        before = read_scenes(base_images)
        result["pixel_change"] = (images.float() - base_images.float()).abs().mean().item()
        result["unchanged"] = sum((a["object"], a["background"], a["shape"]) == (b["object"], b["background"], b["shape"])
                                  for a, b in zip(scenes, before)) / len(scenes)
    return result


@torch.no_grad()
def round_trip_fidelity(autoencoder, background, n=16, seed=0):
    """Fidelity of the concept drawn on `background` after `autoencoder` (the model's VAE) encodes and decodes it.

    A generated image passes through the same decoder, so this is the most fidelity any method can show on that
    background: the 8x-downsampled latent blurs thin bands of colour.
    """
    drawn = to_model_range(concept_images(n, seed=seed, backgrounds=[background]))
    x = torch.from_numpy(drawn).to(next(autoencoder.parameters()).device)
    decoded = autoencoder.decode(autoencoder.encode(x).mean)
    return sum(map(fidelity, read_scenes(((decoded + 1) / 2).clamp(0, 1).cpu()))) / n


@torch.no_grad()
def sample_prompt(model, prompt, n=16, seed=0):
    """`n` images (n, 3, 64, 64) in [0, 1] for one prompt; the same `seed` gives the same starting noise. Every toy
    measurement (tests, demo, benchmark) samples alike: short DDIM, moderate guidance."""
    from ldm.sampling import sample_images

    with model.cond_stage_model.adapter_disabled():
        uc = model.get_learned_conditioning([""] * n)
    cond = model.get_learned_conditioning([prompt] * n)
    return sample_images(model, cond, uc, seed, H=64, W=64, ddim_steps=25, scale=5.0, progress=False)


def compare(model, prompts, n=16, seed=0, placeholder=None, base_class_word="circle"):
    """Toy metrics of the base model and the personalized one on `prompts`, from the same noise per prompt.

    The base model is `model` with its CatVersion adapter switched off; a Textual Inversion model is asked with
    `placeholder` in place of `base_class_word` (its base is the same model with the plain word).
    Returns {prompt: {"base": scores, "personal": scores, "images": (base, personal)}}.
    """
    from tqdm import tqdm

    results = {}
    for prompt in tqdm(prompts, desc="toy metrics", dynamic_ncols=True, leave=False):
        with model.cond_stage_model.adapter_disabled():
            base = sample_prompt(model, prompt, n, seed)
        asked = prompt.replace(base_class_word, placeholder) if placeholder else prompt
        personal = sample_prompt(model, asked, n, seed)
        results[prompt] = {"base": scores(base, prompt), "personal": scores(personal, prompt, base_images=base),
                           "images": (base, personal)}
    return results
