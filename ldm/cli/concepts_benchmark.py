"""Concepts per hour: N concepts trained in one `main.py` run against N sequential one-concept runs, N = 1, 2, 4, 8.

    python scripts/concepts_benchmark.py --config configs/toy/v1-finetune.yaml --ckpt models/toy/toy-sd.ckpt \\
        --counts 1 2 4 8 --steps 30 --every 10 --out bench/concepts-toy

Each N is one real run timed by `ldm/perf/lightning_run.py` (noise photos, sample grids off); a run of
`--train_steps` steps is projected as its fixed cost plus that many steady steps. N sequential runs take N times the
one-concept run, so their concepts per hour are the one-concept run's whatever N. Writes <out>.json and <out>.png.
"""
import argparse
import json
import os
import tempfile

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
    """One `main.py -t` run of `n` concepts, with "concepts" and "projected_s" added."""
    from ldm.perf.lightning_run import run

    row = run(opt.config, os.path.join(workdir, str(n)), opt.steps, opt.every, opt.size, n, opt.ckpt, opt.gpus)
    return {"concepts": n, **row, "projected_s": row["fixed_s"] + opt.train_steps * row["step_s"]}


def run(opt):
    from ldm.report import bar_chart, write_files

    if opt.counts[0] != 1 or any(n < 1 for n in opt.counts):
        raise ValueError(f"--counts {opt.counts} must start with 1 (the sequential runs' yardstick) and be >= 1")
    if opt.steps < 2 * opt.every:
        raise ValueError(f"--steps {opt.steps} gives fewer than two snapshots every {opt.every} steps; raise --steps")
    for path, what in ((opt.config, "--config"), (opt.ckpt, "--ckpt")):
        if not os.path.isfile(path):
            raise ValueError(f"{what} {path} not found")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for n in opt.counts:
            rows.append(measure_run(opt, n, workdir))
            print(f"{n} concept(s): {rows[-1]['step_s']:.3f} s/step, fixed {rows[-1]['fixed_s']:.1f} s, "
                  f"peak {rows[-1]['peak_mb']:.0f} MB", flush=True)
    one = rows[0]["projected_s"]
    for r in rows:
        r.update(concepts_per_hour=3600 * r["concepts"] / r["projected_s"], sequential_concepts_per_hour=3600 / one,
                 speedup=r["concepts"] * one / r["projected_s"])
        print(f"N={r['concepts']}: {r['concepts_per_hour']:.1f} concepts/h in one run vs "
              f"{r['sequential_concepts_per_hour']:.1f} sequential ({r['speedup']:.2f}x), peak {r['peak_mb']:.0f} MB")
    result = {"config": opt.config, "ckpt": opt.ckpt, "steps_measured": opt.steps, "train_steps": opt.train_steps,
              "gpus": opt.gpus, "rows": rows}
    chart = bar_chart([f"N={r['concepts']}" for r in rows], {
        "N concepts in one run": [r["concepts_per_hour"] for r in rows],
        "N sequential one-concept runs": [r["sequential_concepts_per_hour"] for r in rows]},
        title=f"{opt.config}: concepts per hour, {opt.train_steps}-step runs", ylabel="concepts per hour", fmt="%.1f")
    write_files({opt.out + ".json": json.dumps(result, indent=2), opt.out + ".png": chart})
    return result


def main(argv=None):
    opt = get_parser().parse_args(argv)
    with one_line_errors(opt.debug):
        return run(opt)


if __name__ == "__main__":
    main()
