"""The authors' behaviour, switched on (docs/fidelity.md): their preset, their photos, their adapters, their masked
CLIP-I layout."""
import os

import pytest
import torch

import main
from ldm.models.diffusion.ddpm import LatentDiffusion

from .conftest import TINY_FINETUNE

PHOTOS = "tests/data/authors/teddybear"


@pytest.fixture
def tf32_flags():
    """torch's TF32 flags are process-wide: put back what the test found."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("preset", [True, False], ids=["authors-preset", "ours"])
def test_training_on_their_photos_with_and_without_the_authors_preset(preset, tiny_ckpt, tmp_path, monkeypatch,
                                                                      tf32_flags):
    seen = []
    original = LatentDiffusion.get_training_conditioning

    def spy(model, captions):  # the captions the model encodes for a training step
        seen.append((list(captions), dict(model.fast)))
        return original(model, captions)

    monkeypatch.setattr(LatentDiffusion, "get_training_conditioning", spy)
    base = [TINY_FINETUNE, "configs/authors.yaml"] if preset else [TINY_FINETUNE]
    args = ["--base", *base, "-t", "--actual_resume", tiny_ckpt, "--data_root", PHOTOS, "--init_word", "teddybear",
            "-l", str(tmp_path), "-n", "authors", "lightning.trainer.max_steps=2", "data.params.train.params.repeats=1",
            "lightning.callbacks.image_logger.params.batch_frequency=1000"]
    logdir, model = main.run(*main.get_parser().parse_known_args(args))
    assert len(seen) == 2 and model.global_step == 2
    assert all(captions == ([""] * 2 if preset else ["teddybear"] * 2) for captions, _ in seen)
    fast = seen[0][1]
    per_step = dict(cache_latents=False, cache_text=False, gradient_checkpointing=False, channels_last=False, tf32=True)
    assert ({k: fast[k] for k in per_step} == per_step) == preset
    assert torch.backends.cuda.matmul.allow_tf32 == torch.backends.cudnn.allow_tf32 == preset
    adapter = torch.load(os.path.join(logdir, "checkpoints", "adapter", "pytorch_adapter.bin"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in adapter.values())
