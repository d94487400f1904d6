"""scripts/gpu_report.py runs end to end on the CPU with the tiny model (so that a GPU run does not fail on a typo),
and refuses at once, in one line, to run on a CUDA device that is not there."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_on_cpu_writes_every_section(tmp_path):
    out = tmp_path / "report"
    argv = [sys.executable, os.path.join(ROOT, "scripts", "gpu_report.py"), "--device", "cpu",
            "--config", "configs/tiny/v1-finetune.yaml", "--H", "64", "--W", "64", "--steps", "2", "--warmup", "1",
            "--concepts", "1", "2", "--sample_batches", "1", "--sample_steps", "5", "--lightning_steps", "6",
            "--lightning_every", "2", "--no-compile", "--out_dir", str(out)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((out / "gpu_report.json").read_text())
    for section in ("environment", "training", "fast_options", "diffusers", "profile", "concepts", "sampling", "lightning_run", "loading",
                    "lightning_every_step"):
        assert "error" not in data[section] and "skipped" not in data[section], (section, data[section])
    train = data["training"]
    assert set(train) == {"reference", "fast fp32", "fast fp32 + checkpointing", "fast bf16", "fast bf16 + checkpointing",
                          "fast fp32 + TF32"}
    assert all(row["step_s"] > 0 and row["peak_mb"] > 0 for row in train.values())
    assert data["diffusers"]["diffusers UNet alone (fp32)"]["step_s"] > 0
    smoke = data["fast_options"]
    assert list(smoke) == ["fp32", "channels_last", "gradient_checkpointing", "auto", "bf16", "all_ok"] and smoke["all_ok"]
    assert all(len(row["losses"]) == 3 for name, row in smoke.items() if name != "all_ok")
    assert smoke["auto"]["max_rel_diff"] == 0.0  # "auto" is fp32 with nothing on, on a CPU
    # many concepts: the speed-up is computed from the step times it reports
    c1, c2 = data["concepts"]["1"], data["concepts"]["2"]
    assert c2["images_per_step"] == 4 and c2["speedup_vs_sequential"] == pytest.approx(2 * c1["step_s"] / c2["step_s"])
    # sampling: the same weights and x_T in both samplers give the same images (fp32, CPU)
    assert data["sampling"]["1"]["max_abs_pixel_diff"] < 1e-3
    run = data["lightning_run"]
    assert run["projected_1000_steps_s"] == pytest.approx(run["fixed_s"] + 1000 * run["step_s"])
    assert "2 (batchsize)" in run["lr_line"]
    assert data["lightning_every_step"]["overrides"][-1] == "lightning.trainer.log_every_n_steps=1"
    for fmt in ("ckpt", "safetensors", "diffusers folder"):
        assert data["loading"][fmt]["weights_mb"] > 0 and data["loading"][fmt]["load_s"] > 0
    assert data["compile: fast bf16 + compile"] == {"skipped": "--no-compile"}
    md = (out / "gpu_report.md").read_text()
    for heading in ("## Training step", "## Fast-path options", "## Sampling", "## Many concepts", "## A whole concept", "## Loading"):
        assert heading in md
    assert "| reference |" in md and "| fast bf16 |" in md and "| diffusers UNet alone (fp32) |" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_no_cuda_device_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_report.py"), "--out_dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: no CUDA device is present; run this on a machine with an NVIDIA GPU, or pass --device cpu "
        "--config configs/tiny/v1-finetune.yaml for a dry run"]
    assert not os.listdir(tmp_path)


def test_unknown_section_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_report.py"), "--device", "cpu",
                           "--config", "configs/tiny/v1-finetune.yaml", "--sections", "training,sampl",
                           "--out_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: unknown --sections ['sampl']; choose from "
        "training,fast_options,diffusers,profile,concepts,sampling,lightning_run,loading,lightning_every_step,compile"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the GPU-only options (compile, the \"auto\" choices)")
def test_fast_path_options_on_cuda(tiny_finetune_model):
    """The gpu_report's smoke section on the tiny model: compile, bf16, channels-last, checkpointing and "auto" each
    train a few steps with finite losses within their tolerance of the fp32 path's."""
    from ldm.perf import training

    model = tiny_finetune_model.to("cuda").train()
    rows = training.check_fast_options(model, training.make_batch(2, 64, 64, model.device), with_compile=True)
    assert list(rows) == ["fp32", "channels_last", "gradient_checkpointing", "compile", "auto", "bf16"]
    assert all(row["ok"] for row in rows.values()), rows
    assert rows["auto"]["max_rel_diff"] > 0  # "auto" switched bf16 on: the numbers did change
