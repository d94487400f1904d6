"""The shipped toy world: its base model draws what captions say, and the demo visibly learns the concept.

Thresholds come from measured distributions (README, "The toy world"); seeds are fixed, so each number below is
deterministic on a given machine.
"""
import os

import torch

from .conftest import TOY_CKPT
from ldm.evaluation.toy_metrics import sample_prompt, scores


def test_the_shipped_checkpoint_is_small_and_in_sd_format():
    assert os.path.getsize(TOY_CKPT) <= 10 * 2**20
    state = torch.load(TOY_CKPT, weights_only=True)["state_dict"]
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.11.") for k in state)
    assert any(k.startswith("model.diffusion_model.") for k in state) and any(k.startswith("first_stage_model.") for k in state)


def test_base_model_draws_the_captions_colours(toy_model):
    images = sample_prompt(toy_model, "a red circle on a blue background", n=16, seed=0)
    assert scores(images, "a red circle on a blue background")["colours_match"] >= 0.8


# Measured with the demo's defaults (400 steps, CatVersion's own hyper-parameters, 16 samples per prompt, seed 0):
# base fidelity 0.00 / 0.02 / 0.05 on the three prompts; after training 0.28 on `circle on a blue background` but 0.00
# on the red background; backgrounds 100% obeyed; squares change by 0.137 mean absolute pixel value (they shift
# colour) but carry none of the pattern. The thresholds leave room around those numbers; what fails them is a method
# that learns nothing, forgets the backgrounds, or paints the concept onto squares.
BASE_FIDELITY_MAX = 0.1
LEARNED_FIDELITY_MIN = 0.15
SQUARE_PIXEL_CHANGE_MAX = 0.2


def test_demo_learns_the_concept_and_keeps_backgrounds_and_squares(tmp_path, example_data):
    from scripts.demo import PROMPTS, main

    logdir, grid, results = main(["--data_root", example_data, "--logdir", str(tmp_path / "logs"),
                                  "--outdir", str(tmp_path / "out")])
    assert os.path.isfile(grid) and os.path.isdir(os.path.join(logdir, "checkpoints", "adapter"))
    for prompt in PROMPTS:
        assert results[prompt]["base"]["fidelity"] <= BASE_FIDELITY_MAX, prompt
        assert results[prompt]["personal"]["editability"] >= 0.8, prompt
    assert results["circle on a blue background"]["personal"]["fidelity"] >= LEARNED_FIDELITY_MIN
    square = results["square on a blue background"]["personal"]
    assert square["pixel_change"] <= SQUARE_PIXEL_CHANGE_MAX and square["fidelity"] <= BASE_FIDELITY_MAX
