"""The real training loop, timed: `main.py -t` for a few hundred steps, per-step time read off its checkpoints.

Everything a user's run does is in the figure: Lightning's loop, the data loader, logging (every
`log_every_n_steps`), the non-finite-loss guard, the adapter snapshots. The time per step is the spread of the (first
concept's) snapshots' file times over the steps between them; the run's fixed cost (start-up, model build, first
steps, saving) is its wall time less its steps at that rate. Sample grids are off (`batch_frequency=0`); a real
1000-step run adds two of them (steps 500 and 1000).
"""
import glob
import os
import re
import subprocess
import sys
import time

import numpy as np
from PIL import Image


def write_photos(folder, n, size, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return folder


def run(config_path, workdir, steps, every, size=None, concepts=1, ckpt=None, gpus=None, overrides=()):
    """{"steps", "snapshot_every", "process_wall_s", "step_s", "fixed_s", "peak_mb" (the run's peak resident set),
    "lr_line"} of one run of `concepts` concepts, 4 random photos each (the config's size unless `size`)."""
    roots = [write_photos(os.path.join(workdir, "photos", f"concept{i}"), 4, size or 64, seed=i) for i in range(concepts)]
    logdir = os.path.join(workdir, "logs")
    argv = [sys.executable, "-m", "ldm.cli.train", "--base", config_path, "-t", "--data_root", *roots,
            "--init_word", *[f"word{i}" for i in range(concepts)], "--logdir", logdir, "--seed", "0",
            *(["--actual_resume", ckpt] if ckpt else []), *(["--gpus", gpus] if gpus else []),
            f"lightning.trainer.max_steps={steps}", f"lightning.modelcheckpoint.params.every_n_train_steps={every}",
            "lightning.callbacks.image_logger.params.batch_frequency=0",
            *([f"data.params.train.params.size={size}"] if size else []), *overrides]
    start = time.perf_counter()
    with open(os.path.join(workdir, "run.log"), "w+") as log:
        _, status, usage = os.wait4(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT).pid, 0)
        wall = time.perf_counter() - start
        log.seek(0)
        lines = log.read().splitlines()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"main.py exited {os.waitstatus_to_exitcode(status)}: {(lines or ['no output'])[-1]}")
    first = os.path.join(logdir, "*", "checkpoints", *(["concept0"] if concepts > 1 else []), "adapter_gs-*")
    snapshots = sorted((int(re.search(r"adapter_gs-(\d+)$", d).group(1)),
                        os.path.getmtime(os.path.join(d, "catversion.safetensors"))) for d in glob.glob(first))
    if len(snapshots) < 2:
        raise RuntimeError(f"expected adapter snapshots every {every} steps, found {len(snapshots)}; raise the steps")
    (first_step, first_time), (last_step, last_time) = snapshots[0], snapshots[-1]
    step_s = (last_time - first_time) / (last_step - first_step)
    return {"steps": steps, "snapshot_every": every, "process_wall_s": wall, "step_s": step_s,
            "fixed_s": wall - steps * step_s, "peak_mb": usage.ru_maxrss / 1024,  # Linux: KiB
            "lr_line": next((line for line in lines if "learning rate" in line.lower()), "")}
