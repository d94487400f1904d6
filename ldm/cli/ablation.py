#!/usr/bin/env python
"""Where to concatenate: train -> sample -> evaluate CatVersion variants (and the Textual Inversion baseline).

    python scripts/ablation.py --ckpt_path models/sd/v1-5.ckpt --concept data/teddybear:teddybear \\
        --presets deep shallow middle all tokens2 tokens4 ti --prompts "a photo of a {}" "{} on the beach" \\
        --clip_weights models/clip/vit-b-32.bin --outdir outputs/ablation

Each variant is trained with the same main.py (`--base` plus the variant's `key=value` overrides) on every
concept, then every prompt is sampled (`{}` becomes the class word, or the placeholder for Textual Inversion) with
the seeds `--seed`, `--seed + 1`, ... and scored against the concept's photos. Writes <outdir>/ablation.csv,
ablation.md and ablation.png (mean over concepts per variant), samples.png (a sheet: one row per variant and
concept, one column per prompt and seed), the images under <outdir>/samples/<variant>/<concept>/ and the runs under
<outdir>/runs/.

Metrics: with --clip_weights, CLIP-I, CLIP-T (against the prompt with the class word) and their geometric mean, as
scripts/evaluate.py computes them (mean over prompts). Without CLIP weights, a stand-in that needs no download:
`pixel_cosine`, the mean cosine similarity over all (reference, generated) pairs of the images shrunk to 32x32 (box
filter) and scaled to [-1, 1], flattened. It measures colour layout, not identity; label it as such when reporting.

Presets (CatVersion knobs of `model.params.cond_stage_config.params.concat_kv`): deep = layers 9-11 (the default),
shallow = 0-2, middle = 4-6, all = 0-11, tokens2 / tokens4 = layers 9-11 with 2 / 4 tokens per layer, ti = Textual
Inversion (the v1-finetune-textual-inversion.yaml beside --base). Own variants: `--variant NAME key=value ...`,
where the pseudo-key `base=CONFIG` swaps the config file.
"""
import argparse
import csv
import io
import os
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONCAT_KV = "model.params.cond_stage_config.params.concat_kv"
PRESETS = {
    "deep": [f"{CONCAT_KV}.layers=[9,10,11]"],
    "shallow": [f"{CONCAT_KV}.layers=[0,1,2]"],
    "middle": [f"{CONCAT_KV}.layers=[4,5,6]"],
    "all": [f"{CONCAT_KV}.layers=[{','.join(map(str, range(12)))}]"],
    "tokens2": [f"{CONCAT_KV}.layers=[9,10,11]", f"{CONCAT_KV}.num_tokens=2"],
    "tokens4": [f"{CONCAT_KV}.layers=[9,10,11]", f"{CONCAT_KV}.num_tokens=4"],
    "ti": ["base=v1-finetune-textual-inversion.yaml"],
}
PIXEL_SIDE = 32
LABELS = {"pixel_cosine": f"pixel cosine ({PIXEL_SIDE}x{PIXEL_SIDE}, not CLIP)", "clip_i": "CLIP-I",
          "clip_t": "CLIP-T", "geometric_mean": "geometric mean"}


def get_parser():
    from ldm.util import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--base", default="configs/stable-diffusion/v1-finetune.yaml", help="CatVersion training config")
    p.add_argument("--ckpt_path", required=True, help="the base SD checkpoint (main.py --actual_resume)")
    p.add_argument("--concept", nargs="+", required=True, metavar="DATA_ROOT:WORD",
                   help="concept photo folder and its class word, e.g. data/teddybear:teddybear")
    p.add_argument("--presets", nargs="*", default=["deep", "shallow"], choices=sorted(PRESETS), help="preset variants")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME KEY=VALUE",
                   help="an own variant: a name, then config overrides (base=CONFIG swaps the config file)")
    p.add_argument("--prompts", nargs="+", default=["a photo of a {}"], help="prompt templates; {} = the concept word")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's max_steps)")
    p.add_argument("--n_images", type=int, default=4, help="images per prompt (seeds seed, seed + 1, ...)")
    p.add_argument("--ddim_steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--scale", type=float, default=10.0, help="classifier-free guidance scale")
    p.add_argument("--H", type=int, default=None, help="image side (default: the training size of the config)")
    p.add_argument("--seed", type=int, default=42, help="first sampling seed; training uses main.py's --seed 23")
    p.add_argument("--clip_weights", default=None, help="open_clip weights file; without it the pixel metric is used")
    p.add_argument("--clip_model", default="ViT-B-32", help="open_clip model name")
    p.add_argument("--outdir", default="outputs/ablation", help="folder for runs, samples and the table")
    p.add_argument("--device", default=None, help="sampling device; default: cuda if available, else cpu")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


# --- inputs ------------------------------------------------------------------------------------------------
def parse_concepts(items):
    concepts = []
    for item in items:
        root, sep, word = item.rpartition(":")
        if not sep or not root or not word:
            raise ValueError(f"--concept {item!r} must be DATA_ROOT:WORD, e.g. data/teddybear:teddybear")
        if not os.path.isdir(root):
            raise ValueError(f"--concept {item!r}: folder {root} not found; pass a folder of the concept's photos")
        concepts.append((os.path.basename(os.path.normpath(root)), root, word))
    names = [c[0] for c in concepts]
    if len(set(names)) != len(names):
        raise ValueError(f"two --concept folders share the name {names}; give each concept its own folder name")
    return concepts


def build_variants(opt):
    """[(name, config path, [overrides])] from the presets and the --variant lists."""
    variants = [(name, list(PRESETS[name])) for name in opt.presets] + [(v[0], v[1:]) for v in opt.variant]
    names = [n for n, _ in variants]
    if len(names) < 1 or len(set(names)) != len(names):
        raise ValueError(f"variant names must be distinct and at least one, got {names}")
    out = []
    for name, items in variants:
        base, overrides = opt.base, []
        for item in items:
            if "=" not in item:
                raise ValueError(f"--variant {name}: {item!r} is not KEY=VALUE")
            key, value = item.split("=", 1)
            if key == "base":
                base = value if os.path.isfile(value) else os.path.join(os.path.dirname(opt.base), value)
            else:
                overrides.append(item)
        if not os.path.isfile(base):
            raise ValueError(f"variant {name}: config {base} not found; pass base=PATH to an existing config")
        out.append((name, base, overrides))
    return out


# --- one variant on one concept ------------------------------------------------------------------------------
def train(opt, name, base, overrides, concept, logdir, seed=None):
    """Train through main.py (with its --seed `seed` when given); returns (model, info for the table, TI placeholder
    or None, the config's image size)."""
    from ldm.cli import train as main
    from omegaconf import OmegaConf

    _, root, word = concept
    config = OmegaConf.load(base)
    personalization = config.model.params.get("personalization_config")
    args = ["--base", base, "-t", "--actual_resume", opt.ckpt_path, "--data_root", root, "-l", logdir, "-n", name]
    if personalization is None:
        args += ["--init_word", word]
    else:  # Textual Inversion: the captions hold the placeholder; the class word only initialises the vector
        args.append(f"model.params.personalization_config.params.initializer_words=[{word}]")
    if opt.steps is not None:
        args.append(f"lightning.trainer.max_steps={opt.steps}")
    if seed is not None:
        args += ["--seed", str(seed)]
    if OmegaConf.select(config, "lightning.callbacks.image_logger") is not None:
        args.append("lightning.callbacks.image_logger.params.batch_frequency=0")  # the ablation samples itself
    start = time.time()
    _, model = main.run(*main.get_parser().parse_known_args(args + overrides))
    merged = OmegaConf.merge(config, OmegaConf.from_dotlist(overrides))
    concat_kv = OmegaConf.select(merged, CONCAT_KV)
    info = {
        "method": "textual inversion" if personalization is not None else "catversion",
        "layers": "-" if concat_kv is None else " ".join(map(str, concat_kv.layers)),
        "tokens": "-" if concat_kv is None else concat_kv.num_tokens,
        "trainable": sum(p.numel() for p in model.trainable_parameters()),
        "steps": OmegaConf.select(merged, "lightning.trainer.max_steps") if opt.steps is None else opt.steps,
        "train_seconds": round(time.time() - start, 1),
    }
    placeholder = personalization.params.placeholder_strings[0] if personalization is not None else None
    size = OmegaConf.select(merged, "data.params.train.params.size")
    return model, info, placeholder, size


def sample(opt, model, prompts, folder, side, device):
    """{template: [image paths]}; every template sampled with the seeds seed .. seed + n_images - 1."""
    from ldm import sampling

    model = model.to(device).eval()
    uc = sampling.unconditional_embedding(model, cache_dir="") if opt.scale != 1.0 else None
    out = {}
    for template, prompt in prompts.items():
        cond = model.get_learned_conditioning([prompt])
        name = sampling.prompt_to_name(prompt)
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        out[template] = []
        for i in range(opt.n_images):
            image = sampling.sample_images(model, cond, uc, opt.seed + i, side, side, opt.ddim_steps, opt.scale,
                                           progress=False)[0]
            path = os.path.join(folder, name, f"{name}_{opt.seed + i}.png")
            out[template].append(sampling.save_image(sampling.to_uint8(image), path))
    return out


# --- metrics -------------------------------------------------------------------------------------------------
def pixel_vectors(images, side=PIXEL_SIDE):
    """Images -> (n, side*side*3) float vectors in [-1, 1] (box-filtered to side x side)."""
    import numpy as np
    import torch
    from PIL import Image

    arrays = [np.asarray(im.convert("RGB").resize((side, side), Image.Resampling.BOX), dtype=np.float32) for im in images]
    return torch.from_numpy(np.stack(arrays)).reshape(len(arrays), -1) / 127.5 - 1.0


def pixel_cosine(ref_images, gen_images):
    """Mean cosine over all (reference, generated) pairs of `pixel_vectors`."""
    import torch.nn.functional as F

    ref, gen = F.normalize(pixel_vectors(ref_images), dim=-1), F.normalize(pixel_vectors(gen_images), dim=-1)
    return (gen @ ref.T).mean().item()


def score(clip, refs, gens, prompt_text):
    if clip is None:
        return {"pixel_cosine": pixel_cosine(list(refs.values()), list(gens.values()))}
    from ldm.evaluation import clip_metrics

    result = clip_metrics.compute_metrics(clip, refs, gens, prompt_text)
    return {k: result[k] for k in ("clip_i", "clip_t", "geometric_mean")}


# --- the table -----------------------------------------------------------------------------------------------
COLUMNS = ["variant", "concept", "method", "layers", "tokens", "trainable", "steps", "train_seconds"]


def add_means(rows, metrics):
    """Per variant, a row `concept = mean` averaging the metrics over its concepts."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        out += mine
        if len(mine) > 1:
            mean = {**mine[0], "concept": "mean", "train_seconds": round(sum(r["train_seconds"] for r in mine), 1)}
            mean.update({m: sum(r[m] for r in mine) / len(mine) for m in metrics})
            out.append(mean)
    return out


def markdown(rows, metrics):
    head = COLUMNS + [LABELS[m] for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        cells = [str(r[c]) for c in COLUMNS] + [f"{r[m]:.4f}" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(rows, metrics, title):
    """PNG bytes: per variant, the metrics averaged over concepts, as grouped bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    figure = Figure(figsize=(1.2 * len(variants) * len(metrics) + 2, 3.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(metrics)
    for k, m in enumerate(metrics):
        values = []
        for v in variants:
            mine = [r[m] for r in rows if r["variant"] == v and r["concept"] != "mean"]
            values.append(sum(mine) / len(mine))
        bars = axes.bar([i + k * width for i in range(len(variants))], values, width, label=LABELS[m])
        axes.bar_label(bars, fmt="%.3f", fontsize=8)
    axes.set_xticks([i + width * (len(metrics) - 1) / 2 for i in range(len(variants))], variants)
    axes.set_ylabel("cosine similarity")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_table(outdir, rows, metrics, title):
    from ldm.util import atomic_write

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS + metrics, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: r[k] for k in COLUMNS + metrics} for r in rows)
    paths = {"csv": Path(outdir, "ablation.csv"), "md": Path(outdir, "ablation.md"), "png": Path(outdir, "ablation.png")}
    payloads = {"csv": text.getvalue().encode(), "md": (f"{title}\n\n" + markdown(rows, metrics)).encode(),
                "png": bar_chart(rows, metrics, title)}
    for key, data in payloads.items():
        atomic_write(paths[key], lambda tmp, data=data: Path(tmp).write_bytes(data))
    return {k: str(p) for k, p in paths.items()}


# --- driver --------------------------------------------------------------------------------------------------
def run(opt):
    import torch

    from ldm.evaluation import clip_metrics
    from ldm.config import resolve_device
    from ldm.report import save_sheet

    concepts = parse_concepts(opt.concept)
    variants = build_variants(opt)
    if not os.path.isfile(opt.ckpt_path):
        raise ValueError(f"checkpoint not found: {opt.ckpt_path}; pass --ckpt_path with an SD v1.x checkpoint")
    if opt.n_images < 1:
        raise ValueError(f"--n_images {opt.n_images} must be at least 1")
    clip = clip_metrics.load_clip(opt.clip_model, opt.clip_weights) if opt.clip_weights else None
    metrics = ["pixel_cosine"] if clip is None else ["clip_i", "clip_t", "geometric_mean"]
    device = resolve_device(opt.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(opt.outdir, exist_ok=True)
    rows, sheet = [], {}  # sheet: row label -> image paths, in the columns' order
    for name, base, overrides in variants:
        for concept in concepts:
            cname, root, word = concept
            model, info, placeholder, size = train(opt, name, base, overrides, concept, os.path.join(opt.outdir, "runs", name))
            prompts = {t: t.format(placeholder or word) if "{}" in t else t for t in opt.prompts}
            folder = os.path.join(opt.outdir, "samples", name, cname)
            paths = sample(opt, model, prompts, folder, opt.H or size, device)
            refs = {stem: clip_metrics.load_image(p) for stem, p in clip_metrics.list_images(root).items()}
            per_prompt = [score(clip, refs, {os.path.basename(p): clip_metrics.load_image(p) for p in paths[t]},
                                t.format(word) if "{}" in t else t) for t in opt.prompts]
            row = {"variant": name, "concept": cname, **info}
            row.update({m: sum(s[m] for s in per_prompt) / len(per_prompt) for m in metrics})
            rows.append(row)
            sheet[f"{name} / {cname}"] = [p for t in opt.prompts for p in paths[t]]
            del model
    title = (f"{len(concepts)} concept(s), {len(opt.prompts)} prompt(s) x {opt.n_images} image(s), "
             f"{'CLIP ' + opt.clip_model if clip else LABELS['pixel_cosine']}")
    rows = add_means(rows, metrics)
    paths = write_table(opt.outdir, rows, metrics, title)
    paths["samples"] = os.path.join(opt.outdir, "samples.png")
    save_sheet(paths["samples"], [[clip_metrics.load_image(p) for p in row] for row in sheet.values()], list(sheet),
               [f"{t} (seed {opt.seed + i})" for t in opt.prompts for i in range(opt.n_images)])
    print(markdown(rows, metrics))
    print(f"Wrote {paths['csv']}, {paths['md']}, {paths['png']} and {paths['samples']}")
    return rows, paths


def main(argv=None):
    from ldm.util import one_line_errors

    opt = get_parser().parse_args(argv)
    with one_line_errors(opt.debug):
        return run(opt)


if __name__ == "__main__":
    main()
