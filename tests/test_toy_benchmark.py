"""scripts/toy_benchmark.py: one command gives the table, the plot and the sample grid (short runs here)."""
import csv

from PIL import Image

from ldm.report import GAP

from ldm.cli.toy_benchmark import CONCEPT_PROMPTS, PRIOR_PROMPTS, main


def test_benchmark_writes_table_plot_and_samples(tmp_path, example_data):
    rows, stats, paths = main(["--methods", "catversion", "textual_inversion", "--seeds", "0", "1", "--steps", "2",
                               "--n", "2", "--data_root", example_data, "--outdir", str(tmp_path)])
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [(r["method"], r["seed"]) for r in table] == [("catversion", "0"), ("catversion", "1"),
                                                         ("textual_inversion", "0"), ("textual_inversion", "1")]
    assert {r["trainable"] for r in table} == {str(3 * 2 * 32), "32"}  # K and V of 32 numbers in 3 layers; one word
    md = open(paths["md"]).read()
    assert "CatVersion, layers 9-11" in md and "Textual Inversion" in md and "±" in md
    # Textual Inversion leaves prompts without its placeholder exactly as they were
    assert stats["textual_inversion"]["prior_pixel_change"] == (0.0, 0.0)
    assert stats["textual_inversion"]["prior_unchanged"] == (1.0, 0.0)
    assert Image.open(paths["png"]).size[0] > 400
    # samples.png: rows base + 2 methods; min(4, n) = 2 images of each prompt; 64 px enlarged to 256, label strips
    grid = Image.open(paths["samples"])
    cols = 2 * len(CONCEPT_PROMPTS + PRIOR_PROMPTS)
    assert grid.size[0] > cols * 256 + (cols - 1) * GAP and grid.size[1] > 3 * 256 + 2 * GAP
