"""The toy world: simple objects in plain colours on plain backgrounds, with captions in words.

`ldm/toy/base_model.py` pretrains the toy text-to-image model on `random_scene`s; the demo concept (a circle
striped purple and orange, base class word `circle`) is a combination that world never shows, although it shows
circles, stripes, purple and orange separately, the way SD has seen teddy bears and brown fur but not your teddy.
Everything is deterministic from a seed; nothing is downloaded.
"""
import math
import re
import os
import random

import numpy as np
from PIL import Image, ImageDraw

from ldm.util import atomic_write

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
# The toy concepts: striped objects the pretraining world never draws (each shape and colour appears, striped
# objects appear, but never these stripes on this shape). The first is the demo's.
CONCEPTS = {"circle": ("purple", "orange"), "square": ("yellow", "purple"), "triangle": ("orange", "yellow")}
CONCEPT_SHAPE, CONCEPT_STRIPES = "circle", CONCEPTS["circle"]


def _polygon(shape, cx, cy, r):
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [(cx + (r if i % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
                 cy + (r if i % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
    raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")


def object_mask(shape, cx, cy, r, size):
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        d.polygon(_polygon(shape, cx, cy, r), fill=255)
    return mask


def draw_scene(shape, colour, background, cx, cy, r, size=64, stripes=None):
    """One image: `shape` filled with `colour`, or with horizontal stripes alternating the two colours of `stripes`.

    Stripes are an eighth of the image high and start at the top edge, so each falls on one row of the 8x-downsampled
    latent grid.
    """
    img = Image.new("RGB", (size, size), COLOURS[background])
    if stripes:
        fill = Image.new("RGB", (size, size))
        d = ImageDraw.Draw(fill)
        band = max(2, size // 8)
        for i, y in enumerate(range(0, size, band)):
            d.rectangle((0, y, size, y + band - 1), fill=COLOURS[stripes[i % 2]])
    else:
        fill = Image.new("RGB", (size, size), COLOURS[colour])
    img.paste(fill, (0, 0), object_mask(shape, cx, cy, r, size))
    return img


def random_layout(rng, size):
    r = rng.uniform(0.2, 0.3) * size
    return rng.uniform(r, size - r), rng.uniform(r, size - r), r


def caption(shape, colour=None, background=None, stripes=None, article=True):
    """`a red circle on a green background`; any of colour, background and article may be left out."""
    words = ["a"] if article else []
    if stripes:
        words += [stripes[0], "and", stripes[1], "striped"]
    elif colour:
        words.append(colour)
    words.append(shape)
    if background:
        words += ["on", "a", background, "background"]
    return re.sub(r"\ba (?=[aeiou])", "an ", " ".join(words))


def random_scene(rng, size=64, stripe_p=0.25, drop_colour_p=0.3, drop_background_p=0.3, drop_article_p=0.5,
                 empty_p=0.1):
    """(image, caption) of the pretraining world. Captions leave attributes out at random, so that `circle`, `circle on
    a blue background` and the empty prompt (classifier-free guidance) all mean something; the CONCEPTS are never
    drawn."""
    names = list(COLOURS)
    shape, background = rng.choice(SHAPES), rng.choice(names)
    others = [c for c in names if c != background]
    colour = stripes = None
    if rng.random() < stripe_p:
        while stripes is None or set(stripes) == set(CONCEPTS.get(shape, ())):
            stripes = tuple(rng.sample(others, 2))
    else:
        colour = rng.choice(others)
    image = draw_scene(shape, colour, background, *random_layout(rng, size), size=size, stripes=stripes)
    if rng.random() < empty_p:
        return image, ""
    keep_colour = rng.random() >= drop_colour_p
    text = caption(shape, colour if keep_colour else None, background if rng.random() >= drop_background_p else None,
                   stripes if keep_colour else None, article=rng.random() >= drop_article_p)
    return image, text


def scene_batch(seed, n, size=64):
    """`n` scenes as a float tensor-ready array (n, 3, size, size) in [-1, 1] and their captions."""
    rng = random.Random(seed)
    images, captions = zip(*(random_scene(rng, size) for _ in range(n)))
    return to_model_range(images), list(captions)


def to_model_range(images):
    """PIL images -> a float array (n, 3, H, W) in [-1, 1], as the models take them."""
    return np.stack([np.asarray(image) for image in images]).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0


def concept_images(n=5, size=64, seed=0, stripes=CONCEPT_STRIPES, backgrounds=None, shape=CONCEPT_SHAPE):
    """A concept (by default the demo's circle striped purple and orange) at different places on different
    backgrounds (by default every colour but the stripes', in turn)."""
    rng = random.Random(seed)
    backgrounds = backgrounds or [c for c in COLOURS if c not in stripes]
    return [draw_scene(shape, None, backgrounds[i % len(backgrounds)], *random_layout(rng, size), size=size,
                       stripes=stripes) for i in range(n)]


def write_concept_folder(folder, n=5, size=64, seed=0, shape=CONCEPT_SHAPE):
    """`n` images of the concept CONCEPTS[shape] as PNG files in `folder`."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, img in enumerate(concept_images(n, size, seed, CONCEPTS[shape], shape=shape)):
        path = os.path.join(folder, f"{i:02d}.png")
        atomic_write(path, lambda tmp, img=img: img.save(tmp, format="PNG"))
        paths.append(path)
    return paths
