"""Training with several processes (Lightning's DDP; over gloo on this CPU, as over NCCL on several GPUs)."""
import csv
import glob
import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

import main
from ldm.cli.txt2img import main as txt2img_main
from ldm.data.datamodule import ResumableSampler
from ldm.modules.encoders.modules import FrozenCLIPEmbedder

from .conftest import TINY_FINETUNE, TINY_INFERENCE
from .test_main import _train_args

DUMP_ENV = "CATVERSION_TEST_DUMP"  # where DumpRank writes, set by the test for the processes it starts


class DumpRank(pl.Callback):
    """Test-only, named in a config's lightning.callbacks: what each rank holds, to $CATVERSION_TEST_DUMP/rank<r>.pt."""

    def __init__(self):
        self.adapters = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.adapters.append([p.detach().clone() for p in pl_module.trainable_parameters()])

    def on_train_end(self, trainer, pl_module):
        dump = {"adapters": self.adapters, "shard": trainer.datamodule.sampler.shard(0), "world_size": trainer.world_size}
        torch.save(dump, os.path.join(os.environ[DUMP_ENV], f"rank{trainer.global_rank}.pt"))


def test_each_rank_takes_a_disjoint_shard_of_the_same_order():
    one = ResumableSampler(7, 2, seed=5, item_seeds=False)
    order = one.permutation(3).tolist()
    assert list(one.shard(3)) == order and len(one) == 7  # one process: the order itself (single-process resume)
    shards = [ResumableSampler(7, 2, seed=5, item_seeds=False, rank=r, world_size=3) for r in range(3)]
    got = [s.shard(3).tolist() for s in shards]
    assert [len(s) for s in shards] == [3, 3, 3]  # padded to 9 with the order's first items, as DistributedSampler
    padded = order + order[:2]
    assert got == [padded[0::3], padded[1::3], padded[2::3]]
    assert set(got[0] + got[1] + got[2]) == set(order)  # every item; only the 2 padding items twice
    # where a rank stands after k batches counts its own shard: 3 items = 2 batches per data epoch
    assert shards[1].position_after(3) == (1, 2)


def _run_ddp(tiny_ckpt, example_data, tmp_path, settings, *extra):
    """main.py with 2 processes for 4 steps; the trainer settings from a config file (settings) or overrides (extra)."""
    config = tmp_path / "ddp.yaml"
    OmegaConf.save({"lightning": {"trainer": settings, "callbacks": {"dump": {"target": "tests.test_distributed.DumpRank"}}}},
                   config)
    args = _train_args(tiny_ckpt, example_data, tmp_path / "logs", 4, 2) + ["--allow_any_target"]  # the test-only callback
    args[1:2] = [TINY_FINETUNE, str(config)]
    (tmp_path / "dump").mkdir()
    env = {**os.environ, DUMP_ENV: str(tmp_path / "dump")}
    proc = subprocess.run([sys.executable, "main.py", *args, *extra], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, [torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _check_run(proc, dumps, tmp_path):
    assert proc.stdout.count("Setting learning rate to 2.00e-02 = 1 (accumulate_grad_batches) * 2 (num_gpus) * 2 "
                             "(batchsize) * 5.00e-03 (base_lr)") == 1  # printed once, by rank zero
    (logdir,) = glob.glob(str(tmp_path / "logs" / "*"))  # one run folder: both ranks named the same one
    assert f"Run folder: {logdir}" in proc.stdout
    assert len(glob.glob(os.path.join(logdir, "configs", "*.yaml"))) == 2
    ck = os.path.join(logdir, "checkpoints")
    assert {"adapter_gs-1", "adapter_gs-3", "adapter", "last.ckpt"} <= set(os.listdir(ck))
    assert not glob.glob(os.path.join(logdir, "**", ".*.tmp"), recursive=True)
    with open(os.path.join(logdir, "csv", "metrics.csv")) as f:
        assert [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss_simple")] == [0, 1, 2, 3]
    # each rank its own half of the data order; the adapters the same on both ranks after every step
    assert [d["world_size"] for d in dumps] == [2, 2]
    shards = [d["shard"].tolist() for d in dumps]
    assert len(shards[0]) == 10 and sorted(shards[0] + shards[1]) == list(range(20))
    steps = [d["adapters"] for d in dumps]
    assert len(steps[0]) == len(steps[1]) == 4
    for a, b in zip(*steps):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(steps[0][0][0], steps[0][-1][0])  # and it trained
    enc = FrozenCLIPEmbedder(**OmegaConf.to_container(OmegaConf.load(TINY_FINETUNE).model.params.cond_stage_config.params))
    enc.adapter_load(os.path.join(ck, "adapter"))
    assert all(torch.equal(x, y) for x, y in zip(enc.adapter_parameters(), steps[0][-1], strict=True))
    assert torch.load(os.path.join(ck, "last.ckpt"), weights_only=True)["global_step"] == 4
    return logdir


def test_two_processes_from_a_config_file(tiny_ckpt, example_data, tmp_path):
    proc, dumps = _run_ddp(tiny_ckpt, example_data, tmp_path, {"accelerator": "cpu", "devices": 2, "strategy": "ddp"})
    logdir = _check_run(proc, dumps, tmp_path)
    # the adapter samples in scripts/txt2img.py, and it changes the image
    common = ["--config", TINY_INFERENCE, "--ckpt_path", tiny_ckpt, "--H", "64", "--W", "64", "--ddim_steps", "2",
              "--uc_dir", str(tmp_path / "uc"), "--device", "cpu", "--prompt", "circle", "--seed", "3",
              "--embedding_path", os.path.join(logdir, "checkpoints", "adapter")]
    with_adapter = txt2img_main([*common, "--outdir", str(tmp_path / "a")])["circle"]["images"][0]
    without = txt2img_main([*common, "--outdir", str(tmp_path / "b"), "--strength", "0"])["circle"]["images"][0]
    with open(with_adapter, "rb") as a, open(without, "rb") as b:
        assert a.read() != b.read()


def test_two_processes_from_overrides(tiny_ckpt, example_data, tmp_path):
    proc, dumps = _run_ddp(tiny_ckpt, example_data, tmp_path, {}, "lightning.trainer.accelerator=cpu",
                           "lightning.trainer.devices=2", "lightning.trainer.strategy=ddp")
    _check_run(proc, dumps, tmp_path)


@pytest.mark.parametrize("extra, message", [
    (["--gpus", "0,1"], "error: training asks for GPU(s) 0, 1 but this machine has no CUDA device; drop --gpus (and "
                        "accelerator) to train on the CPU (fine for tiny configs; SD v1.5 takes minutes a step)"),
    (["lightning.trainer.devices=64"], f"error: lightning.trainer.devices=64 asks for 64 CPU processes, but this machine has "
                                       f"{os.cpu_count()} cores; ask for at most that many"),
    (["lightning.trainer.strategy=dpp"], "error: lightning.trainer: You selected an invalid strategy name: `strategy='dpp'`."),
    (["--gpus", "0,", "lightning.trainer.devices=2"], "error: --gpus 0, and lightning.trainer.devices/accelerator both "
                                                      "choose the devices; keep one of them"),
])
def test_bad_hardware_settings_are_one_line_before_the_model_loads(tiny_ckpt, example_data, tmp_path, capsys, extra, message):
    if torch.cuda.is_available() and extra[0] == "--gpus":
        pytest.skip("a CUDA machine has GPUs")
    with pytest.raises(SystemExit) as e:
        main.main(_train_args(tiny_ckpt, example_data, tmp_path, 2, 1) + extra)
    captured = capsys.readouterr()
    assert e.value.code == 2 and captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err
    assert "Loaded" not in captured.out and not os.listdir(tmp_path)  # no model read, no run folder

