#!/usr/bin/env python
"""The README's first command: teach the toy world's model (models/toy/toy-sd.ckpt, shipped) a concept it has never
seen, a circle striped purple and orange, from 5 images captioned only `circle`; then show base model vs CatVersion
on a few prompts, as a grid and as toy metrics. Runs on 2 CPU cores in about a minute; nothing is downloaded.
"""
import argparse
import os
import time


PROMPTS = ["circle on a blue background", "circle on a red background", "square on a blue background"]
TOY_CKPT = "models/toy/toy-sd.ckpt"


def metrics_table(results):
    lines = ["| prompt | fidelity base → CatVersion | at most (VAE) | background obeyed base → CatVersion "
             "| pixel change | unchanged |", "|---|---|---|---|---|---|"]
    for prompt, r in results.items():
        b, p = r["base"], r["personal"]
        ceiling = f"{r['ceiling']:.2f}" if "ceiling" in r else ""
        lines.append(f"| {prompt} | {b['fidelity']:.2f} → {p['fidelity']:.2f} | {ceiling} | {b['editability']:.0%} → "
                     f"{p['editability']:.0%} | {p['pixel_change']:.3f} | {p['unchanged']:.0%} |")
    return "\n".join(lines)


def main(argv=None):
    from ldm.util import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default=TOY_CKPT, help="toy base model (shipped; scripts/train_toy_base.py remakes it)")
    p.add_argument("--data_root", default="data/toy_concept", help="the concept's photos (drawn if missing)")
    p.add_argument("--logdir", default="logs", help="where the training run folder goes")
    p.add_argument("--outdir", default="outputs/demo", help="where the comparison grid goes")
    p.add_argument("--steps", type=int, default=800, help="training steps")
    p.add_argument("--n", type=int, default=16, help="samples per prompt for the metrics (the grid shows 4)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("overrides", nargs="*", help="main.py config overrides, e.g. model.base_learning_rate=1e-3")
    opt = p.parse_args(argv)
    start = time.time()

    import torch

    # The toy model's operations are too small to share among threads: one thread is as fast on an idle machine and
    # does not collapse (tens of times slower) when other processes compete for the cores.
    torch.set_num_threads(1)

    from ldm.cli import train as train_main
    from ldm.report import save_sheet
    from ldm.toy.scenes import CONCEPT_STRIPES, write_concept_folder
    from ldm.toy.metrics import compare, parse_prompt, round_trip_fidelity
    from ldm.util import one_line_errors

    with one_line_errors(debug=False):
        if not os.path.isfile(opt.ckpt):
            raise FileNotFoundError(f"toy model {opt.ckpt} not found: `git checkout {TOY_CKPT}` restores the shipped "
                                    "one; README, \"The toy world\", has the command that retrains it (15 minutes)")
    if not os.path.isdir(opt.data_root):
        write_concept_folder(opt.data_root)
    stripes = " and ".join(CONCEPT_STRIPES)
    print(f"Concept: {opt.data_root} (5 images of a circle striped {stripes}; captions: `circle`)")

    args = ["--base", "configs/toy/v1-finetune.yaml", "-t", "--actual_resume", opt.ckpt, "--data_root", opt.data_root,
            "--init_word", "circle", "-l", opt.logdir, "-n", "demo", f"lightning.trainer.max_steps={opt.steps}",
            *opt.overrides]
    logdir, model = train_main.run(*train_main.get_parser().parse_known_args(args))

    results = compare(model.eval(), PROMPTS, n=opt.n, seed=opt.seed)
    for prompt in PROMPTS:  # what the VAE lets through of the concept itself on that background
        asked = parse_prompt(prompt)
        if asked["shape"] == "circle":
            results[prompt]["ceiling"] = round_trip_fidelity(model.first_stage_model, asked["background"])
    shown = min(4, opt.n)
    rows = [torch.cat([r["images"][k][:shown] for r in results.values()]) for k in (0, 1)]
    path = os.path.join(opt.outdir, "base_vs_catversion.png")
    save_sheet(path, rows, ["base model", "CatVersion"], [f"{p} #{i + 1}" for p in PROMPTS for i in range(shown)])
    print(metrics_table(results))
    print(f"Adapter: {os.path.join(logdir, 'checkpoints', 'adapter')}")
    print(f"Grid: {path} (top: base model, bottom: CatVersion; {shown} samples each of {PROMPTS})")
    print(f"Demo finished in {time.time() - start:.0f} s")
    return logdir, path, results


if __name__ == "__main__":
    main()
