"""ldm/callbacks.py: what a training run shows (progress bar, model summary) and the sheets it writes."""
import os
import re
from types import SimpleNamespace

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
