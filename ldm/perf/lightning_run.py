"""The real training loop, timed: `main.py -t` (Lightning, data loader, logging, loss guard, adapter snapshots;
sample grids off: a real 1000-step run adds two), its time per step read off its adapter snapshots' file times."""
import glob
import os
import re
import subprocess
import sys
import time

from PIL import Image


def run(config_path, workdir, steps, every, size=None, concepts=1, ckpt=None, gpus=None, overrides=()):
    """{"steps", "snapshot_every", "process_wall_s", "step_s" (the spread of the first concept's snapshots over the
    steps between them), "fixed_s" (start-up, model build, first steps, saving: the rest of the wall time), "peak_mb"
    (the run's peak resident set), "lr_line"} of one run of `concepts` concepts of 4 noise photos each."""
    roots = [os.path.join(workdir, "photos", f"concept{i}") for i in range(concepts)]
    for root in roots:
        os.makedirs(root)
        for k in range(4):  # the loader resizes them to the config's size, or `size`
            Image.effect_noise((size or 64, size or 64), 64).convert("RGB").save(os.path.join(root, f"{k}.png"))
    logdir = os.path.join(workdir, "logs")
    argv = [sys.executable, "-m", "ldm.cli.train", "--base", config_path, "-t", "--data_root", *roots,
            "--init_word", *[f"word{i}" for i in range(concepts)], "--logdir", logdir, "--seed", "0",
            *(["--actual_resume", ckpt] if ckpt else []), *(["--gpus", gpus] if gpus else []),
            f"lightning.trainer.max_steps={steps}", f"lightning.modelcheckpoint.params.every_n_train_steps={every}",
            "lightning.callbacks.image_logger.params.batch_frequency=0",
            *([f"data.params.train.params.size={size}"] if size else []), *overrides]
    start = time.perf_counter()
    with open(os.path.join(workdir, "run.log"), "w+") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # its rusage: the run's peak resident set
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
