#!/usr/bin/env python
"""The paper's comparison in miniature, on the toy world: CatVersion (layers 9-11) vs Textual Inversion vs
CatVersion on shallow layers (0-2), each trained on the demo concept with a few seeds, scored with the toy metrics.

    python scripts/toy_benchmark.py            # about 5 minutes on 2 CPU cores

Per method and seed: train through main.py (seed s), sample every prompt from seed s with and without the learned
concept, and score (ldm/toy/metrics.py): fidelity and background editability on the `circle` prompts,
prior preservation (pixel change, unchanged read-back) on the `square` prompts. Writes <outdir>/toy_benchmark.csv
(one row per run), toy_benchmark.md (mean ± standard deviation over seeds), toy_benchmark.png (the same as bars)
and samples.png (the first seed's images: one row per method, the base model on top).
"""
import argparse
import os
import statistics
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


METHODS = {  # presets of configs/compare/methods.yaml
    "catversion": "CatVersion, layers 9-11", "textual_inversion": "Textual Inversion",
    "catversion_0_2": "CatVersion, layers 0-2",
}
CONCEPT_PROMPTS = ["circle on a blue background", "circle on a red background", "circle on a green background"]
PRIOR_PROMPTS = ["square on a blue background", "a red square on a white background"]
METRICS = {"fidelity": "fidelity (circle prompts)", "editability": "background obeyed (circle prompts)",
           "prior_unchanged": "square read-back unchanged", "prior_pixel_change": "square pixel change"}


def get_parser():
    from ldm.util import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt_path", default="models/toy/toy-sd.ckpt", help="the toy base model")
    p.add_argument("--base", default="configs/toy/v1-finetune.yaml", help="CatVersion config (TI: its sibling)")
    p.add_argument("--data_root", default="data/toy_concept", help="the concept's photos (drawn if missing)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to compare")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training and sampling seeds")
    p.add_argument("--steps", type=int, default=800, help="training steps of every run")
    p.add_argument("--n", type=int, default=16, help="samples per prompt")
    p.add_argument("--outdir", default="outputs/toy_benchmark", help="folder for the table, plot and runs")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run_one(opt, method, seed):
    """Train `method` with `seed`; returns the row of toy metrics and the compare() results."""
    from ldm.cli import compare as comparison
    from ldm.evaluation.comparison import read_methods
    from ldm.toy.metrics import compare

    run = argparse.Namespace(out=os.path.join(opt.outdir, f"seed{seed}"), configs=os.path.dirname(opt.base),
                             ckpt_path=opt.ckpt_path, steps=opt.steps)
    start = time.time()
    preset = read_methods(os.path.join(ROOT, "configs", "compare", "methods.yaml"), [method])[method]
    adapter = comparison.train(run, method, preset, {"concept": {"root": opt.data_root, "word": "circle"}}, seed)
    seconds = round(time.time() - start, 1)
    model, placeholder, learned = comparison.load_personalized(run, adapter["concept"])
    results = compare(model.eval(), CONCEPT_PROMPTS + PRIOR_PROMPTS, n=opt.n, seed=seed, placeholder=placeholder)
    concept = [results[p]["personal"] for p in CONCEPT_PROMPTS]
    prior = [results[p]["personal"] for p in PRIOR_PROMPTS]
    row = {"method": method, "seed": seed, "trainable": learned, "train_seconds": seconds,
           "base_fidelity": statistics.mean(results[p]["base"]["fidelity"] for p in CONCEPT_PROMPTS),
           "fidelity": statistics.mean(s["fidelity"] for s in concept),
           "editability": statistics.mean(s["editability"] for s in concept),
           "prior_unchanged": statistics.mean(s["unchanged"] for s in prior),
           "prior_pixel_change": statistics.mean(s["pixel_change"] for s in prior)}
    return row, results


def summary(rows, methods):
    """{method: {metric: (mean, std)}} over seeds (std 0 for one seed)."""
    out = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        out[m] = {k: (statistics.mean(r[k] for r in mine), statistics.pstdev(r[k] for r in mine))
                  for k in ["base_fidelity", *METRICS]}
    return out


def markdown(stats, n_seeds, opt):
    from ldm.report import markdown_table
    from ldm.toy.scenes import CONCEPT_STRIPES

    keys = ["base_fidelity", *METRICS]
    return (f"Toy world, concept `circle` (striped {' and '.join(CONCEPT_STRIPES)}), {opt.steps} steps, {n_seeds} "
            f"seed(s), {opt.n} samples per prompt; mean ± std over seeds.\n\n"
            + markdown_table(["method", "base model's fidelity", *METRICS.values()],
                             [[METHODS[m]] + [f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k in keys] for m, s in stats.items()]))


def bar_chart(stats):
    from ldm.report import bar_chart

    return bar_chart(list(METRICS.values()), {METHODS[m]: [s[k][0] for k in METRICS] for m, s in stats.items()},
                     errors={METHODS[m]: [s[k][1] for k in METRICS] for m, s in stats.items()}, ylim=(0, 1.1),
                     fmt="%.2f", title="Toy world: learning a striped circle from 5 images (mean ± std over seeds)")


def run(opt):
    import torch

    from ldm.report import csv_text, save_sheet, write_files
    from ldm.toy.scenes import write_concept_folder

    torch.set_num_threads(1)  # see scripts/demo.py
    if not os.path.isfile(opt.ckpt_path):
        raise ValueError(f"toy model {opt.ckpt_path} not found; `git checkout models/toy/toy-sd.ckpt` restores it")
    if not os.path.isdir(opt.data_root):
        write_concept_folder(opt.data_root)
    os.makedirs(opt.outdir, exist_ok=True)
    rows, grid_rows = [], []
    for method in opt.methods:
        for seed in opt.seeds:
            row, results = run_one(opt, method, seed)
            rows.append(row)
            if seed == opt.seeds[0]:
                if not grid_rows:
                    grid_rows.append(torch.cat([r["images"][0][:4] for r in results.values()]))
                grid_rows.append(torch.cat([r["images"][1][:4] for r in results.values()]))
    stats = summary(rows, opt.methods)
    paths = {k: Path(opt.outdir, f"toy_benchmark.{k}") for k in ("csv", "md", "png")}
    table = markdown(stats, len(opt.seeds), opt)
    write_files({paths["csv"]: csv_text(rows), paths["md"]: table, paths["png"]: bar_chart(stats)})
    paths["samples"] = Path(opt.outdir, "samples.png")
    save_sheet(paths["samples"], grid_rows, ["base model", *(METHODS[m] for m in opt.methods)],
               [f"{p} #{i + 1}" for p in CONCEPT_PROMPTS + PRIOR_PROMPTS for i in range(min(4, opt.n))])
    print(table)
    print(f"Wrote {', '.join(str(p) for p in paths.values())} (samples.png rows: base, {', '.join(opt.methods)}; "
          f"4 images each of {CONCEPT_PROMPTS + PRIOR_PROMPTS})")
    return rows, stats, {k: str(p) for k, p in paths.items()}


def main(argv=None):
    from ldm.util import one_line_errors

    opt = get_parser().parse_args(argv)
    with one_line_errors(opt.debug):
        return run(opt)


if __name__ == "__main__":
    main()
