"""Several concepts trained in one run: each concept's step is exactly its own one-concept step; the run's files."""
import csv
import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import main
from ldm.callbacks import TrainingGuard
from ldm.cli.train import take_back_overrides
from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.personalized import Concepts, PersonalizedBase
from ldm.util import load_model_from_config

from .conftest import TINY_FINETUNE, TINY_INFERENCE

WORDS = {"a": "circle", "b": "square"}


def _model(ckpt, concepts=None):
    config = OmegaConf.load(TINY_FINETUNE)
    if concepts:
        config.model.params.concepts = concepts
    return load_model_from_config(config, ckpt, verbose=False)


def test_two_concept_step_is_each_concepts_own_step(tiny_ckpt):
    """Same latents, timesteps and noise: the two-concept step's loss and gradient of each concept equal that concept's
    one-concept step (to 1e-6); given those gradients, one AdamW over the stacked numbers (weight decay on) steps each
    concept bit for bit as that concept's own optimizer (AdamW works element by element)."""
    torch.manual_seed(0)
    multi = _model(tiny_ckpt, WORDS)
    stacked = multi.cond_stage_model.adapters[0]
    assert stacked.control_trans.shape == (2 * 384,)  # 3 layers x (K, V) x width 64
    singles = [_model(tiny_ckpt) for _ in WORDS]
    for k, single in enumerate(singles):
        with torch.no_grad():
            single.cond_stage_model.adapters[0].control_trans.copy_(stacked.concept(k))
    g = torch.Generator().manual_seed(1)
    z, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 999, 250])
    captions, concepts = ["circle", "circle", "square", "square"], [0, 0, 1, 1]
    opts = [torch.optim.AdamW(m.trainable_parameters(), lr=1e-2) for m in [multi] + singles]
    for _ in range(2):
        losses = []
        for opt, model, rows in zip(opts, [multi] + singles, [slice(0, 4), slice(0, 2), slice(2, 4)]):
            opt.zero_grad()
            kwargs = {"concepts": concepts} if model is multi else {}
            cond = model.get_training_conditioning(captions[rows], **kwargs)
            loss = model.p_losses(z[rows], cond, t[rows], noise[rows], **kwargs)
            loss.backward()
            losses.append(loss.detach())
        total, own = losses[0], losses[1:]
        assert torch.allclose(multi.concept_losses, torch.stack(own), rtol=0, atol=1e-6)
        assert torch.allclose(total, sum(own), rtol=0, atol=1e-6)
        grads = stacked.control_trans.grad.view(2, -1)
        for k, single in enumerate(singles):
            assert torch.allclose(grads[k], single.trainable_parameters()[0].grad, rtol=0, atol=1e-6)
        # The optimizer alone, free of the gradients' last-bit differences (which Adam's first steps amplify where a
        # gradient is near zero): the stacked optimizer gets exactly the one-concept gradients.
        stacked.control_trans.grad = torch.cat([single.trainable_parameters()[0].grad for single in singles])
        for opt in opts:
            opt.step()
        for k, single in enumerate(singles):
            assert torch.equal(stacked.concept(k), single.trainable_parameters()[0])
            assert torch.equal(opts[0].state[stacked.control_trans]["exp_avg_sq"].view(2, -1)[k],
                               opts[k + 1].state[single.trainable_parameters()[0]]["exp_avg_sq"])
    assert opts[0].defaults["weight_decay"] > 0
    # Without the text cache each row is conditioned through its own concept alike.
    with torch.no_grad():
        cached = multi.get_training_conditioning(captions, concepts)
        multi.fast["cache_text"] = False
        assert torch.allclose(multi.get_training_conditioning(captions, concepts), cached, rtol=0, atol=1e-6)
        same_caption = multi.get_training_conditioning(["circle", "circle"], [0, 1])
        assert (same_caption[0] - same_caption[1]).abs().max() > 1e-3


def _folder(root, name, n, seed):
    folder = os.path.join(root, name)
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return folder


def test_a_batch_holds_batch_size_pictures_of_every_concept(tmp_path):
    roots = [_folder(tmp_path, "a", 3, 0), _folder(tmp_path, "b", 2, 1)]
    train = {"target": "ldm.data.personalized.PersonalizedBase",
             "params": {"data_root": roots, "base_class_word": list(WORDS.values()), "size": 32, "repeats": 2}}
    data = DataModuleFromConfig(batch_size=2, train=train, num_workers=0)
    data.setup()
    assert isinstance(data.train_dataset, Concepts) and len(data.train_dataset) == 6  # the longer concept's 3 x 2
    own = [PersonalizedBase(r, base_class_word=w, size=32) for r, w in zip(roots, WORDS.values())]
    for batch in data.train_dataloader():
        assert batch["concept"].tolist() == [0, 0, 1, 1]
        assert batch["caption"] == ["circle", "circle", "square", "square"]
        for row in range(4):
            c = int(batch["concept"][row])
            index = int(batch["index"][row]) - [0, 3][c]  # latent-cache keys: the second concept's start after 3
            assert 0 <= index < own[c].num_images
            picture = own[c].prepare(index, bool(batch["flip"][row]))
            assert torch.equal(batch["image"][row], torch.from_numpy(picture))


def test_a_non_finite_concept_is_named(tiny_ckpt):
    class Module:
        concept_names, concept_losses = list(WORDS), torch.tensor([0.5, float("nan")])

        def trainable_parameters(self):
            return [torch.zeros(3)]

    class Trainer:
        global_step, world_size = 7, 1

    guard = TrainingGuard(adapter_checkpoint=None)
    guard.on_before_backward(Trainer(), Module(), torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match=r"^the loss of concept b \(nan\) is not finite at step 7$"):
        guard.settle(Module())


def _argv(ckpt, logdir, roots, words, *extra):
    return ["--base", TINY_FINETUNE, "-t", "--actual_resume", str(ckpt), "--data_root", *roots, "--init_word", *words,
            "-l", str(logdir), "lightning.trainer.max_steps=2", "lightning.callbacks.image_logger.params.batch_frequency=0",
            "data.params.train.params.repeats=1", *extra]


@pytest.mark.parametrize("case", ["lengths", "same folder", "same name", "no images", "textual inversion",
                                  "textual inversion, one word"])
def test_bad_concept_lists_fail_in_one_line_before_the_model_is_built(case, tiny_ckpt, example_data, tmp_path, capsys,
                                                                        monkeypatch):
    from ldm.models.diffusion.ddpm import LatentDiffusion

    def built(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(LatentDiffusion, "__init__", built)
    other = _folder(tmp_path, "other", 2, 0)
    roots, words, extra = [example_data, other], ["circle", "square"], []
    if case == "lengths":
        words = ["circle"]
    elif case == "same folder":
        roots = [example_data, example_data + "/"]
    elif case == "same name":
        roots = [example_data, _folder(tmp_path / "elsewhere", os.path.basename(example_data), 1, 0)]
    elif case == "no images":
        os.makedirs(tmp_path / "empty")
        roots = [example_data, str(tmp_path / "empty")]
    elif case == "textual inversion":
        extra = ["--base", "configs/tiny/v1-finetune-textual-inversion.yaml"]
    elif case == "textual inversion, one word":
        words, extra = ["circle"], ["--base", "configs/tiny/v1-finetune-textual-inversion.yaml"]
    with pytest.raises(SystemExit) as e:
        main.main(_argv(tiny_ckpt, tmp_path / "logs", roots, words, *extra))
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    expected = {
        "lengths": "error: 2 concept folders (--data_root) but 1 base class words (--init_word); give one word per "
                   "folder, in the same order",
        "same folder": f"error: --data_root {example_data} and {example_data}/ are the same folder; give each concept once",
        "same name": f"error: --data_root {example_data} and {roots[1]} share the folder name 'example', which names the "
                     "concept's checkpoints/example/; rename one",
        "no images": f"error: no images (.jpg, .jpeg, .png, .webp) in {roots[1]}; put the images there",
        "textual inversion": "error: Textual Inversion trains one concept per run; give one --init_word (and one --data_root)",
        "textual inversion, one word": "error: Textual Inversion trains one concept per run; give one --data_root (and one "
                                       "--init_word)",
    }[case]
    assert err == expected
    assert not os.path.exists(tmp_path / "logs")


def test_two_concept_run_through_main_py(tiny_ckpt, example_data, tmp_path):
    """main.py trains two concepts: each one's adapter in both formats under checkpoints/<folder>/, one sample column
    per concept, a loss per concept; both adapters sample stacked in txt2img; the run resumes."""
    from ldm.cli import txt2img
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder
    from ldm.sampling import load_model
    from ldm.weights import read_metadata

    other = _folder(tmp_path, "square", 3, 5)
    logs = tmp_path / "logs"
    argv = _argv(tiny_ckpt, logs, [example_data, other], ["circle", "square"],
                 "lightning.callbacks.image_logger.params.batch_frequency=2", "lightning.modelcheckpoint.params.every_n_train_steps=2",
                 "lightning.callbacks.image_logger.params.ddim_steps=1", "lightning.callbacks.image_logger.params.max_images=1")
    done = subprocess.run([sys.executable, "main.py", *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Trainable params: 768 " in done.stdout  # two concepts x 384
    assert "Setting learning rate to 1.00e-02 = 1 (accumulate_grad_batches) * 1 (num_gpus) * 2 (batchsize)" in done.stdout
    (logdir,) = glob.glob(str(logs / "example+1more*"))
    ck = os.path.join(logdir, "checkpoints")
    enc = FrozenCLIPEmbedder(**OmegaConf.to_container(OmegaConf.load(TINY_FINETUNE).model.params.cond_stage_config.params))
    numbers = {}
    for name, word in [("example", "circle"), ("square", "square")]:
        folder = os.path.join(ck, name, "adapter")
        assert sorted(os.listdir(folder)) == ["adapter_config.json", "catversion.safetensors", "pytorch_adapter.bin"]
        assert read_metadata(os.path.join(folder, "catversion.safetensors"))["base_class_word"] == word
        a = enc.adapter_load(os.path.join(folder, "pytorch_adapter.bin"))
        numbers[name] = a.control_trans.detach().clone()
        assert torch.equal(enc.adapter_load(folder).control_trans, numbers[name])
        assert os.path.isdir(os.path.join(ck, name, "adapter_gs-1"))
    assert not torch.equal(numbers["example"], numbers["square"])
    for key in ("samples", "samples_base"):  # two 256-px cells in a row although max_images=1
        assert Image.open(os.path.join(logdir, "images", "train", f"{key}_gs-000002.png")).size[0] > 2 * 256
    with open(os.path.join(logdir, "csv", "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert {"train/loss_simple/example", "train/loss_simple/square"} <= set(rows[0])

    adapters = [os.path.join(ck, name, "adapter") for name in numbers]
    stacked = load_model(OmegaConf.load(TINY_INFERENCE), tiny_ckpt, "cpu", adapters, verbose=False).cond_stage_model.adapters
    assert [torch.equal(a.control_trans, n) for a, n in zip(stacked, numbers.values(), strict=True)] == [True, True]
    out = tmp_path / "samples"
    results = txt2img.main(["--config", TINY_INFERENCE, "--ckpt_path", tiny_ckpt, "--prompt", "a circle and a square",
                            "--embedding_path", *adapters, "--outdir", str(out), "--H", "64", "--W", "64",
                            "--ddim_steps", "2", "--uc_dir", "", "--device", "cpu"])
    assert len(results) == 1 and glob.glob(str(out / "*" / "*.png"))

    logdir_resumed, model = main.run(*main.get_parser().parse_known_args(["-t", "--resume", logdir, "lightning.trainer.max_steps=3"]))
    assert logdir_resumed == logdir and model.concept_names == ["example", "square"]
    assert torch.load(os.path.join(ck, "last.ckpt"), weights_only=False)["global_step"] == 3


def test_concepts_benchmark_projects_and_compares(tmp_path, monkeypatch, capsys):
    """Concepts per hour from each run's fixed cost and step time, against the one-concept run repeated N times;
    bad counts are refused in one line."""
    import json

    from ldm.cli import concepts_benchmark

    def fake_run(opt, n, workdir):  # fixed 20 s, then 0.1 s + 0.05 s per extra concept per step
        step = 0.1 + 0.05 * (n - 1)
        return {"concepts": n, "step_s": step, "fixed_s": 20.0, "projected_s": 20.0 + opt.train_steps * step, "peak_mb": 1.0}

    monkeypatch.setattr(concepts_benchmark, "measure_run", fake_run)
    out = str(tmp_path / "bench")
    concepts_benchmark.main(["--config", TINY_FINETUNE, "--ckpt", TINY_FINETUNE, "--counts", "1", "4", "--out", out])
    rows = json.load(open(out + ".json"))["rows"]
    assert rows[1]["concepts_per_hour"] == pytest.approx(3600 * 4 / (20 + 1000 * 0.25))
    assert rows[1]["sequential_concepts_per_hour"] == pytest.approx(3600 / 120)
    assert rows[1]["speedup"] == pytest.approx(4 * 120 / 270)
    assert Image.open(out + ".png").size == (560, 380)  # ldm.report.bar_chart: 2 counts x 2 series
    with pytest.raises(SystemExit):
        concepts_benchmark.main(["--counts", "2", "4", "--out", out])
    assert capsys.readouterr().err.strip().endswith("--counts [2, 4] must start with 1 (the sequential runs' yardstick) and be >= 1")


def test_overrides_after_the_concept_lists_stay_overrides():
    opt, unknown = main.get_parser().parse_known_args(
        ["--data_root", "a", "b", "--init_word", "x", "y", "lightning.trainer.max_steps=2", "data.params.batch_size=1"])
    assert opt.init_word == ["x", "y", "lightning.trainer.max_steps=2", "data.params.batch_size=1"]  # argparse's nargs="+"
    assert take_back_overrides(opt, unknown) == ["lightning.trainer.max_steps=2", "data.params.batch_size=1"]
    assert (opt.data_root, opt.init_word) == (["a", "b"], ["x", "y"])
