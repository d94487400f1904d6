"""Score generated images against reference images with CLIP: CLIP-I, CLIP-T, their geometric
mean and, when masks are given, masked CLIP-I (the concept region only; --rm_mask: the authors' layout instead).

Writes the means and per-image scores as JSON to --out, the per-image rows as CSV and a bar chart
of the means as PNG beside it (same stem), and prints a table.
"""
import argparse
import json
import os
from pathlib import Path

from ldm.config import resolve_device
from ldm.evaluation import clip_metrics
from ldm.images import list_images, load_rgb
from ldm.report import bar_chart, csv_text, markdown_table, write_files
from ldm.sampling import check_output_dir
from ldm.util import HelpFormatter, one_line_errors

MASK_RULE = (f"Masked CLIP-I: on both sides, pixels outside the mask become CLIP's mean grey {clip_metrics.FILL}, the "
             "image is cropped to the mask's bounding box and padded to a centred square with the same grey, then "
             "CLIP's usual preprocessing follows. Masks are PNGs matched to images by file stem (greyscale pixel > 127 "
             "= concept), resized to their image (nearest) if needed.")
LABELS = {"clip_i": "CLIP-I", "clip_t": "CLIP-T", "geometric_mean": "geometric mean", "masked_clip_i": "masked CLIP-I"}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                     epilog=MASK_RULE + " The geometric mean is sqrt(max(CLIP-I,0) * max(CLIP-T,0)).")
    parser.add_argument("--ref_dir", required=True, help="reference images of the concept (jpg/jpeg/png/webp)")
    parser.add_argument("--gen_dir", required=True, help="generated images")
    parser.add_argument("--prompt", required=True, help="text scored against the generated images (CLIP-T)")
    parser.add_argument("--clip_weights", required=True, help="local open_clip state dict (.bin/.pt/.pth/.safetensors)")
    parser.add_argument("--clip_model", default="ViT-B-32", help="open_clip model name (default: ViT-B-32)")
    parser.add_argument("--quick_gelu", action=argparse.BooleanOptionalAction, default=True,
                        help="force QuickGELU as in OpenAI's CLIP weights (default); --no-quick_gelu for GELU-trained "
                             "weights")
    parser.add_argument("--ref_masks", help="folder of reference masks (enables masked CLIP-I; needs --gen_masks)")
    parser.add_argument("--gen_masks", help="folder of generated-image masks (needs --ref_masks)")
    parser.add_argument("--rm_mask", action="store_true",
                        help="the authors' masked CLIP-I instead: background-removed copies in <ref_dir>/rm_mask/ and "
                             "<gen_dir>/rm_mask/, scored as they are")
    parser.add_argument("--out", required=True, help="JSON output; the .csv and .png go beside it")
    parser.add_argument("--batch_size", type=int, default=16, help="images per CLIP forward pass")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return parser.parse_args(argv)


def run(args):
    out = Path(args.out)
    if out.suffix.lower() in (".csv", ".png"):
        raise ValueError(f"--out {out} would be overwritten by the CSV/PNG written beside it; name it .json")
    if (args.ref_masks is None) != (args.gen_masks is None):
        raise ValueError("--ref_masks and --gen_masks go together; pass both or neither")
    if args.rm_mask and args.ref_masks is not None:
        raise ValueError("--rm_mask and --ref_masks/--gen_masks are two masked CLIP-I rules; pass one of them")
    # Cheap input checks first, so that a wrong folder, an unreadable image or an output path that cannot be
    # written is reported before CLIP is built (and before anything is written).
    check_output_dir(out.parent, "--out")
    resolve_device(args.device)
    ref_paths, gen_paths = list_images(args.ref_dir), list_images(args.gen_dir)
    masks = removed = [None, None]
    if args.ref_masks is not None:
        masks = [clip_metrics.load_mask_folder(folder, list(paths))
                 for folder, paths in ((args.ref_masks, ref_paths), (args.gen_masks, gen_paths))]
    ref_images, gen_images = read_images(ref_paths), read_images(gen_paths)
    if args.rm_mask:  # list_images skips these subfolders: the copies never mix with the images themselves
        removed = [read_images(list_images(os.path.join(folder, "rm_mask"))) for folder in (args.ref_dir, args.gen_dir)]
    clip = clip_metrics.load_clip(args.clip_model, args.clip_weights, args.device, args.quick_gelu)
    result = clip_metrics.compute_metrics(clip, ref_images, gen_images, args.prompt, *masks, args.batch_size, *removed)
    for row in result["per_image"]:
        row["image"] = os.path.basename(gen_paths[row["image"]])
    report = {"clip_model": args.clip_model, "clip_weights": str(args.clip_weights), "prompt": args.prompt,
              "num_ref": len(ref_paths), "num_gen": len(gen_paths), **result}
    write_outputs(out, report)
    print(format_table(report))


def read_images(paths):
    return {stem: load_rgb(path) for stem, path in paths.items()}


def format_table(report):
    columns = [key for key in LABELS if key in report and key != "geometric_mean"]
    rows = [[row["image"], *(f"{row[key]:.4f}" if key in row else "" for key in columns)]
            for row in report["per_image"]]
    lines = [markdown_table(["image", *(LABELS[key] for key in columns)],
                            rows + [["mean", *(f"{report[key]:.4f}" for key in columns)]]),
             f"geometric mean of CLIP-I and CLIP-T: {report['geometric_mean']:.4f}"]
    if "masked_clip_i_rule" in report:
        lines.append(f"masked CLIP-I rule: {report['masked_clip_i_rule']}")
    return "\n".join(lines)


def write_outputs(out, report):
    """JSON at `out`, per-image CSV and bar-chart PNG beside it; all rendered before any is written."""
    keys = [key for key in LABELS if key in report]
    values = [report[key] for key in keys]
    title = f"{report['clip_model']}, {report['num_gen']} generated vs {report['num_ref']} reference images"
    chart = bar_chart([LABELS[key] for key in keys], {"mean": values}, ylim=(min(0.0, *values), 1.05),
                      ylabel="cosine similarity", title=title)
    csv = csv_text(report["per_image"], ["image"] + [key for key in keys if key != "geometric_mean"])
    write_files({out: json.dumps(report, indent=2) + "\n", out.with_suffix(".png"): chart,
                 out.with_suffix(".csv"): csv})


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors(args.debug):  # OSError too: e.g. the disk filling up while the results are written
        run(args)


if __name__ == "__main__":
    main()
