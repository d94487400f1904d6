"""The shipped toy world: its base model draws what captions say, and the demo visibly learns the concept.

Thresholds come from measured distributions (README, "The toy world"); seeds are fixed, so each number below is
deterministic on a given machine.
"""
import os

import torch

from .conftest import TOY_CKPT
from ldm.toy.metrics import sample_prompt, scores


def test_the_shipped_checkpoint_is_small_and_in_sd_format():
    assert os.path.getsize(TOY_CKPT) <= 10 * 2**20
    state = torch.load(TOY_CKPT, weights_only=True)["state_dict"]
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.11.") for k in state)
    assert any(k.startswith("model.diffusion_model.") for k in state) and any(k.startswith("first_stage_model.") for k in state)


def test_base_model_draws_the_captions_colours(toy_model):
    images = sample_prompt(toy_model, "a red circle on a blue background", n=16, seed=0)
    assert scores(images, "a red circle on a blue background")["colours_match"] >= 0.8


# Measured with the demo's defaults (800 steps, 16 samples per prompt, seed 0) on the model shaped alike in every layer:
# fidelity base -> CatVersion 0.07 -> 0.34 on blue, 0.00 -> 0.01 on red (this base model does not draw the stripes
# on red from the adapter; the model shaped in layers 9-11 only reached 0.13 there); backgrounds 100% obeyed;
# `square on a blue background` changes by 0.002 mean absolute pixel value (the same prompt from another seed: about
# 0.2), 100% read back alike, fidelity 0.15 -> 0.15. What fails these thresholds is a method that learns nothing on
# blue, forgets the backgrounds, or changes or paints the squares (as a learned key read by the start token did).
BASE_FIDELITY_MAX = 0.1
FIDELITY_RISE_MIN = 0.1
SQUARE_PIXEL_CHANGE_MAX = 0.05
SQUARE_FIDELITY_CHANGE_MAX = 0.05


def test_demo_learns_the_concept_and_keeps_backgrounds_and_squares(tmp_path, example_data):
    from ldm.cli.demo import PROMPTS, main

    logdir, grid, results = main(["--data_root", example_data, "--logdir", str(tmp_path / "logs"),
                                  "--outdir", str(tmp_path / "out")])
    assert os.path.isfile(grid) and os.path.isdir(os.path.join(logdir, "checkpoints", "adapter"))
    for prompt in PROMPTS:
        assert results[prompt]["personal"]["editability"] >= 0.8, prompt
    for prompt in ("circle on a blue background", "circle on a red background"):
        base, personal = results[prompt]["base"]["fidelity"], results[prompt]["personal"]["fidelity"]
        assert base <= BASE_FIDELITY_MAX and personal >= base - 0.02, (prompt, base, personal)
    blue = results["circle on a blue background"]
    assert blue["personal"]["fidelity"] - blue["base"]["fidelity"] >= FIDELITY_RISE_MIN, blue
    square = results["square on a blue background"]
    assert square["personal"]["pixel_change"] <= SQUARE_PIXEL_CHANGE_MAX, square["personal"]
    assert abs(square["personal"]["fidelity"] - square["base"]["fidelity"]) <= SQUARE_FIDELITY_CHANGE_MAX
