"""One place that builds the tiny models every test uses (generated, never downloaded)."""
import json
import os
import sys

import pytest
import torch
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # configs and scripts are addressed relative to the repository root
# One thread: the tiny models' operations are too small to share, and several threads collapse (tens of times
# slower) as soon as another process competes for the two cores.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"  # and the same in the CLIs the tests start, so their numbers match bit for bit

TINY_INFERENCE = "configs/tiny/v1-inference.yaml"
TINY_FINETUNE = "configs/tiny/v1-finetune.yaml"
TOY_INFERENCE = "configs/toy/v1-inference.yaml"
TOY_CKPT = "models/toy/toy-sd.ckpt"  # shipped: the toy world's trained model (scripts/train_toy_base.py)
# The name pickle records for the builtin open, which a refused pickle "would call": io.open up to 3.11, _io.open after.
PICKLED_OPEN = f"{open.__module__}.{open.__qualname__}"
REFERENCE_KEYS = "tests/data/sd-v1-5-unet-vae-keys.json"  # the real SD v1.5 UNet and VAE keys and shapes


def reference_keys(prefix):
    """The real SD v1.5 checkpoint's keys (with their shapes) that start with `prefix`."""
    with open(REFERENCE_KEYS) as f:
        return {k: v for k, v in json.load(f).items() if k.startswith(prefix)}


@pytest.fixture(scope="session")
def tiny_config():
    return OmegaConf.load(TINY_INFERENCE)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The tiny SD checkpoint as `scripts/make_tiny_model.py` writes it."""
    from ldm.cli.make_tiny_model import main as make_tiny_model

    path = str(tmp_path_factory.mktemp("tiny") / "tiny-sd.ckpt")
    make_tiny_model(["--out", path])
    return path


@pytest.fixture(scope="session")
def example_data(tmp_path_factory):
    """The demo concept's 5 photos as `scripts/make_example_data.py` draws them."""
    from ldm.cli.make_example_data import main as make_example_data

    folder = str(tmp_path_factory.mktemp("data") / "example")
    make_example_data(["--out", folder])
    return folder


@pytest.fixture
def tiny_model(tiny_ckpt):
    """A fresh tiny LatentDiffusion loaded from the checkpoint (fresh per test: tests may train or patch it)."""
    from ldm.util import load_model_from_config

    return load_model_from_config(OmegaConf.load(TINY_INFERENCE), tiny_ckpt, verbose=False)


@pytest.fixture(scope="session")
def toy_model():
    """The shipped toy-world model (read-only: tests that train load their own)."""
    from ldm.util import load_model_from_config

    return load_model_from_config(OmegaConf.load(TOY_INFERENCE), TOY_CKPT, verbose=False).eval()


@pytest.fixture
def tiny_finetune_model(tiny_ckpt):
    """The tiny model with the CatVersion adapter of the finetune config (default knobs)."""
    from ldm.util import load_model_from_config

    return load_model_from_config(OmegaConf.load(TINY_FINETUNE), tiny_ckpt, verbose=False)


# --- independent implementations (test-only dependencies) built from our checkpoints -------------------
def diffusers_models(ckpt_path):
    """(UNet2DConditionModel, AutoencoderKL, CLIPTextModel) from our SD checkpoint through diffusers' own converters."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.modules.encoders.modules import VIT_L_TEXT

    from ldm.checkpoint import read_state_dict

    ckpt = read_state_dict(ckpt_path)
    original = OmegaConf.to_container(OmegaConf.load(TINY_INFERENCE))
    unet_config = create_unet_diffusers_config_from_ldm(original, ckpt)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, unet_config), strict=True)
    vae_config = create_vae_diffusers_config_from_ldm(original, ckpt)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, vae_config), strict=True)
    text_config = CLIPTextConfig(**{**VIT_L_TEXT, **original["model"]["params"]["cond_stage_config"]["params"]["text_config"]})
    text_encoder = CLIPTextModel._from_config(text_config, attn_implementation="sdpa")
    # diffusers keeps transformers 4.x's `text_model.` level; transformers 5.x models have none.
    clip = convert_ldm_clip_checkpoint(ckpt)
    text_encoder.load_state_dict({k.removeprefix("text_model."): v for k, v in clip.items()}, strict=True)
    return unet.eval(), vae.eval(), text_encoder.eval()


def randomize_(model, std, seed=0):
    """Non-trivial weights everywhere: zero-initialised output convs would hide bugs in whole branches."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if is_norm_scale else 0.0))
    return model
