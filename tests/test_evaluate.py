"""scripts/evaluate.py and ldm/evaluation/clip_metrics.py against a direct open_clip computation.

Models have random weights saved to a temporary file; the numeric tests use a tiny open_clip
config registered for the test, and one test loads a saved ViT-B-32 state dict through the CLI.
"""

import csv
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from ldm.evaluation import clip_metrics

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "evaluate.py"
TINY = "catversion-test-tiny-clip"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PROMPT = "a teddybear wearing sunglasses"


def _load_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluate = _load_script()


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_clip")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder / f"{TINY}.json")
    torch.manual_seed(0)
    path = folder / "tiny.bin"
    torch.save(open_clip.create_model(TINY).state_dict(), path)
    return path


def _random_image(rng, size=(48, 48)):
    # Smooth blobs (upsampled noise) rather than pixel noise, so images differ at CLIP's scale.
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def _write_images(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(folder / name)


def _oracle(model_name, weights, ref_paths, gen_paths, prompt=PROMPT):
    """Per generated image: mean cosine to the references and cosine to the prompt, one image at a time."""
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=str(weights), force_quick_gelu=True
    )
    model.eval()

    def image_feature(path):
        with torch.no_grad():
            feature = model.encode_image(preprocess(Image.open(path).convert("RGB"))[None])[0]
        return F.normalize(feature, dim=0)

    with torch.no_grad():
        text = F.normalize(model.encode_text(open_clip.get_tokenizer(model_name)([prompt]))[0], dim=0)
    refs = [image_feature(p) for p in ref_paths]
    rows = []
    for path in gen_paths:
        gen = image_feature(path)
        rows.append((sum(float(gen @ r) for r in refs) / len(refs), float(gen @ text)))
    return rows


def _argv(tmp_path, weights, model=TINY, **extra):
    argv = ["--ref_dir", str(tmp_path / "ref"), "--gen_dir", str(tmp_path / "gen"), "--prompt", PROMPT,
            "--clip_weights", str(weights), "--clip_model", model, "--out", str(tmp_path / "out" / "scores.json")]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    return argv


def test_metrics_match_direct_computation(tmp_path, tiny_weights, capsys):
    rng = np.random.default_rng(1)
    _write_images(tmp_path / "ref", {"r0.png": _random_image(rng), "r1.jpg": _random_image(rng, (64, 40))})
    _write_images(tmp_path / "gen", {f"g{i}.png": _random_image(rng) for i in range(3)})
    # Ignored: hidden files and files that are not images.
    _write_images(tmp_path / "gen", {".hidden.png": _random_image(rng)})
    (tmp_path / "gen" / "notes.txt").write_text("not an image")

    evaluate.main(_argv(tmp_path, tiny_weights, batch_size=2))

    ref_paths = sorted((tmp_path / "ref").glob("r*"))
    gen_paths = sorted((tmp_path / "gen").glob("g*.png"))
    expected = _oracle(TINY, tiny_weights, ref_paths, gen_paths)
    report = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert (report["num_ref"], report["num_gen"]) == (2, 3)
    assert [row["image"] for row in report["per_image"]] == [p.name for p in gen_paths]
    for row, (clip_i, clip_t) in zip(report["per_image"], expected):
        assert row["clip_i"] == pytest.approx(clip_i, abs=1e-6)
        assert row["clip_t"] == pytest.approx(clip_t, abs=1e-6)
    mean_i = sum(r[0] for r in expected) / 3
    mean_t = sum(r[1] for r in expected) / 3
    assert report["clip_i"] == pytest.approx(mean_i, abs=1e-6)
    assert report["clip_t"] == pytest.approx(mean_t, abs=1e-6)
    assert report["geometric_mean"] == pytest.approx(math.sqrt(max(mean_i, 0) * max(mean_t, 0)), abs=1e-6)
    assert "masked_clip_i" not in report

    with open(tmp_path / "out" / "scores.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [list(r) for r in rows] == [["image", "clip_i", "clip_t"]] * 3
    for row, json_row in zip(rows, report["per_image"]):
        assert float(row["clip_i"]) == pytest.approx(json_row["clip_i"], abs=1e-12)
    with Image.open(tmp_path / "out" / "scores.png") as chart:
        assert chart.format == "PNG" and chart.width > 100
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scores.csv", "scores.json", "scores.png"]
    printed = capsys.readouterr().out
    assert "g2.png" in printed and f"{report['clip_i']:.4f}" in printed


def _masked_setup(tmp_path, ref_images, gen_images, ref_masks, gen_masks):
    _write_images(tmp_path / "ref", ref_images)
    _write_images(tmp_path / "gen", gen_images)
    _write_images(tmp_path / "ref_masks", {k: Image.fromarray(v.astype(np.uint8) * 255) for k, v in ref_masks.items()})
    _write_images(tmp_path / "gen_masks", {k: Image.fromarray(v.astype(np.uint8) * 255) for k, v in gen_masks.items()})
    return {"ref_masks": tmp_path / "ref_masks", "gen_masks": tmp_path / "gen_masks"}


def test_all_ones_masks_give_plain_clip_i(tmp_path, tiny_weights):
    rng = np.random.default_rng(2)
    ones = np.ones((48, 48), dtype=bool)
    masks = _masked_setup(
        tmp_path,
        {"a.png": _random_image(rng), "b.png": _random_image(rng)},
        {"x.png": _random_image(rng), "y.webp": _random_image(rng)},
        {"a.png": ones, "b.png": ones},
        {"x.png": ones, "y.png": ones},
    )
    evaluate.main(_argv(tmp_path, tiny_weights, **masks))
    report = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert report["masked_clip_i"] == pytest.approx(report["clip_i"], abs=1e-6)
    for row in report["per_image"]:
        assert row["masked_clip_i"] == pytest.approx(row["clip_i"], abs=1e-6)
    with open(tmp_path / "out" / "scores.csv", newline="") as file:
        assert next(csv.reader(file)) == ["image", "clip_i", "clip_t", "masked_clip_i"]


def test_masked_clip_i_ignores_background(tmp_path, tiny_weights):
    rng = np.random.default_rng(3)
    concept = np.asarray(_random_image(rng))
    mask = np.zeros((48, 48), dtype=bool)
    mask[10:40, 14:30] = True  # not square: the crop is padded
    background = np.asarray(_random_image(rng))
    generated = np.where(mask[..., None], concept, background).astype(np.uint8)
    masks = _masked_setup(
        tmp_path,
        {"ref.png": Image.fromarray(concept)},
        {"gen.png": Image.fromarray(generated)},
        {"ref.png": mask},
        {"gen.png": mask},
    )
    evaluate.main(_argv(tmp_path, tiny_weights, **masks))
    report = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert report["masked_clip_i"] == pytest.approx(1.0, abs=1e-5)
    # Random weights make all images look alike, but the differing background must still lower plain CLIP-I.
    assert report["clip_i"] < report["masked_clip_i"] - 1e-3


def test_masked_view_rule():
    rng = np.random.default_rng(4)
    image = _random_image(rng, (30, 20))  # width 30, height 20
    mask = np.zeros((20, 30), dtype=bool)
    mask[2:8, 5:17] = True
    mask[3, 5] = False  # inside the bounding box but background: must become grey
    view = np.asarray(clip_metrics.masked_view(image, mask))
    # The 6x12 box is centred in a 12x12 square: 3 grey rows above and below.
    assert view.shape == (12, 12, 3)
    assert (view[:3] == clip_metrics.FILL).all() and (view[9:] == clip_metrics.FILL).all()
    expected = np.asarray(image)[2:8, 5:17].copy()
    expected[1, 0] = clip_metrics.FILL
    np.testing.assert_array_equal(view[3:9], expected)
    # A low-resolution mask (e.g. an attention map) is resized to the image with nearest sampling.
    small = np.zeros((10, 15), dtype=bool)
    small[1:4, 3:8] = True
    upsampled = Image.fromarray(small.astype(np.uint8) * 255).resize((30, 20), Image.Resampling.NEAREST)
    upsampled = np.asarray(upsampled) > 127
    np.testing.assert_array_equal(np.asarray(clip_metrics.masked_view(image, small)),
                                  np.asarray(clip_metrics.masked_view(image, upsampled)))
    with pytest.raises(ValueError, match="boolean"):
        clip_metrics.masked_view(image, mask.astype(np.float32))
    with pytest.raises(ValueError, match="no concept pixels"):
        clip_metrics.masked_view(image, np.zeros((20, 30), dtype=bool))


def test_compute_metrics_takes_mask_dicts(tiny_weights):
    # Masks straight from code (as a future attention-map script will pass them), lower resolution than the images.
    clip = clip_metrics.load_clip(TINY, tiny_weights)  # its defaults, QuickGELU included, are under test too
    rng = np.random.default_rng(5)
    refs = {"a": _random_image(rng), "b": _random_image(rng)}
    gens = {"x": _random_image(rng)}
    half = np.zeros((24, 24), dtype=bool)
    half[4:20, 6:18] = True
    result = clip_metrics.compute_metrics(clip, refs, gens, PROMPT, {"a": half, "b": half}, {"x": half}, batch_size=1)

    # By hand: the mask covers rows 8-39, columns 12-35 of the 48x48 images; that 32x24 crop is centred in a 32x32
    # square of CLIP's mean colour. The model is built here with QuickGELU, as OpenAI's ViT-B/32 uses.
    model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=str(tiny_weights),
                                                                 force_quick_gelu=True)
    views = []
    for image in [*refs.values(), *gens.values()]:
        square = np.empty((32, 32, 3), dtype=np.uint8)
        square[:] = (123, 117, 104)
        square[:, 4:28] = np.asarray(image)[8:40, 12:36]
        views.append(preprocess(Image.fromarray(square)))
    with torch.no_grad():
        feats = F.normalize(model.eval().encode_image(torch.stack(views)), dim=-1)
    expected = float((feats[:2] @ feats[2]).mean())
    assert result["masked_clip_i"] == pytest.approx(expected, abs=1e-6)  # measured 0.0 (of 0.96)
    with pytest.raises(ValueError, match="no mask for reference image 'b'"):
        clip_metrics.compute_metrics(clip, refs, gens, PROMPT, {"a": half}, {"x": half})
    with pytest.raises(ValueError, match="only one side"):
        clip_metrics.compute_metrics(clip, refs, gens, PROMPT, {"a": half, "b": half}, None)


def test_geometric_mean_clamps_each_score():
    assert clip_metrics.geometric_mean(0.25, 0.64) == pytest.approx(0.4)
    assert clip_metrics.geometric_mean(-0.2, 0.5) == 0.0
    assert clip_metrics.geometric_mean(-0.2, -0.5) == 0.0


@pytest.mark.parametrize(
    "setup, message",
    [
        ("empty_gen", "no images"),
        ("missing_mask", "no mask for image 'g1'"),
        ("one_mask_dir", "--ref_masks and --gen_masks go together"),
        ("empty_prompt", "the prompt is empty"),
    ],
)
def test_input_errors(tmp_path, tiny_weights, capsys, setup, message):
    rng = np.random.default_rng(6)
    _write_images(tmp_path / "ref", {"r.png": _random_image(rng)})
    gen = {} if setup == "empty_gen" else {"g0.png": _random_image(rng), "g1.png": _random_image(rng)}
    _write_images(tmp_path / "gen", gen)
    (tmp_path / "gen").mkdir(exist_ok=True)
    extra = {}
    if setup == "missing_mask":
        ones = np.ones((48, 48), dtype=bool)
        extra = _masked_setup(tmp_path, {}, {}, {"r.png": ones}, {"g0.png": ones})
    elif setup == "one_mask_dir":
        extra = {"ref_masks": tmp_path}
    elif setup == "empty_prompt":
        extra = {"prompt": " "}  # a later --prompt overrides the first
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(_argv(tmp_path, tiny_weights, **extra))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_missing_weights_exits_without_traceback(tmp_path):
    missing = tmp_path / "nowhere" / "open_clip_pytorch_model.bin"
    _write_images(tmp_path / "ref", {"r.png": _random_image(np.random.default_rng(7))})
    _write_images(tmp_path / "gen", {"g.png": _random_image(np.random.default_rng(8))})
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *_argv(tmp_path, missing, model="ViT-B-32")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: CLIP weights not found: {missing}. Download open_clip's ViT-B-32 'openai' weights "
        "(open_clip_pytorch_model.bin) on a machine with internet and pass --clip_weights PATH."
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_vit_b32_loads_saved_state_dict(tmp_path, tiny_weights, capsys):
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", force_quick_gelu=True)
    model.eval()
    # Saved as fp16 safetensors to keep the file small; round the in-memory weights the same way.
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(tensor.half().float())
    weights = tmp_path / "vit_b32.safetensors"
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(weights))

    rng = np.random.default_rng(9)
    _write_images(tmp_path / "ref", {"r.png": _random_image(rng, (256, 256))})
    _write_images(tmp_path / "gen", {"g.png": _random_image(rng, (256, 256))})
    evaluate.main(_argv(tmp_path, weights, model="ViT-B-32"))
    report = json.loads((tmp_path / "out" / "scores.json").read_text())

    paths = [tmp_path / "ref" / "r.png", tmp_path / "gen" / "g.png"]
    pixels = torch.stack([preprocess(Image.open(path).convert("RGB")) for path in paths])
    with torch.no_grad():
        ref, gen = F.normalize(model.encode_image(pixels), dim=-1)
        text = F.normalize(model.encode_text(open_clip.get_tokenizer("ViT-B-32")([PROMPT]))[0], dim=0)
    assert report["clip_i"] == pytest.approx(float(gen @ ref), abs=1e-6)
    assert report["clip_t"] == pytest.approx(float(gen @ text), abs=1e-6)

    # Weights of another architecture: a one-line error instead of a state-dict traceback.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(_argv(tmp_path, weights, model=TINY))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: CLIP weights {weights} do not fit {TINY}: ") and "\n" not in err
    assert "shape mismatch for " in err and ": checkpoint (" in err


def test_unreadable_weights_are_reported(tmp_path, tiny_weights):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(garbage))} is corrupt or truncated \(.*\); pass an open_clip"):
        clip_metrics.load_clip(TINY, garbage)
    not_tensors = tmp_path / "list.pt"
    torch.save([1, 2], not_tensors)
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        clip_metrics.load_clip(TINY, not_tensors)
    with pytest.raises(ValueError, match="unknown CLIP model 'hf-hub:org/model'"):
        clip_metrics.load_clip("hf-hub:org/model", tiny_weights)
