#!/usr/bin/env python
"""Compare personalization methods the way papers do: every method trained on every concept, every prompt sampled
at fixed seeds, every image scored, one table.

    python scripts/compare.py --concepts data/concepts --methods catversion textual_inversion catversion_0_2 \\
        --prompts configs/prompts/objects.txt --ckpt_path models/sd/v1-5.ckpt \\
        --clip_weights models/clip/vit-b-32.bin --dino_weights models/dino/dino_deitsmall16_pretrain.pth --out results
    python scripts/compare.py --toy --out outputs/compare-toy     # the toy world: minutes on 2 CPU cores

Each method (a preset of configs/compare/methods.yaml) trains once over all concepts that it has not learned yet.
Then, per method and concept (a cell), every prompt is sampled with seeds --seed .. --seed + n_images - 1 and scored:
DINO, CLIP-I (mean over all reference x generated pairs), CLIP-T (the prompt with the class word, no placeholder)
as raw cosine and as CLIPScore, their geometric mean; in the toy world the toy metrics. Writes
<out>/results.{json,csv,md,png}, one sample sheet per concept (<out>/sheets/, rows: methods, columns: prompts), the
cells (<out>/cells/), images (<out>/samples/), adapters (<out>/adapters/) and training runs (<out>/runs/). Run it
again to continue where it stopped, or with more methods or concepts: only the missing cells are computed.
"""
import argparse
import os
import shutil
import time

TOY = {"ckpt_path": "models/toy/toy-sd.ckpt", "configs": "configs/toy", "prompts": "configs/prompts/toy.txt",
       "ddim_steps": 25, "scale": 5.0, "steps": 800}
SD = {"ckpt_path": "models/sd/v1-5.ckpt", "configs": "configs/stable-diffusion",
      "prompts": "configs/prompts/objects.txt", "ddim_steps": 50, "scale": 10.0, "steps": None}


def get_parser():
    from ldm.util import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--concepts", default=None, help="a folder of concept folders (toy: drawn when missing)")
    p.add_argument("--methods", nargs="+", default=["catversion", "textual_inversion"], help="method presets")
    p.add_argument("--methods_file", default="configs/compare/methods.yaml", help="the presets")
    p.add_argument("--prompts", default=None, help="prompt file, `{}` = concept word (default: objects; toy: toy)")
    p.add_argument("--out", default="outputs/compare", help="folder of the comparison")
    p.add_argument("--toy", action="store_true", help="the toy world: its model, configs, prompts and metrics")
    p.add_argument("--ckpt_path", default=None, help="base model (default: models/sd/v1-5.ckpt; toy: the toy model)")
    p.add_argument("--configs", default=None,
                   help="config folder of the base model (default: configs/stable-diffusion; toy: configs/toy)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's; toy: 800)")
    p.add_argument("--n_images", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=42, help="first sampling seed; training uses main.py's --seed 23")
    p.add_argument("--ddim_steps", type=int, default=None, help="DDIM steps (default 50; toy 25)")
    p.add_argument("--scale", type=float, default=None, help="guidance scale (default 10; toy 5)")
    p.add_argument("--clip_weights", default=None, help="open_clip ViT-B/32 weights (required but in the toy world)")
    p.add_argument("--clip_model", default="ViT-B-32", help="open_clip model name")
    p.add_argument("--dino_weights", default=None, help="DINO ViT-S/16: dino_deitsmall16_pretrain.pth or a folder")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def prepare(opt):
    """Defaults filled in and every input checked, before anything trains."""
    from ldm import report
    from ldm.evaluation import comparison
    from ldm.toy.scenes import CONCEPTS, write_concept_folder

    for key, value in (TOY if opt.toy else SD).items():
        if getattr(opt, key) is None:
            setattr(opt, key, value)
    if opt.toy and opt.concepts is None:  # the toy concepts, each with the stripes its fidelity is measured by
        opt.concepts = os.path.join(opt.out, "concepts")
        for shape, stripes in CONCEPTS.items():
            folder = os.path.join(opt.concepts, f"{shape}_{'_'.join(stripes)}")
            yaml = os.path.join(folder, "concept.yaml")
            if not os.path.isfile(yaml):  # written last: a folder without it was cut short and is drawn again
                write_concept_folder(folder, shape=shape)
                report.write_files({yaml: f"word: {shape}\nstripes: [{', '.join(stripes)}]\n"})
    if opt.concepts is None:
        raise ValueError("pass --concepts with a folder of concept folders (or --toy for the toy world)")
    if opt.n_images < 1:
        raise ValueError(f"--n_images {opt.n_images} must be at least 1")
    for flag, path in (("--ckpt_path", opt.ckpt_path), ("--clip_weights", opt.clip_weights),
                       ("--dino_weights", opt.dino_weights)):
        if path is None and not opt.toy:
            raise ValueError(f"{flag} is required outside the toy world; nothing is downloaded")
        if path is not None and not os.path.exists(path):
            raise ValueError(f"{flag} {path} not found; pass an existing file")
    concepts = comparison.read_concepts(opt.concepts)
    methods = comparison.read_methods(opt.methods_file, opt.methods)
    for m in methods.values():
        if not os.path.isfile(os.path.join(opt.configs, m["config"])):
            raise ValueError(f"config {m['config']} of a method is not in {opt.configs}; pass --configs")
    return concepts, methods, comparison.read_prompts(opt.prompts)


def train(opt, name, method, concepts, seed=23):
    """Train `method` on the concepts it has not learned yet; returns {concept: adapter folder}."""
    from omegaconf import OmegaConf

    from ldm.cli import train as main

    adapters = {c: os.path.join(opt.out, "adapters", name, c) for c in concepts}
    todo = [c for c in concepts if not os.path.isdir(adapters[c])]
    config = os.path.join(opt.configs, method["config"])
    textual_inversion = OmegaConf.select(OmegaConf.load(config), "model.params.personalization_config") is not None
    # One run per method for CatVersion; Textual Inversion's embedding manager learns one placeholder per run.
    for batch in ([[c] for c in todo] if textual_inversion else [todo] if todo else []):
        args = ["--base", config, "-t", "--actual_resume", opt.ckpt_path, "-l", os.path.join(opt.out, "runs", name),
                "-n", name, "--data_root", *(concepts[c]["root"] for c in batch),
                "--init_word", *(concepts[c]["word"] for c in batch),
                "--seed", str(seed), "lightning.callbacks.image_logger.params.batch_frequency=0", *method["overrides"]]
        if opt.steps is not None:
            args.append(f"lightning.trainer.max_steps={opt.steps}")
        logdir, _ = main.run(*main.get_parser().parse_known_args(args))
        for c in batch:
            found = os.path.join(logdir, "checkpoints", *([c] if len(batch) > 1 else []), "adapter")
            shutil.copytree(found, adapters[c] + ".tmp", dirs_exist_ok=True)
            os.replace(adapters[c] + ".tmp", adapters[c])
    return adapters


def load_personalized(opt, adapter, device="cpu"):
    """The base model with a learned concept (a CatVersion adapter folder, or one holding a Textual Inversion
    `embeddings.pt`); returns (model, the word that names the concept in prompts, or None for the class word)."""
    from ldm import sampling

    embeddings = os.path.join(adapter, "embeddings.pt")
    path = embeddings if os.path.isfile(embeddings) else adapter
    model = sampling.load_model(os.path.join(opt.configs, "v1-inference.yaml"), opt.ckpt_path, device, [path],
                                verbose=False).eval()
    manager = getattr(model, "embedding_manager", None)
    return model, manager.placeholder_strings[0] if manager else None


def sample(opt, name, adapter, concept, prompts, device):
    """[(prompt index, seed, image path)] of one cell; images already on disk are kept."""
    from ldm import sampling

    model = None
    images = []
    for i, template in enumerate(prompts):
        for seed in range(opt.seed, opt.seed + opt.n_images):
            path = os.path.join(opt.out, "samples", name, concept["name"], f"{i:02d}", f"{seed}.png")
            images.append((i, seed, path))
            if os.path.isfile(path):
                continue
            if model is None:
                model, placeholder = load_personalized(opt, adapter, device)
                uc = sampling.unconditional_embedding(model, cache_dir="") if opt.scale != 1.0 else None
            cond = model.get_learned_conditioning([template.format(placeholder or concept["word"])])
            side = 8 * model.image_size
            image = sampling.sample_images(model, cond, uc, seed, side, side, opt.ddim_steps, opt.scale, progress=False)
            sampling.save_image(sampling.to_uint8(image)[0], path)
    return images


def score(opt, scorers, concept, prompts, images):
    """Per-image scores of one cell."""
    import torch

    from ldm.images import list_images, load_rgb

    gens = [load_rgb(p) for _, _, p in images]
    refs = [load_rgb(p) for p in list_images(concept["root"]).values()]
    rows = [{"prompt": prompts[i], "seed": s, "image": os.path.relpath(p, opt.out)} for i, s, p in images]
    if opt.toy:
        from ldm.toy.metrics import fidelity, parse_prompt, read_scenes
        from ldm.toy.scenes import to_model_range

        for row, scene in zip(rows, read_scenes((torch.from_numpy(to_model_range(gens)) + 1) / 2)):
            row["toy_fidelity"] = fidelity(scene, concept["stripes"])
            row["toy_editability"] = float(scene["background"] == parse_prompt(row["prompt"])["background"])
    if "clip" in scorers:
        from ldm.evaluation.clip_metrics import clip_scores

        texts = [row["prompt"].format(concept["word"]) for row in rows]
        clip_i, clip_t = clip_scores(scorers["clip"], refs, gens, texts)
        for row, image_i, image_t in zip(rows, clip_i.tolist(), clip_t.tolist()):
            row.update(clip_i=image_i, clip_t=image_t, clipscore=2.5 * max(image_t, 0.0))
    if "dino" in scorers:
        from ldm.evaluation.dino import dino_scores

        for row, value in zip(rows, dino_scores(scorers["dino"], refs, gens).tolist()):
            row["dino"] = value
    return rows


def run(opt):
    import torch
    import transformers

    from ldm.evaluation import comparison
    from ldm.images import load_rgb
    from ldm.report import save_sheet

    concepts, methods, prompts = prepare(opt)
    device = torch.device(opt.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scorers = {}
    if opt.clip_weights:  # imported only when asked for: the toy world needs neither
        from ldm.evaluation.clip_metrics import load_clip
        scorers["clip"] = load_clip(opt.clip_model, opt.clip_weights, device)
    if opt.dino_weights:
        from ldm.evaluation.dino import load_dino
        scorers["dino"] = load_dino(opt.dino_weights, device)
    cells = {(name, c): comparison.read_cell(opt.out, name, c) for name in methods for c in concepts}
    computed = [key for key, cell in cells.items() if cell is None]
    for name, method in methods.items():
        todo = [c for c in concepts if (name, c) in computed]
        adapters = train(opt, name, method, {c: concepts[c] for c in todo}) if todo else {}
        for c in todo:
            start = time.time()
            images = sample(opt, name, adapters[c], {"name": c, **concepts[c]}, prompts, device)
            per_image = score(opt, scorers, concepts[c], prompts, images)
            made_by = {"config": method["config"], "overrides": method["overrides"], "ckpt_path": opt.ckpt_path,
                       "training_steps": opt.steps, "training_seed": 23,
                       "seeds": list(range(opt.seed, opt.seed + opt.n_images)), "ddim_steps": opt.ddim_steps,
                       "scale": opt.scale, "prompts": prompts, "torch": torch.__version__,
                       "transformers": transformers.__version__, "seconds": round(time.time() - start, 1)}
            cells[name, c] = {"method": name, "concept": c, "means": comparison.cell_means(per_image),
                              "per_image": per_image, "made_by": made_by}
            comparison.write_cell(opt.out, name, c, cells[name, c])
            print(f"cell {name} / {c}: " + ", ".join(f"{k} {v:.3f}" for k, v in cells[name, c]["means"].items()))
    results = comparison.table(cells, methods, list(concepts))
    title = (f"{len(concepts)} concept(s) x {len(prompts)} prompt(s) x {opt.n_images} image(s), "
             f"{'toy world' if opt.toy else os.path.basename(opt.ckpt_path)}")
    md = comparison.write_results(opt.out, results, methods, list(concepts), title)
    for c in concepts:
        rows = [[load_rgb(os.path.join(opt.out, row["image"])) for row in cells[m, c]["per_image"][::opt.n_images]]
                for m in methods]  # each prompt's first seed
        save_sheet(os.path.join(opt.out, "sheets", f"{c}.png"), rows, [methods[m]["label"] for m in methods],
                   [t.format(concepts[c]["word"]) for t in prompts])
    print(md)
    print(f"{len(computed)} cell(s) computed, {len(cells) - len(computed)} read back; results in {opt.out}/results.md")
    return results, cells, len(computed)


def main(argv=None):
    from ldm.util import one_line_errors

    opt = get_parser().parse_args(argv)
    with one_line_errors(opt.debug):
        return run(opt)


if __name__ == "__main__":
    main()
