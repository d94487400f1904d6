#!/usr/bin/env python
"""The README's first command: make the tiny model and the example concept, train CatVersion on it, and save a grid
comparing the base model with the learned concept. Runs on 2 CPU cores in a couple of minutes; nothing is downloaded.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPTS = ["circle", "circle on a blue background", "circle on a red background", "square on a blue background"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="models/tiny/tiny-sd.ckpt", help="tiny base model (made if missing)")
    p.add_argument("--data_root", default="data/example", help="example concept photos (drawn if missing)")
    p.add_argument("--logdir", default="logs", help="where the training run folder goes")
    p.add_argument("--outdir", default="outputs/demo", help="where the comparison grid goes")
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--ddim_steps", type=int, default=20, help="sampling steps for the grid")
    opt = p.parse_args(argv)
    start = time.time()

    import torch

    # The tiny model's operations are too small to share among threads: one thread is as fast on an idle machine and
    # does not collapse (tens of times slower) when other processes compete for the cores.
    torch.set_num_threads(1)

    import main as train_main
    from ldm.callbacks import save_image_grid
    from ldm.data.toy_scenes import write_concept_folder
    from scripts.make_tiny_model import main as make_tiny_model

    if not os.path.isfile(opt.ckpt):
        make_tiny_model(["--out", opt.ckpt])
    if not os.path.isdir(opt.data_root):
        write_concept_folder(opt.data_root)
    print(f"Example concept: {opt.data_root} (a circle striped yellow and purple; base class word `circle`)")

    args = ["--base", "configs/tiny/v1-finetune.yaml", "-t", "--actual_resume", opt.ckpt, "--data_root", opt.data_root,
            "--init_word", "circle", "-l", opt.logdir, "-n", "demo", f"lightning.trainer.max_steps={opt.steps}"]
    logdir, model = train_main.run(*train_main.get_parser().parse_known_args(args))

    images = model.log_images(PROMPTS, ddim_steps=opt.ddim_steps, seed=0)
    # top row: the base model; bottom row: the same prompts and noise with the learned concept
    grid = torch.cat([images["samples_base"], images["samples"]])
    path = os.path.join(opt.outdir, "base_vs_catversion.png")
    save_image_grid(grid, path, nrow=len(PROMPTS))
    print(f"Adapter: {os.path.join(logdir, 'checkpoints', 'adapter')}")
    print(f"Grid (top: base model, bottom: CatVersion; prompts {PROMPTS}): {path}")
    print(f"Demo finished in {time.time() - start:.0f} s")
    return logdir, path


if __name__ == "__main__":
    main()
