"""Procedurally drawn scenes: simple objects in plain colours on plain backgrounds, with captions in words.

Used for the demo concept (a circle with a two-colour stripe pattern that no caption of the toy world names) and for
tests; deterministic from a seed, nothing downloaded.
"""
import math
import os
import random

from PIL import Image, ImageDraw

from ldm.util import atomic_write

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star")


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
    """One image: `shape` filled with `colour` (or horizontal stripes alternating the two colours of `stripes`)."""
    img = Image.new("RGB", (size, size), COLOURS[background])
    if stripes:
        fill = Image.new("RGB", (size, size))
        d = ImageDraw.Draw(fill)
        band = max(2, size // 16)
        for i, y in enumerate(range(0, size, band)):
            d.rectangle((0, y, size, y + band - 1), fill=COLOURS[stripes[i % 2]])
    else:
        fill = Image.new("RGB", (size, size), COLOURS[colour])
    img.paste(fill, (0, 0), object_mask(shape, cx, cy, r, size))
    return img


def random_layout(rng, size):
    r = rng.uniform(0.2, 0.3) * size
    return rng.uniform(r, size - r), rng.uniform(r, size - r), r


def concept_images(n=5, size=64, seed=0, stripes=("yellow", "purple")):
    """The demo concept: a circle striped in two colours, at different places on different backgrounds."""
    rng = random.Random(seed)
    backgrounds = [c for c in COLOURS if c not in stripes]
    return [draw_scene("circle", None, backgrounds[i % len(backgrounds)], *random_layout(rng, size), size=size, stripes=stripes)
            for i in range(n)]


def write_concept_folder(folder, n=5, size=64, seed=0):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, img in enumerate(concept_images(n, size, seed)):
        path = os.path.join(folder, f"{i:02d}.png")
        atomic_write(path, lambda tmp, img=img: img.save(tmp, format="PNG"))
        paths.append(path)
    return paths
