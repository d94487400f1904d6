"""A comparison of personalization methods as papers report one: methods x concepts x prompts, scored per image,
averaged per (method, concept) cell, then mean and standard deviation over concepts per method.

A cell is one JSON file, `<out>/cells/<method>/<concept>.json`: its per-image scores, their means, and what made them
(config, overrides, seeds, prompts, versions). The table is computed from the cells alone, so it can always be
rebuilt, and a comparison grows cell by cell: a deleted or new cell is the only one computed again.
"""
import json
import math
import os
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from ldm import report
from ldm.images import list_images

# Metric keys in table order, with the names papers use. CLIP-T is scored on the prompt as a base model would read
# it: the concept's identifier (a Textual Inversion placeholder) replaced by its class word.
METRICS = {
    "dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "clipscore": "CLIPScore (2.5 max(CLIP-T, 0))",
    "geometric_mean": "sqrt(CLIP-I CLIP-T)", "toy_fidelity": "toy fidelity", "toy_editability": "toy editability",
}


def read_prompts(path):
    """Prompt templates, one per line (`{}` = the concept's word); blank lines and `#` comments skipped."""
    if not os.path.isfile(path):
        raise ValueError(f"prompt file not found: {path}; pass --prompts with a file such as "
                         "configs/prompts/objects.txt")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts; write one prompt per line, `{{}}` where the concept's word goes")
    return prompts


def read_methods(path, names):
    """{name: {label, config, overrides}} for `names` from a YAML file of presets."""
    presets = OmegaConf.to_container(OmegaConf.load(path)) or {}
    unknown = [n for n in names if n not in presets]
    if unknown:
        raise ValueError(f"method {unknown[0]!r} is no preset in {path}; pick from {', '.join(presets)} or add it "
                         "there")
    if len(set(names)) != len(names):
        raise ValueError(f"--methods names a method twice: {names}")
    return {n: {"label": presets[n].get("label", n), "config": presets[n]["config"],
                "overrides": list(presets[n].get("overrides", []))} for n in names}


def read_concepts(folder):
    """{name: {root, word, ...}}: each subfolder of `folder` with images is a concept. Its word is the folder name,
    unless a `concept.yaml` in it says `word:` (and, in the toy world, `stripes:`)."""
    if not os.path.isdir(folder):
        raise ValueError(f"concept folder not found: {folder}; pass --concepts with a folder of concept folders")
    concepts = {}
    for name in sorted(os.listdir(folder)):
        root = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isdir(root):
            continue
        list_images(root)  # one line naming the folder if it holds no images
        yaml = os.path.join(root, "concept.yaml")
        extra = (OmegaConf.to_container(OmegaConf.load(yaml)) or {}) if os.path.isfile(yaml) else {}
        concepts[name] = {"root": root, "word": str(extra.pop("word", name)), **extra}
    if not concepts:
        raise ValueError(f"no concept folders in {folder}; put one folder of photos per concept there")
    return concepts


def _cell_path(out, method, concept):
    return os.path.join(out, "cells", method, f"{concept}.json")


def write_cell(out, method, concept, cell):
    report.write_files({_cell_path(out, method, concept): json.dumps(cell, indent=1) + "\n"})


def read_cell(out, method, concept):
    """The saved cell, or None if it has not been computed."""
    path = _cell_path(out, method, concept)
    return json.loads(Path(path).read_text()) if os.path.isfile(path) else None


def cell_means(per_image):
    """A cell's metric means over its images (geometric mean from the means, as papers compute it)."""
    keys = [k for k in METRICS if k in per_image[0]]
    means = {k: statistics.mean(row[k] for row in per_image) for k in keys}
    if "clip_i" in means and "clip_t" in means:
        means["geometric_mean"] = math.sqrt(max(means["clip_i"], 0.0) * max(means["clip_t"], 0.0))
    return means


def table(cells, methods, concepts):
    """{metric: {method: {"mean", "std", "per_concept": {concept: value}}}} over the concepts (population std)."""
    out = {}
    for metric in METRICS:
        for m in methods:
            values = {c: cells[m, c]["means"][metric] for c in concepts if metric in cells[m, c]["means"]}
            if values:
                out.setdefault(metric, {})[m] = {"mean": statistics.mean(values.values()),
                                                 "std": statistics.pstdev(values.values()), "per_concept": values}
    return out


def write_results(out, results, methods, concepts, title):
    """results.json, results.csv (per method and concept, then the means), results.md (mean ± std per method and
    metric, then per concept), results.png (bars with the std as error bars); returns the markdown."""
    metrics = list(results)
    labels = {m: methods[m]["label"] for m in methods}
    rows = [{"method": m, "concept": c, **{k: results[k][m]["per_concept"].get(c) for k in metrics}}
            for m in methods for c in concepts]
    rows += [{"method": m, "concept": "mean", **{k: results[k][m]["mean"] for k in metrics}} for m in methods]
    names = [METRICS[k] for k in metrics]
    means = [[labels[m], *(f"{results[k][m]['mean']:.3f} ± {results[k][m]['std']:.3f}" for k in metrics)]
             for m in methods]
    per_concept = [[labels[m], c, *(f"{results[k][m]['per_concept'][c]:.3f}" for k in metrics)]
                   for m in methods for c in concepts]
    md = (f"{title}\n\nMean ± standard deviation over {len(concepts)} concept(s).\n\n"
          f"{report.markdown_table(['method', *names], means)}\nPer concept:\n\n"
          f"{report.markdown_table(['method', 'concept', *names], per_concept)}")
    chart = report.bar_chart(names, {labels[m]: [results[k][m]["mean"] for k in metrics] for m in methods},
                             errors={labels[m]: [results[k][m]["std"] for k in metrics] for m in methods}, title=title)
    files = {"json": json.dumps(results, indent=1) + "\n", "csv": report.csv_text(rows), "md": md, "png": chart}
    report.write_files({os.path.join(out, f"results.{ext}"): data for ext, data in files.items()})
    return md
