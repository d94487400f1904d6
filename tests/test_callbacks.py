"""ldm/callbacks.py: what a training run shows (progress bar, model summary) and the sheets it writes."""
import os
import re
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf
from PIL import Image

import main
from ldm.callbacks import AdapterSummary
from ldm.util import instantiate_from_config

from .test_main import _train_args


def test_run_shows_steps_of_max_steps_with_the_loss_and_counts_the_adapter(tiny_ckpt, example_data, tmp_path, capsys):
    logdir, model = main.run(*main.get_parser().parse_known_args(_train_args(tiny_ckpt, example_data, tmp_path, 4, 2)))
    out = capsys.readouterr().out.replace("\r", "\n")
    # the bar counts optimizer steps of the whole run, not batches of an epoch, and names the loss shortly
    assert re.search(r"^step 4/4, loss=\d\.\d+, lr=1\.00e-02 \|", out, re.M), out
    assert "Epoch" not in out and "train/loss_simple" not in out
    adapter = sum(p.numel() for p in model.trainable_parameters())
    assert adapter == 3 * 2 * 64  # K and V of one token, width 64, in layers 9-11
    assert re.findall(r"Trainable params: ([\d,]+)", out) == [f"{adapter:,}"]  # Lightning's own summary said 0
    frozen = sum(p.numel() for p in model.parameters())
    assert f"Frozen params: {frozen:,}" in out
    # the ImageLogger's sheets: 2 captions of 64 px, enlarged to 256 px cells, with label strips
    with Image.open(os.path.join(logdir, "images", "train", "samples_gs-000002.png")) as im:
        assert im.size[0] > 2 * 256 and im.size[1] > 256


def test_summary_counts_textual_inversion_vectors_once(capsys):
    config = OmegaConf.load("configs/tiny/v1-finetune-textual-inversion.yaml")
    model = instantiate_from_config(config.model)
    AdapterSummary().on_fit_start(SimpleNamespace(is_global_zero=True), model)
    out = capsys.readouterr().out
    assert "Trainable params: 64 " in out  # one vector of the text encoder's width
    assert f"Frozen params: {sum(p.numel() for p in model.parameters()):,}" in out


def _rank(world_size=2, rank=1, **strategy):
    """A stand-in trainer of one rank of a multi-process run: its strategy answers as the other ranks would."""
    return SimpleNamespace(world_size=world_size, global_rank=rank, is_global_zero=rank == 0, global_step=3, max_steps=10,
                           should_stop=False, strategy=SimpleNamespace(**strategy))


def test_guard_stops_every_rank_when_any_rank_has_a_nan_loss_or_a_signal():
    import torch

    from ldm.callbacks import AdapterCheckpoint, TrainingGuard

    module = SimpleNamespace(trainable_parameters=lambda: [torch.nn.Parameter(torch.ones(2))])
    guard = TrainingGuard(AdapterCheckpoint("unused", every_n_train_steps=0))
    # this rank's loss is finite, another's was not: the mean over the ranks decides, the same on all
    trainer = _rank(reduce=lambda loss, reduce_op: torch.tensor(float("nan")) if reduce_op == "mean" else None)
    guard.on_before_backward(trainer, module, torch.tensor(0.5))
    with pytest.raises(FloatingPointError, match=r"^the loss is nan at step 3$"):
        guard.settle(module)
    # no signal here, one elsewhere: this rank stops after the same step as that one
    trainer = _rank(reduce_boolean_decision=lambda decision, all: (decision, all) == (False, False))
    guard.on_train_batch_end(trainer, module, None, None, 0)
    assert trainer.should_stop and guard.signal is None


def test_only_rank_zero_writes_last_ckpt(tmp_path):
    from ldm.callbacks import AdapterCheckpoint

    saved = []
    trainer = _rank()
    trainer.save_checkpoint = lambda path, weights_only: saved.append(path)  # Lightning's: writes on rank zero only
    AdapterCheckpoint(str(tmp_path)).on_train_end(trainer, None)
    # rank 1 takes part in the save (Lightning gathers and waits there), but renames no empty file over rank 0's
    assert saved == [str(tmp_path / "last.ckpt")] and os.listdir(tmp_path) == []
