"""Concepts per hour: N concepts trained in one `main.py` run against N sequential one-concept runs, N = 1, 2, 4, 8.

    python scripts/concepts_benchmark.py --config configs/toy/v1-finetune.yaml --ckpt models/toy/toy-sd.ckpt \\
        --counts 1 2 4 8 --steps 30 --every 10 --out bench/concepts-toy

Each N is one real run (`main.py -t`, random photos, sample grids off). As in `ldm/perf/lightning_run.py`, the
time per step is the spread of the first concept's adapter snapshots' file times over the steps between them, and a
run of `--train_steps` steps is projected as its fixed cost (process start, model load, first steps, saving) plus
that many steady steps. N sequential runs take N times the one-concept run (the same work each), so their
concepts per hour are the one-concept run's whatever N. Peak memory is the run's peak resident set (os.wait4).
Writes <out>.json and <out>.png.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from ldm.util import HelpFormatter, one_line_errors


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default="configs/toy/v1-finetune.yaml", help="finetune config to train with")
    p.add_argument("--ckpt", default="models/toy/toy-sd.ckpt", help="the base model (--actual_resume)")
    p.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8], help="concepts per run; the first must be 1")
    p.add_argument("--steps", type=int, default=30, help="steps of each measured run")
    p.add_argument("--every", type=int, default=10, help="adapter snapshot interval (the step clock)")
    p.add_argument("--train_steps", type=int, default=1000, help="steps of the projected real run (the paper's 1000)")
    p.add_argument("--size", type=int, default=None, help="image side; default: the config's")
    p.add_argument("--gpus", default=None, help="passed to main.py, e.g. `0,`; CPU when omitted")
    p.add_argument("--out", default="bench/concepts", help="output path without extension (.json, .png)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def measure_run(opt, n, workdir):
    """One `main.py -t` run of `n` concepts: {"process_wall_s", "step_s", "fixed_s", "projected_s", "peak_mb"}."""
    from ldm.perf.lightning_run import write_photos

    roots = [write_photos(os.path.join(workdir, f"photos{n}", f"concept{i}"), 4, opt.size or 64, seed=i) for i in range(n)]
    logdir = os.path.join(workdir, f"logs{n}")
    argv = [sys.executable, "-m", "ldm.cli.train", "--base", opt.config, "-t", "--actual_resume", opt.ckpt,
            "--data_root", *roots, "--init_word", *[f"word{i}" for i in range(n)], "--logdir", logdir, "--seed", "0",
            *(["--gpus", opt.gpus] if opt.gpus else []), f"lightning.trainer.max_steps={opt.steps}",
            f"lightning.modelcheckpoint.params.every_n_train_steps={opt.every}",
            "lightning.callbacks.image_logger.params.batch_frequency=0",
            *([f"data.params.train.params.size={opt.size}"] if opt.size else [])]
    start = time.perf_counter()
    with open(os.path.join(workdir, f"run{n}.log"), "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"main.py with {n} concepts failed; see {log.name}")
    pattern = re.compile(r"adapter_gs-(\d+)$")
    folder = os.path.join(next(os.scandir(logdir)).path, "checkpoints", *(["concept0"] if n > 1 else []))
    snapshots = sorted((int(m.group(1)), os.path.getmtime(os.path.join(folder, d, "catversion.safetensors")))
                       for d in os.listdir(folder) if (m := pattern.match(d)))
    if len(snapshots) < 2:
        raise RuntimeError(f"expected adapter snapshots every {opt.every} steps in {folder}; raise --steps")
    (s0, t0), (s1, t1) = snapshots[0], snapshots[-1]
    step = (t1 - t0) / (s1 - s0)
    fixed = wall - opt.steps * step
    return {"concepts": n, "process_wall_s": wall, "step_s": step, "fixed_s": fixed,
            "projected_s": fixed + opt.train_steps * step, "peak_mb": usage.ru_maxrss / 1024}  # Linux: KiB


def plot(rows, title):
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    counts = [r["concepts"] for r in rows]
    axes.plot(counts, [r["concepts_per_hour"] for r in rows], "o-", label="N concepts in one run")
    axes.plot(counts, [r["sequential_concepts_per_hour"] for r in rows], "s--", label="N sequential one-concept runs")
    for r in rows:
        axes.annotate(f"{r['speedup']:.2f}x", (r["concepts"], r["concepts_per_hour"]), textcoords="offset points",
                      xytext=(0, 6), ha="center", fontsize=8)
    axes.set_xscale("log", base=2)
    axes.set_xticks(counts, [str(c) for c in counts])
    axes.set_xlabel("concepts N")
    axes.set_ylabel("concepts per hour")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def run(opt):
    from ldm.files import atomic_write

    if opt.counts[0] != 1 or any(n < 1 for n in opt.counts):
        raise ValueError(f"--counts {opt.counts} must start with 1 (the sequential runs' yardstick) and be >= 1")
    if opt.steps < 2 * opt.every:
        raise ValueError(f"--steps {opt.steps} gives fewer than two snapshots every {opt.every} steps; raise --steps")
    for path, what in ((opt.config, "--config"), (opt.ckpt, "--ckpt")):
        if not os.path.isfile(path):
            raise ValueError(f"{what} {path} not found")
    os.makedirs(os.path.dirname(os.path.abspath(opt.out)), exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for n in opt.counts:
            rows.append(measure_run(opt, n, workdir))
            print(f"{n} concept(s): {rows[-1]['step_s']:.3f} s/step, fixed {rows[-1]['fixed_s']:.1f} s, "
                  f"peak {rows[-1]['peak_mb']:.0f} MB", flush=True)
    one = rows[0]["projected_s"]
    for r in rows:
        r["concepts_per_hour"] = 3600 * r["concepts"] / r["projected_s"]
        r["sequential_concepts_per_hour"] = 3600 / one
        r["speedup"] = r["concepts"] * one / r["projected_s"]
    result = {"config": opt.config, "ckpt": opt.ckpt, "steps_measured": opt.steps, "train_steps": opt.train_steps,
              "gpus": opt.gpus, "rows": rows}
    title = f"{opt.config}: concepts per hour, {opt.train_steps}-step runs"
    for ext, data in ((".json", json.dumps(result, indent=2).encode()), (".png", plot(rows, title))):
        atomic_write(opt.out + ext, lambda path: _write_bytes(path, data))
    for r in rows:
        print(f"N={r['concepts']}: {r['concepts_per_hour']:.1f} concepts/h in one run vs "
              f"{r['sequential_concepts_per_hour']:.1f} sequential ({r['speedup']:.2f}x), peak {r['peak_mb']:.0f} MB")
    return result


def main(argv=None):
    opt = get_parser().parse_args(argv)
    with one_line_errors(opt.debug):
        return run(opt)


if __name__ == "__main__":
    main()
