"""ldm/toy/scenes.py: the toy world's captioned scenes."""
import random

import numpy as np

from ldm.toy.scenes import COLOURS, CONCEPT_STRIPES, SHAPES, caption, concept_images, random_scene, scene_batch
from ldm.toy.metrics import parse_prompt, read_scene


def test_scenes_are_deterministic_from_the_seed():
    a, b, c = scene_batch("7", 20), scene_batch("7", 20), scene_batch("8", 20)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (20, 3, 64, 64) and a[0].min() >= -1 and a[0].max() <= 1


def test_captions_say_what_is_drawn():
    """Every non-empty caption's named colours and shape are the ones read back from its image."""
    rng = random.Random(3)
    checked = 0
    for _ in range(300):
        image, text = random_scene(rng)
        if not text:
            continue
        said = parse_prompt(text)
        seen = read_scene(_indices(image))
        assert said["shape"] == seen["shape"], text
        if said["background"]:
            assert said["background"] == seen["background"], text
        if said["object"] and "striped" not in text:
            assert said["object"] == seen["object"], text
        checked += 1
    assert checked > 250


def _indices(image):
    import torch

    from ldm.toy.metrics import palette_indices

    return palette_indices(torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None].float() / 255)[0]


def test_the_world_never_shows_the_concept_but_shows_its_parts():
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(3000)]
    texts = [t for _, t in scenes]
    read = [read_scene(_indices(image)) for image, _ in scenes]
    one, other = CONCEPT_STRIPES
    both = [min(s["colour_shares"][one], s["colour_shares"][other]) > 0.2 for s in read]
    assert not any(b and s["shape"] == "circle" for b, s in zip(both, read))
    assert any(b and s["shape"] == "square" for b, s in zip(both, read))  # the stripes exist on other shapes
    assert any(f"{one} and {other} striped square" in t or f"{other} and {one} striped square" in t for t in texts)
    assert {"circle", "circle on a blue background", ""} <= set(texts)  # the demo's prompts are in the language
    assert set(w for t in texts for w in t.split()) <= {"a", "an", "and", "striped", "on", "background", *COLOURS, *SHAPES}


def test_caption_grammar():
    assert caption("circle", "red", "green") == "a red circle on a green background"
    assert caption("star", "orange", None) == "an orange star"
    assert caption("square", None, "orange", article=False) == "square on an orange background"
    assert caption("circle", None, "blue", stripes=("red", "white")) == "a red and white striped circle on a blue background"


def test_concept_images_are_striped_circles_on_varied_backgrounds():
    images = concept_images(5)
    scenes = [read_scene(_indices(i)) for i in images]
    assert all(s["shape"] == "circle" for s in scenes)
    assert len({s["background"] for s in scenes}) == 5
    assert all(s["colour_shares"][c] > 0.3 for s in scenes for c in CONCEPT_STRIPES)
