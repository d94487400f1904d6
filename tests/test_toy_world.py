"""The shipped toy world: its base model draws what captions say, and the demo visibly learns the concept.

Thresholds come from measured distributions (README, "The toy world"); seeds are fixed, so each number below is
deterministic on a given machine.
"""
import os

import torch

from conftest import TOY_CKPT
from ldm.evaluation.toy_metrics import sample_prompt, scores


def test_the_shipped_checkpoint_is_small_and_in_sd_format():
    assert os.path.getsize(TOY_CKPT) <= 10 * 2**20
    state = torch.load(TOY_CKPT, weights_only=True)["state_dict"]
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.11.") for k in state)
    assert any(k.startswith("model.diffusion_model.") for k in state) and any(k.startswith("first_stage_model.") for k in state)


def test_base_model_draws_the_captions_colours(toy_model):
    images = sample_prompt(toy_model, "a red circle on a blue background", n=16, seed=0)
    assert scores(images, "a red circle on a blue background")["colours_match"] >= 0.8
