"""ldm/toy/metrics.py: reading toy images back, against the scene generator's ground truth."""
import random

import numpy as np
import pytest
import torch

from ldm.toy.scenes import COLOURS, SHAPES, concept_images, draw_scene, random_layout
from ldm.toy.metrics import fidelity, parse_prompt, read_scenes, round_trip_fidelity, scores


def _tensor(images):
    return torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 255


def _scenes(n, seed=5, stripes=None):
    rng = random.Random(seed)
    images, truth = [], []
    for _ in range(n):
        shape = rng.choice(SHAPES)
        background, colour = rng.sample(list(COLOURS), 2)
        images.append(draw_scene(shape, colour, background, *random_layout(rng, 64), stripes=stripes))
        truth.append((shape, colour, background))
    return _tensor(images), truth


def test_read_back_matches_the_drawn_scene():
    images, truth = _scenes(200)
    read = [(s["shape"], s["object"], s["background"]) for s in read_scenes(images)]
    assert read == truth


def test_fidelity_separates_the_concept_from_plain_and_other_striped_objects():
    concept = [fidelity(s) for s in read_scenes(_tensor(concept_images(5)))]
    plain = [fidelity(s) for s in read_scenes(_scenes(50)[0])]
    other_stripes = [fidelity(s) for s in read_scenes(_scenes(20, stripes=("red", "white"))[0])]
    assert min(concept) > 0.85
    assert max(plain) == 0.0 and max(other_stripes) == 0.0
    empty = torch.ones(1, 3, 64, 64) * torch.tensor(COLOURS["blue"]).view(1, 3, 1, 1) / 255
    assert read_scenes(empty)[0]["object"] is None and fidelity(read_scenes(empty)[0]) == 0.0


@pytest.mark.parametrize("prompt, wanted", [
    ("a red circle on a blue background", {"object": "red", "shape": "circle", "background": "blue"}),
    ("circle on an orange background", {"object": None, "shape": "circle", "background": "orange"}),
    ("square", {"object": None, "shape": "square", "background": None}),
])
def test_parse_prompt(prompt, wanted):
    assert parse_prompt(prompt) == wanted


def test_scores_count_obeyed_prompts_and_changes():
    rng = random.Random(1)
    red_on_blue = _tensor([draw_scene("circle", "red", "blue", *random_layout(rng, 64)) for _ in range(3)])
    red_on_green = _tensor([draw_scene("circle", "red", "green", *random_layout(rng, 64))])
    images = torch.cat([red_on_blue, red_on_green])
    s = scores(images, "a red circle on a blue background", base_images=images)
    assert s["colours_match"] == 0.75 and s["editability"] == 0.75 and s["fidelity"] == 0.0
    assert s["pixel_change"] == 0.0 and s["unchanged"] == 1.0
    moved = scores(images, "a red circle on a blue background", base_images=images.roll(1, 0))
    assert moved["pixel_change"] > 0.01 and moved["unchanged"] == 0.5


class _Identity(torch.nn.Module):
    """An autoencoder that loses nothing: the latent is the image."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def encode(self, x):
        return type("Posterior", (), {"mean": x})()

    def decode(self, z):
        return z


def test_round_trip_fidelity_is_the_drawn_concept_through_a_lossless_autoencoder_and_less_through_the_toy_vae(toy_model):
    assert round_trip_fidelity(_Identity(), "blue") > 0.85
    assert round_trip_fidelity(toy_model.first_stage_model, "blue") < 0.75  # the toy VAE blurs the bands (0.62)
