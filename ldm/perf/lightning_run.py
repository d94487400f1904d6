"""The real training loop, timed: `main.py -t` for a few hundred steps, per-step time read off its checkpoints.

Everything a user's run does is in the figure: Lightning's loop, the data loader, logging to the progress bar,
TensorBoard and CSV (every `log_every_n_steps`), the non-finite-loss guard, the adapter snapshots. The run saves an adapter snapshot
every `every` steps; the time per step is the spread of those snapshots' file times divided by the steps between
them, and the wall time of 1000 steps is projected as (process wall time - steps x per-step) + 1000 x per-step,
i.e. the run's fixed cost (start-up, model build, first steps, saving) plus 1000 steady steps. Sample grids are off
(`batch_frequency=0`); a real 1000-step run adds two of them (steps 500 and 1000), reported separately.
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


def run(config_path, workdir, size, steps, every, gpu, overrides=()):
    data = write_photos(os.path.join(workdir, "photos"), 4, size)
    logdir = os.path.join(workdir, "logs")
    argv = [sys.executable, "-m", "ldm.cli.train", "--base", config_path, "-t", "--data_root", data, "--init_word", "teddybear",
            "--logdir", logdir, "--seed", "0"] + (["--gpus", "0,"] if gpu else []) + [
        f"lightning.trainer.max_steps={steps}", f"lightning.modelcheckpoint.params.every_n_train_steps={every}",
        "lightning.callbacks.image_logger.params.batch_frequency=0", f"data.params.train.params.size={size}",
        *overrides]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"main.py exited {done.returncode}: {tail}")
    files = glob.glob(os.path.join(logdir, "*", "checkpoints", "adapter_gs-*", "catversion.safetensors"))
    snapshots = sorted((int(re.search(r"adapter_gs-(\d+)", f).group(1)), os.path.getmtime(f)) for f in files)
    if len(snapshots) < 2:
        raise RuntimeError(f"expected adapter snapshots every {every} steps, found {len(snapshots)}")
    (first_step, first_time), (last_step, last_time) = snapshots[0], snapshots[-1]
    per_step = (last_time - first_time) / (last_step - first_step)
    return {"steps": steps, "snapshot_every": every, "process_wall_s": wall, "step_s": per_step,
            "fixed_s": wall - steps * per_step, "projected_1000_steps_s": wall - steps * per_step + 1000 * per_step,
            "overrides": list(overrides), "lr_line": next((line for line in done.stdout.splitlines()
                                                           if "learning rate" in line.lower()), "")}
