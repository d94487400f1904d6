import copy
import csv
import glob
import os

import pytest
import torch
from omegaconf import OmegaConf

import main
from ldm.checkpoint import keys_from_sd, read_state_dict

from .conftest import TINY_FINETUNE


def test_reference_learning_rate_on_one_device_batch_2(capsys):
    config = OmegaConf.load("configs/stable-diffusion/v1-finetune.yaml")
    lr, line = main.learning_rate(config, config.lightning.trainer, ngpu=1)
    assert lr == pytest.approx(1.0e-02) and config.data.params.batch_size == 2
    assert line.startswith("Setting learning rate to 1.00e-02 = 1 (accumulate_grad_batches) * 1 (num_gpus) * 2 (batchsize)")


def _train_args(tiny_ckpt, example_data, logdir, steps, every):
    return [
        "--base", TINY_FINETUNE, "-t", "--actual_resume", tiny_ckpt, "--data_root", example_data,
        "--init_word", "circle", "-l", str(logdir), "-n", "test",
        f"lightning.trainer.max_steps={steps}", f"lightning.modelcheckpoint.params.every_n_train_steps={every}",
        f"lightning.callbacks.image_logger.params.batch_frequency={every}",
        "lightning.callbacks.image_logger.params.ddim_steps=2", "lightning.callbacks.image_logger.params.max_images=2",
        "data.params.train.params.repeats=4",
    ]


def test_tiny_training_run(tiny_ckpt, example_data, tmp_path, capsys):
    logdir, model = main.run(*main.get_parser().parse_known_args(_train_args(tiny_ckpt, example_data, tmp_path, 6, 3)))
    assert "Setting learning rate to 1.00e-02" in capsys.readouterr().out
    assert os.path.basename(logdir).startswith("example") and logdir.endswith("_test")
    # only the adapter trained: every frozen tensor is bitwise what the checkpoint holds
    base = keys_from_sd(read_state_dict(tiny_ckpt))
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    ck = os.path.join(logdir, "checkpoints")
    for name in ("adapter_gs-2", "adapter_gs-5", "adapter"):
        assert sorted(os.listdir(os.path.join(ck, name))) == ["adapter_config.json", "catversion.safetensors", "pytorch_adapter.bin"]
    assert os.path.isfile(os.path.join(ck, "last.ckpt"))
    # the final adapter is the trained one, and it moved away from its initialisation
    enc = model.cond_stage_model
    trained = [p.detach().clone() for p in enc.adapter_parameters()]
    enc.adapter_load(os.path.join(ck, "adapter_gs-2"))
    assert not torch.equal(trained[0], enc.adapter_parameters()[0])
    enc.adapter_load(os.path.join(ck, "adapter"))
    assert torch.equal(trained[0], enc.adapter_parameters()[0])
    assert glob.glob(os.path.join(logdir, "configs", "*-project.yaml"))
    assert os.path.isfile(os.path.join(logdir, "images", "train", "samples_gs-000003.png"))
    assert os.path.isfile(os.path.join(logdir, "images", "train", "samples_base_gs-000006.png"))
    with open(os.path.join(logdir, "csv", "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_simple")]
    assert len(rows) >= 5
    assert glob.glob(os.path.join(logdir, "tensorboard", "events.out.tfevents.*"))



def test_resume_continues_at_next_step_with_same_state(tiny_ckpt, example_data, tmp_path):
    import pytorch_lightning as pl

    class Probe(pl.Callback):
        """The adapter and AdamW state in memory when a run's first step starts and when the run ends."""

        def __init__(self):
            self.seen = {}

        def capture(self, key, trainer, pl_module):
            self.seen[key] = {"step": trainer.global_step,
                              "adapter": [p.detach().clone() for p in pl_module.trainable_parameters()],
                              "opt": copy.deepcopy(trainer.optimizers[0].state_dict())}  # AdamW updates in place

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if "first" not in self.seen:
                self.capture("first", trainer, pl_module)

        def on_train_end(self, trainer, pl_module):
            self.capture("end", trainer, pl_module)

    first = Probe()
    opt, unknown = main.get_parser().parse_known_args(_train_args(tiny_ckpt, example_data, tmp_path, 4, 2))
    logdir, _ = main.run(opt, unknown, extra_callbacks=[first])
    held = first.seen["end"]  # what the interrupted run held in memory, not what its file says
    assert held["step"] == 4
    assert torch.load(os.path.join(logdir, "checkpoints", "last.ckpt"), weights_only=True)["global_step"] == 4

    resumed = Probe()
    opt, unknown = main.get_parser().parse_known_args(["-t", "--resume", logdir, "lightning.trainer.max_steps=6"])
    _, model = main.run(opt, unknown, extra_callbacks=[resumed])
    seen = resumed.seen["first"]
    assert seen["step"] == 4  # the first step run after resuming is step k + 1 (global_step k before it)
    assert all(torch.equal(a, b) for a, b in zip(seen["adapter"], held["adapter"], strict=True))
    state, ref = seen["opt"]["state"][0], held["opt"]["state"][0]
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(state[key], ref[key]), key
    final = torch.load(os.path.join(logdir, "checkpoints", "last.ckpt"), weights_only=True)
    assert final["global_step"] == 6
    # the CSV log keeps the rows from before the interruption (Lightning alone would have deleted them)
    with open(os.path.join(logdir, "csv", "metrics.csv")) as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss_simple")]
    assert steps == list(range(6)), steps


def test_unknown_override_key_is_refused(tiny_ckpt, example_data, tmp_path, capsys):
    args = _train_args(tiny_ckpt, example_data, tmp_path, 2, 1) + ["lightning.trainer.max_step=3"]
    with pytest.raises(SystemExit) as e:
        main.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: unknown config key 'lightning.trainer.max_step' in override 'lightning.trainer.max_step=3'; "
                   "did you mean lightning.trainer.max_steps?")


def test_nan_loss_stops_with_the_last_good_adapter(tiny_ckpt, example_data, tmp_path, capsys):
    import pytorch_lightning as pl

    seen = {}

    class Poison(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            params = pl_module.trainable_parameters()
            if trainer.global_step == 2:
                seen["good"] = [p.detach().clone() for p in params]
            if trainer.global_step == 3:
                with torch.no_grad():
                    params[0].fill_(float("nan"))

    opt, unknown = main.get_parser().parse_known_args(_train_args(tiny_ckpt, example_data, tmp_path, 6, 100))
    with pytest.raises(main.TrainingStopped) as e:
        main.run(opt, unknown, extra_callbacks=[Poison()])
    assert e.value.code == 3
    assert str(e.value).startswith("training stopped: the loss is nan at step 3; the last good adapter is in ")
    folder = str(e.value).split("the last good adapter is in ")[1].split(";")[0]
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    enc = FrozenCLIPEmbedder(**OmegaConf.to_container(OmegaConf.load(TINY_FINETUNE).model.params.cond_stage_config.params))
    enc.adapter_load(folder)
    assert torch.equal(enc.adapter_parameters()[0], seen["good"][0])


def test_sigint_saves_and_resume_finishes(tiny_ckpt, example_data, tmp_path):
    """A real run in a subprocess gets SIGINT mid-way, saves a resumable checkpoint and its adapter and exits 130;
    `--resume` then reaches the planned step count, bit for bit where an uninterrupted run gets (adapter, AdamW)."""
    import signal
    import subprocess
    import sys
    import time

    import pytorch_lightning as pl

    planned = 30  # the signal goes out as soon as step 4's snapshot exists, a step or two before the run would stop
    args = _train_args(tiny_ckpt, example_data, tmp_path / "interrupted", planned, 2)
    proc = subprocess.Popen([sys.executable, "main.py", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not glob.glob(str(tmp_path / "interrupted" / "*" / "checkpoints" / "adapter_gs-3")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    logdir = glob.glob(str(tmp_path / "interrupted" / "*"))[0]
    assert f"continue with: python main.py --resume {logdir}" in err and "Traceback" not in err
    interrupted = torch.load(os.path.join(logdir, "checkpoints", "last.ckpt"), weights_only=True)
    step = interrupted["global_step"]
    assert 4 <= step < planned
    assert not glob.glob(os.path.join(logdir, "checkpoints", "*.tmp"))
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    enc = FrozenCLIPEmbedder(**OmegaConf.to_container(OmegaConf.load(TINY_FINETUNE).model.params.cond_stage_config.params))
    enc.adapter_load(os.path.join(logdir, "checkpoints", "adapter"))
    saved_adapter = [p.detach().clone() for p in enc.adapter_parameters()]
    _, resumed = main.run(*main.get_parser().parse_known_args(["-t", "--resume", logdir]))
    final = torch.load(os.path.join(logdir, "checkpoints", "last.ckpt"), weights_only=True)
    assert final["global_step"] == planned

    adapters = {}

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            adapters[trainer.global_step] = [p.detach().clone() for p in pl_module.trainable_parameters()]

    opt, unknown = main.get_parser().parse_known_args(_train_args(tiny_ckpt, example_data, tmp_path / "straight", planned, 2))
    straight_dir, straight = main.run(opt, unknown, extra_callbacks=[Record()])
    # What the interrupted process saved is what an uninterrupted run holds after that step ...
    assert all(torch.equal(a, b) for a, b in zip(interrupted["trainable"], adapters[step], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(saved_adapter, adapters[step], strict=True))
    # ... and the resumed run ends where the uninterrupted one does.
    assert all(torch.equal(a, b) for a, b in zip(resumed.trainable_parameters(), straight.trainable_parameters(), strict=True))
    reference = torch.load(os.path.join(straight_dir, "checkpoints", "last.ckpt"), weights_only=True)
    got, expected = final["optimizer_states"][0]["state"], reference["optimizer_states"][0]["state"]
    assert all(torch.equal(got[i][k], expected[i][k]) for i in expected for k in ("exp_avg", "exp_avg_sq", "step"))


def test_without_lr_scaling_the_base_rate_is_used_as_is():
    config = OmegaConf.load("configs/stable-diffusion/v1-finetune.yaml")
    lr, line = main.learning_rate(config, {"accumulate_grad_batches": 4}, ngpu=8, scale_lr=False)
    assert lr == config.model.base_learning_rate == pytest.approx(5.0e-03)
    assert line == "++++ NOT USING LR SCALING ++++\nSetting learning rate to 5.00e-03"


def test_resume_from_a_run_without_a_checkpoint_or_from_another_file_is_refused(tmp_path):
    from ldm.cli.train import resolve_resume
    from ldm.weights import WeightsError

    run = tmp_path / "logs" / "2026-12-01T00-00-00_test"
    run.mkdir(parents=True)
    opt = type("Opt", (), {"resume": str(run), "logdir": str(tmp_path / "logs")})()
    with pytest.raises(ValueError, match=f"cannot resume: {run}/checkpoints/last.ckpt not found; the run saved no "
                                         "checkpoint yet, start it again without --resume"):
        resolve_resume(opt)
    weights = tmp_path / "adapter.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(2)}}, weights)
    with pytest.raises(WeightsError, match=f"cannot resume: {weights} is not a checkpoint of a training run"):
        main.check_resumable(str(weights))
