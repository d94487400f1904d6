"""One place that builds the tiny models every test uses (generated, never downloaded)."""
import os
import sys

import pytest
import torch
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # configs and scripts are addressed relative to the repository root
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_INFERENCE = "configs/tiny/v1-inference.yaml"
TINY_FINETUNE = "configs/tiny/v1-finetune.yaml"


@pytest.fixture(scope="session")
def tiny_config():
    return OmegaConf.load(TINY_INFERENCE)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The tiny SD checkpoint as `scripts/make_tiny_model.py` writes it."""
    from scripts.make_tiny_model import main as make_tiny_model

    path = str(tmp_path_factory.mktemp("tiny") / "tiny-sd.ckpt")
    make_tiny_model(["--out", path])
    return path


@pytest.fixture(scope="session")
def example_data(tmp_path_factory):
    from ldm.data.toy_scenes import write_concept_folder

    folder = tmp_path_factory.mktemp("data") / "example"
    write_concept_folder(str(folder))
    return str(folder)


@pytest.fixture
def tiny_model(tiny_ckpt):
    """A fresh tiny LatentDiffusion loaded from the checkpoint (fresh per test: tests may train or patch it)."""
    from ldm.util import load_model_from_config

    return load_model_from_config(OmegaConf.load(TINY_INFERENCE), tiny_ckpt, verbose=False)


@pytest.fixture
def tiny_finetune_model(tiny_ckpt):
    """The tiny model with the CatVersion adapter of the finetune config (default knobs)."""
    from ldm.util import load_model_from_config

    return load_model_from_config(OmegaConf.load(TINY_FINETUNE), tiny_ckpt, verbose=False)
