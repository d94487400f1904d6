"""ldm/report.py: image sheets are enlarged where small, and labelled by row and column."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.report import GAP, image_sheet, save_sheet


def _images(n, side, seed=0):
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _dark(region):
    """How many pixels of a PIL region are clearly not white (text is drawn in black)."""
    return int((np.asarray(region.convert("L")) < 128).sum())


def test_small_images_are_enlarged_by_a_whole_factor_without_blur():
    images = _images(6, 32)
    sheet = image_sheet(images, ncols=3)
    assert sheet.size == (3 * 256 + 2 * GAP, 2 * 256 + GAP)  # 32 px x 8 = 256 px cells, no label strips
    pixels = np.asarray(sheet)
    # the second row's third image, each source pixel an 8x8 block of its exact value
    expected = (images[5].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    cell = pixels[256 + GAP:2 * 256 + GAP, 2 * (256 + GAP):2 * (256 + GAP) + 256]
    assert np.array_equal(cell[::8, ::8], expected) and np.array_equal(cell[7::8, 7::8], expected)


def test_large_images_keep_their_size():
    sheet = image_sheet([[Image.new("RGB", (300, 200), "red")]])
    assert sheet.size == (300, 200)


def test_labels_get_strips_with_text_above_each_column_and_left_of_each_row(tmp_path):
    rows = [_images(3, 64, seed=1), [np.full((64, 64, 3), 255, np.uint8)] * 3]  # a batch tensor; uint8 (H, W, C)
    path = tmp_path / "sub" / "sheet.png"
    sheet = save_sheet(str(path), rows, ["base model", "CatVersion"], ["a", "circle on a blue background", "c"])
    with Image.open(path) as saved:
        assert saved.size == sheet.size
    width, height = sheet.size
    left = width - (3 * 256 + 2 * GAP)
    top = height - (2 * 256 + GAP)
    assert left > GAP and top > GAP
    for j in range(3):  # every column's label strip has text
        x = left + j * (256 + GAP)
        assert _dark(sheet.crop((x, 0, x + 256, top - GAP))) > 10, j
    for i in range(2):  # and every row's
        y = top + i * (256 + GAP)
        assert _dark(sheet.crop((0, y, left - GAP, y + 256))) > 10, i
    # the white image's cell stays white: labels do not spill into cells
    assert _dark(sheet.crop((left, top + 256 + GAP, left + 256, top + 2 * 256 + GAP))) == 0


def test_label_counts_must_match_the_images():
    with pytest.raises(ValueError, match="2 column labels for 3 columns of images; pass one label per column"):
        image_sheet(_images(3, 8), col_labels=["a", "b"], ncols=3)
    with pytest.raises(ValueError, match="1 row labels for 2 rows of images"):
        image_sheet([[Image.new("RGB", (8, 8))], [Image.new("RGB", (8, 8))]], row_labels=["x"])


def test_tables_round_trip_as_csv_and_markdown(tmp_path):
    import csv
    import io

    from ldm.report import csv_text, markdown_table, write_files

    rows = [{"method": "catversion", "clip_i": 0.81, "note": "a, b"}, {"method": "ti", "clip_i": 0.7, "note": ""}]
    text = csv_text(rows, ["method", "clip_i"])
    assert list(csv.DictReader(io.StringIO(text))) == [{"method": "catversion", "clip_i": "0.81"},
                                                       {"method": "ti", "clip_i": "0.7"}]
    md = markdown_table(["method", "CLIP-I"], [["catversion", "0.810"], ["ti", "0.700"]])
    assert md.splitlines() == ["| method | CLIP-I |", "| --- | --- |", "| catversion | 0.810 |", "| ti | 0.700 |"]
    write_files({tmp_path / "out" / "t.csv": text, tmp_path / "out" / "t.md": md.encode()})
    assert (tmp_path / "out" / "t.csv").read_text() == text and (tmp_path / "out" / "t.md").read_text() == md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t.csv", "t.md"]  # no temporary left behind


def test_bar_chart_is_a_png_with_one_bar_per_group_and_series():
    import io

    from ldm.report import bar_chart

    png = bar_chart(["CLIP-I", "CLIP-T", "DINO"], {"a": [0.8, 0.3, 0.6], "b": [0.7, 0.25, 0.5]},
                    errors={"a": [0.01, 0.02, 0.03]}, title="t", ylim=(0, 1))
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 300
        # both series' colours (matplotlib's first two: tab:blue, tab:orange) are drawn
        colours = {c for _, c in image.convert("RGB").getcolors(1 << 20)}
        assert (31, 119, 180) in colours and (255, 127, 14) in colours
