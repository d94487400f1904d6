"""Time and peak memory of loading a base model through `ldm.sampling.load_model`, each format in a fresh process
(`python -m ldm.perf.loading CONFIG PATH DEVICE` prints one JSON line), so that the peak host memory above what the
libraries hold can be read as a multiple of the weights."""
import json
import os
import subprocess
import sys
import time

import torch

from ldm.perf.device import cuda, host_mb, reset_peak, synchronize


def measure_formats(model, config, config_path, folder, device):
    """{format: figures} of `model` written as `.ckpt`, `.safetensors` and a diffusers folder, each loaded apart."""
    from ldm.checkpoint import save_checkpoint
    from ldm.perf.sampling import diffusers_pipeline

    paths = {"ckpt": os.path.join(folder, "model.ckpt"), "safetensors": os.path.join(folder, "model.safetensors"),
             "diffusers folder": os.path.join(folder, "diffusers")}
    os.makedirs(folder, exist_ok=True)
    save_checkpoint(model, paths["ckpt"])
    save_checkpoint(model, paths["safetensors"])
    diffusers_pipeline(model, config).save_pretrained(paths["diffusers folder"], safe_serialization=True)
    results = {}
    for name, path in paths.items():
        done = subprocess.run([sys.executable, "-m", "ldm.perf.loading", config_path, path, str(device)],
                              capture_output=True, text=True)
        lines = (done.stderr if done.returncode else done.stdout).strip().splitlines() or ["failed"]
        results[name] = {"error": lines[-1]} if done.returncode else json.loads(lines[-1])
    return results


def measure_load(config_path, path, device):
    from ldm.sampling import load_model

    before = host_mb("VmRSS:")  # Python, torch and the libraries
    reset_peak(device)
    start = time.perf_counter()
    model = load_model(config_path, path, device=device, verbose=False)
    synchronize(device)
    seconds = time.perf_counter() - start
    weights_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    peak = host_mb("VmHWM:")
    result = {"load_s": seconds, "host_before_mb": before, "host_peak_mb": peak, "weights_mb": weights_mb,
              "host_peak_over_weights": (peak - before) / weights_mb}
    if cuda(device):
        result["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


if __name__ == "__main__":
    print(json.dumps(measure_load(*sys.argv[1:4])))
