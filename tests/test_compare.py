"""scripts/compare.py and ldm/evaluation/comparison.py: a toy comparison end to end, its table against its cells,
incremental reruns, the field's metrics against direct computations, and bad input."""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.cli import compare
from ldm.evaluation import comparison

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """2 toy concepts x 2 methods x 2 prompts, 1 image each, a few training steps."""
    from ldm.toy.scenes import CONCEPTS, write_concept_folder

    root = tmp_path_factory.mktemp("compare")
    for shape in ("circle", "square"):
        folder = root / "concepts" / shape
        write_concept_folder(str(folder), n=3, shape=shape)
        (folder / "concept.yaml").write_text(f"stripes: [{', '.join(CONCEPTS[shape])}]\n")
    (root / "prompts.txt").write_text("# two prompts\n{} on a blue background\n\n{} on a white background\n")
    argv = ["--toy", "--concepts", str(root / "concepts"), "--prompts", str(root / "prompts.txt"), "--steps", "4",
            "--n_images", "1", "--methods", "catversion", "textual_inversion", "--out", str(root / "out")]
    return root, argv, compare.main(argv)


def test_table_is_the_mean_and_std_of_the_cells_which_are_the_means_of_their_images(toy_run):
    root, _, (results, cells, computed) = toy_run
    assert computed == 4 and len(cells) == 4
    assert set(results) == {"toy_fidelity", "toy_editability"}
    saved = json.loads((root / "out" / "results.json").read_text())
    for metric, rows in saved.items():
        assert set(rows) == {"catversion", "textual_inversion"}
        for method, row in rows.items():
            cell_files = {c: json.loads((root / "out" / "cells" / method / f"{c}.json").read_text())
                          for c in ("circle", "square")}
            values = []
            for c, cell in cell_files.items():
                assert len(cell["per_image"]) == 2  # 2 prompts x 1 image
                assert cell["means"][metric] == pytest.approx(statistics.mean(r[metric] for r in cell["per_image"]))
                assert row["per_concept"][c] == pytest.approx(cell["means"][metric])
                values.append(cell["means"][metric])
            assert row["mean"] == pytest.approx(statistics.mean(values))
            assert row["std"] == pytest.approx(statistics.pstdev(values))
    csv_rows = (root / "out" / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 2 * 2 + 2  # header, method x concept, a mean row per method
    md = (root / "out" / "results.md").read_text()
    assert "| CatVersion, layers 9-11 |" in md and "| Textual Inversion |" in md
    for c in ("circle", "square"):
        with Image.open(root / "out" / "sheets" / f"{c}.png") as sheet:
            assert sheet.width >= 2 * 256 and sheet.height >= 2 * 256  # 2 x 2 cells of enlarged 64 px images
    cell = json.loads((root / "out" / "cells" / "catversion" / "circle.json").read_text())
    assert cell["made_by"]["seeds"] == [42] and cell["made_by"]["training_steps"] == 4
    assert cell["made_by"]["prompts"] == ["{} on a blue background", "{} on a white background"]


def test_rerun_computes_only_the_deleted_cell(toy_run):
    root, argv, _ = toy_run
    cells = root / "out" / "cells"
    before = {p: p.stat().st_mtime_ns for p in cells.rglob("*.json")}
    runs = sorted(p.name for p in (root / "out" / "runs").rglob("*") if p.is_dir() and p.parent.parent == root / "out" / "runs")
    os.remove(cells / "textual_inversion" / "square.json")
    _, _, computed = compare.main(argv)
    assert computed == 1
    after = {p: p.stat().st_mtime_ns for p in cells.rglob("*.json")}
    changed = [p for p in after if after[p] != before.get(p)]
    assert changed == [cells / "textual_inversion" / "square.json"]
    assert sorted(p.name for p in (root / "out" / "runs").rglob("*") if p.is_dir() and p.parent.parent == root / "out" / "runs") == runs


def test_field_metrics_equal_direct_computations(tmp_path):
    """CLIP-I over all pairs, CLIP-T on the prompt with the class word, CLIPScore = 2.5 max(CLIP-T, 0), DINO."""
    from ldm.evaluation.clip_metrics import load_clip
    from ldm.evaluation.dino import VIT_S16, load_dino
    from transformers import ViTConfig, ViTModel

    name = "catversion-test-compare-clip"
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps({"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64,
                                  "patch_size": 8, "head_width": 32},
                                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                                               "layers": 2}}))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    torch.save(open_clip.create_model(name).state_dict(), tmp_path / "clip.bin")
    ViTModel(ViTConfig(**VIT_S16), add_pooling_layer=False).save_pretrained(tmp_path / "dino")
    g = torch.Generator().manual_seed(1)
    blob = lambda: Image.fromarray(torch.randint(0, 256, (4, 4, 3), generator=g, dtype=torch.uint8).numpy()).resize(  # noqa: E731
        (48, 48), Image.Resampling.BICUBIC)
    (tmp_path / "ref").mkdir()
    for i in range(3):
        blob().save(tmp_path / "ref" / f"{i}.png")
    images = []
    for i, seed in [(0, 5), (1, 5)]:
        path = tmp_path / "gen" / f"{i}-{seed}.png"
        path.parent.mkdir(exist_ok=True)
        blob().save(path)
        images.append((i, seed, str(path)))
    prompts = ["a {} on the beach", "a {} in the snow"]
    opt = type("Opt", (), {"toy": False, "out": str(tmp_path)})()
    scorers = {"clip": load_clip(name, tmp_path / "clip.bin"), "dino": load_dino(str(tmp_path / "dino"))}
    rows = compare.score(opt, scorers, {"root": str(tmp_path / "ref"), "word": "teddybear"}, prompts, images)

    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(tmp_path / "clip.bin"),
                                                                 force_quick_gelu=True)
    dino = ViTModel.from_pretrained(tmp_path / "dino").eval()
    from ldm.evaluation.dino import PREPROCESS
    with torch.no_grad():
        def clip_image(p):
            return F.normalize(model.eval().encode_image(preprocess(Image.open(p).convert("RGB"))[None])[0], dim=0)

        def dino_image(p):
            return F.normalize(dino(pixel_values=PREPROCESS(Image.open(p).convert("RGB"))[None]).last_hidden_state[0, 0], dim=0)

        refs = sorted((tmp_path / "ref").iterdir())
        for row, (i, _, path) in zip(rows, images):
            text = F.normalize(model.encode_text(open_clip.get_tokenizer(name)([prompts[i].format("teddybear")]))[0], dim=0)
            assert row["clip_t"] == pytest.approx(float(clip_image(path) @ text), abs=1e-5)
            assert row["clipscore"] == pytest.approx(2.5 * max(row["clip_t"], 0.0))
            assert row["clip_i"] == pytest.approx(statistics.mean(float(clip_image(path) @ clip_image(r)) for r in refs), abs=1e-5)
            assert row["dino"] == pytest.approx(statistics.mean(float(dino_image(path) @ dino_image(r)) for r in refs), abs=1e-5)
    means = comparison.cell_means(rows)
    assert means["geometric_mean"] == pytest.approx((max(means["clip_i"], 0) * max(means["clip_t"], 0)) ** 0.5)


def test_toy_without_concepts_draws_the_three_toy_concepts_and_finishes_a_cut_short_one(tmp_path):
    """`compare --toy` alone (the README's command) draws CONCEPTS into <out>/concepts, each with its word and stripes;
    a folder left without its concept.yaml (a run cut short) is drawn again, a finished one is left alone."""
    from ldm.toy.scenes import CONCEPTS

    opt = compare.get_parser().parse_args(["--toy", "--out", str(tmp_path)])
    concepts, methods, prompts = compare.prepare(opt)
    assert {c["word"]: tuple(c["stripes"]) for c in concepts.values()} == CONCEPTS
    assert all(len(os.listdir(c["root"])) == 6 for c in concepts.values())  # 5 images and concept.yaml
    assert "catversion" in methods and prompts
    first, second = sorted(concepts.values(), key=lambda c: c["word"])[:2]
    os.remove(os.path.join(first["root"], "concept.yaml"))
    os.remove(os.path.join(first["root"], "00.png"))
    os.remove(os.path.join(second["root"], "00.png"))
    again, _, _ = compare.prepare(compare.get_parser().parse_args(["--toy", "--out", str(tmp_path)]))
    assert again == concepts
    assert os.path.isfile(os.path.join(first["root"], "00.png"))
    assert not os.path.exists(os.path.join(second["root"], "00.png"))


@pytest.mark.parametrize("case, message", [
    ("empty_concept", "no images"),
    ("unknown_method", "is no preset"),
    ("no_prompts", "holds no prompts"),
    ("no_clip_weights", "--clip_weights is required outside the toy world"),
])
def test_bad_input_is_one_line_before_any_training(tmp_path, case, message):
    from ldm.toy.scenes import write_concept_folder

    write_concept_folder(str(tmp_path / "concepts" / "circle"), n=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("{} on a blue background\n" if case != "no_prompts" else "# nothing\n\n")
    argv = ["--concepts", str(tmp_path / "concepts"), "--prompts", str(prompts), "--out", str(tmp_path / "out")]
    argv += ["--methods", "catversion", "nonsense"] if case == "unknown_method" else []
    argv += ["--ckpt_path", "models/toy/toy-sd.ckpt", "--configs", "configs/toy"] if case == "no_clip_weights" else ["--toy"]
    if case == "empty_concept":
        (tmp_path / "concepts" / "empty").mkdir()
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "compare.py"), *argv], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "runs").exists()


def test_readers_refuse_missing_files_repeated_methods_and_empty_folders(tmp_path):
    with pytest.raises(ValueError, match="prompt file not found: .*nope.txt; pass --prompts"):
        comparison.read_prompts(str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match=r"--methods names a method twice: \['catversion', 'catversion'\]"):
        comparison.read_methods("configs/compare/methods.yaml", ["catversion", "catversion"])
    with pytest.raises(ValueError, match="concept folder not found: .*nope; pass --concepts"):
        comparison.read_concepts(str(tmp_path / "nope"))
    (tmp_path / "concepts" / ".hidden").mkdir(parents=True)
    (tmp_path / "concepts" / "notes.txt").write_text("not a concept")
    with pytest.raises(ValueError, match="no concept folders in .*concepts; put one folder of photos per concept"):
        comparison.read_concepts(str(tmp_path / "concepts"))
