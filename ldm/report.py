"""The one writer of reports: tables (CSV, markdown), bar charts (PNG) and image sheets (rows and columns, small
images enlarged, each row and column labelled)."""
import csv
import io
import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ldm.files import atomic_write

GAP = 4  # white pixels between cells, and between the label strips and the cells
MARGIN = 4  # white pixels around the label text


def to_pil(image, value_range=(0, 1)):
    """A PIL RGB image from a PIL image, a uint8 array/tensor (H, W[, C]) or a float tensor (C, H, W) in
    `value_range`."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dtype.is_floating_point:
            lo, hi = value_range
            image = ((image.float().clamp(lo, hi) - lo) * (255.0 / (hi - lo))).round().to(torch.uint8)
            image = image.permute(1, 2, 0) if image.ndim == 3 else image  # torchvision's (C, H, W) -> PIL's (H, W, C)
        image = image.numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"cannot draw an image of dtype {image.dtype}; pass uint8 (H, W, C) or a float tensor "
                         "(C, H, W)")
    return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image).convert("RGB")


def _rows(images, ncols):
    """`images` as a list of rows; a flat list or batch is cut into rows of `ncols` (default: one row)."""
    if isinstance(images, (list, tuple)) and images and all(
            isinstance(r, (list, tuple)) or (isinstance(r, torch.Tensor) and r.ndim == 4) for r in images):
        return [list(r) for r in images]
    images = list(images)
    ncols = ncols or max(1, len(images))
    return [images[i:i + ncols] for i in range(0, len(images), ncols)]


def _wrap(text, font, width):
    """`text` in the longest lines (broken at spaces, a too-long word cut) that are no wider than `width` pixels."""
    lines = []
    for paragraph in str(text).split("\n"):
        for chars in range(max(len(paragraph), 1), 0, -1):
            wrapped = textwrap.wrap(paragraph, chars) or [""]
            if all(font.getlength(line) <= width for line in wrapped):
                break
        lines += wrapped
    return lines


def image_sheet(images, row_labels=None, col_labels=None, min_cell=256, value_range=(0, 1), ncols=None):
    """One PIL image: `images` in rows and columns, row labels in a strip on the left, column labels on top.

    `images`: a list of rows (each a list of images or a batch tensor), or one flat list/batch cut into rows of `ncols`
    (default: one row); each image as `to_pil` takes it. Images under `min_cell` pixels on their longer side are
    enlarged by a whole factor (nearest), so each generated pixel stays a sharp square. Labels: None, or one per row /
    column."""
    rows = [[to_pil(im, value_range) for im in row] for row in _rows(images, ncols)]
    if not any(rows):
        raise ValueError("no images to put on the sheet")
    n_cols = max(len(r) for r in rows)
    for labels, count, what in ((row_labels, len(rows), "row"), (col_labels, n_cols, "column")):
        if labels is not None and len(labels) != count:
            raise ValueError(f"{len(labels)} {what} labels for {count} {what}s of images; pass one label per {what}")
    scale = max(1, math.ceil(min_cell / max(max(im.size) for r in rows for im in r)))
    cw, ch = (scale * max(im.size[axis] for r in rows for im in r) for axis in (0, 1))

    font = ImageFont.load_default(size=max(11, min(cw, ch) // 20))  # legible on a 256 px cell, not shouting on 512 px
    line_h = sum(font.getmetrics())
    col_lines = [_wrap(t, font, cw - 2 * MARGIN) for t in col_labels or []]
    top = max(map(len, col_lines)) * line_h + 2 * MARGIN + GAP if col_lines else 0
    row_lines = [_wrap(t, font, max(cw // 2, 96)) for t in row_labels or []]  # at most half a cell's width
    widest = max((font.getlength(s) for lines in row_lines for s in lines), default=None)
    left = 0 if widest is None else math.ceil(widest) + 2 * MARGIN + GAP

    sheet = Image.new("RGB", (left + n_cols * (cw + GAP) - GAP, top + len(rows) * (ch + GAP) - GAP), "white")
    draw = ImageDraw.Draw(sheet)
    for j, lines in enumerate(col_lines):
        for k, line in enumerate(lines):
            x = left + j * (cw + GAP) + (cw - font.getlength(line)) / 2
            draw.text((x, MARGIN + k * line_h), line, fill="black", font=font)
    for i, row in enumerate(rows):
        y = top + i * (ch + GAP)
        lines = row_lines[i] if row_lines else []
        for k, line in enumerate(lines):
            draw.text((MARGIN, y + (ch - len(lines) * line_h) / 2 + k * line_h), line, fill="black", font=font)
        for j, im in enumerate(row):
            im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
            sheet.paste(im, (left + j * (cw + GAP) + (cw - im.width) // 2, y + (ch - im.height) // 2))
    return sheet


def save_sheet(path, images, row_labels=None, col_labels=None, **options):
    """`image_sheet(...)` written to `path` as PNG (atomically, folders made); returns the sheet."""
    sheet = image_sheet(images, row_labels, col_labels, **options)
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return sheet


def markdown_table(header, rows):
    """A markdown table: a header row of cells, then each row's cells (any values; str() of each)."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines) + "\n"


def csv_text(rows, fields=None):
    """CSV of dict rows; `fields` (default: the first row's keys) pick and order the columns."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields or list(rows[0]), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def bar_chart(groups, series, errors=None, title="", ylabel="", ylim=None, fmt="%.3f"):
    """PNG bytes: one cluster of bars per group, one bar per series (`series`: {label: [one value per group]}),
    with error bars from `errors` ({label: [...]}) where given."""
    from matplotlib.figure import Figure  # a Figure alone, not pyplot: no global backend or figure state

    figure = Figure(figsize=(max(4.0, 0.9 * len(groups) * len(series) + 2), 3.8), dpi=100)
    axes = figure.add_subplot()
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        yerr = (errors or {}).get(label)
        bars = axes.bar([i + k * width for i in range(len(groups))], values, width, yerr=yerr,
                        capsize=3 if yerr else 0, label=label)
        axes.bar_label(bars, fmt=fmt, fontsize=7)
    axes.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))], groups, fontsize=8)
    if ylim is not None:
        axes.set_ylim(*ylim)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)
    if len(series) > 1:
        axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_files(files):
    """Write {path: str or bytes}, each atomically (folders made). Render everything first, then call this, so that
    a failure while rendering leaves no file of the set behind."""
    for path, data in files.items():
        data = data.encode() if isinstance(data, str) else data
        atomic_write(path, lambda tmp, data=data: Path(tmp).write_bytes(data))
