import csv
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.cli import ablation

from .conftest import TINY_FINETUNE


def test_pixel_cosine_is_the_mean_pairwise_cosine_of_shrunk_images():
    rng = torch.Generator().manual_seed(0)
    refs = [Image.fromarray(torch.randint(0, 256, (64, 48, 3), generator=rng, dtype=torch.uint8).numpy()) for _ in range(3)]
    gens = [Image.fromarray(torch.randint(0, 256, (40, 40, 3), generator=rng, dtype=torch.uint8).numpy()) for _ in range(2)]
    shrink = [torch.tensor(list(im.resize((32, 32), Image.Resampling.BOX).getdata()), dtype=torch.float32).flatten() / 127.5 - 1
              for im in refs + gens]
    expected = sum(F.cosine_similarity(g, r, dim=0) for g in shrink[3:] for r in shrink[:3]) / 6
    assert ablation.pixel_cosine(refs, gens) == pytest.approx(expected.item(), abs=1e-6)
    assert ablation.pixel_cosine(refs[:1], refs[:1]) == pytest.approx(1.0, abs=1e-6)


def test_two_variants_end_to_end_write_the_table(tiny_ckpt, example_data, tmp_path):
    out = tmp_path / "ablation"
    rows, paths = ablation.main([
        "--base", TINY_FINETUNE, "--ckpt_path", tiny_ckpt, "--concept", f"{example_data}:circle",
        "--presets", "deep", "--variant", "shallow2", "model.params.cond_stage_config.params.concat_kv.layers=[0,1]",
        "--prompts", "a photo of a {}", "--steps", "2", "--n_images", "1", "--ddim_steps", "2", "--outdir", str(out)])
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [(r["variant"], r["layers"], r["trainable"], r["steps"]) for r in table] == [
        ("deep", "9 10 11", str(1 * 3 * 2 * 64), "2"), ("shallow2", "0 1", str(1 * 2 * 2 * 64), "2")]
    # the pixel score is recomputed from the files the script wrote
    refs = [Image.open(os.path.join(example_data, n)) for n in sorted(os.listdir(example_data))]
    for r in table:
        gen = out / "samples" / r["variant"] / "example" / "a-photo-of-a-circle" / "a-photo-of-a-circle_42.png"
        assert float(r["pixel_cosine"]) == pytest.approx(ablation.pixel_cosine(refs, [Image.open(gen)]), abs=1e-6)
    md = open(paths["md"]).read()
    assert "| variant | concept | method | layers |" in md and "pixel cosine (32x32, not CLIP)" in md
    assert md.count("| catversion |") == 2
    with Image.open(paths["png"]) as im:
        assert im.format == "PNG"
    with Image.open(paths["samples"]) as im:  # one labelled row per variant; the 64 px image enlarged to 256
        assert im.size[0] > 256 and im.size[1] > 2 * 256


def test_bad_concept_and_variant_are_refused(tiny_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ablation.main(["--ckpt_path", tiny_ckpt, "--concept", "nofolder", "--outdir", str(tmp_path)])
    assert e.value.code == 2
    assert "error: --concept 'nofolder' must be DATA_ROOT:WORD" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablation.main(["--ckpt_path", tiny_ckpt, "--concept", f"{tmp_path}:x", "--presets",
                       "--variant", "v", "nokey", "--outdir", str(tmp_path)])
    assert "error: --variant v: 'nokey' is not KEY=VALUE" in capsys.readouterr().err
