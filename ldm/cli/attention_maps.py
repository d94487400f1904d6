#!/usr/bin/env python
"""Cross-attention maps of a prompt: one heat map per token, overlaid on the generated image, and automatic masks.

    python scripts/attention_maps.py --ckpt_path models/sd/v1-5.ckpt \\
        --embedding_path logs/teddybear/checkpoints/adapter --prompt "teddybear on the beach" --seed 78 \\
        --mask_token teddybear

DDIM samples the prompt (as txt2img does, same seeds) while recording the UNet's cross-attention probabilities of
the layers `--attn_downsample` times smaller than the latent, averaged over heads, those layers and all steps (see
ldm/analysis/attention_maps.py). Writes, for each image <stem> (`<prompt-with-dashes>_<seed>`, as txt2img names it):

    <outdir>/samples/<stem>.png                       the generated image
    <outdir>/attention/<stem>/<pos>_<token>.png       one heat map per token position, BOS to EOS
    <outdir>/attention/<stem>/grid.png                the image and all heat maps in a row, labelled
    <masks_out>/<stem>.png                            with --mask_token: the binary mask (white = concept)

The mask is the --mask_token word's map (mean over its tokens) upsampled to the image, normalised to [0, 1] and
thresholded at --mask_threshold. It is named like the image, so that
`scripts/evaluate.py --gen_dir <outdir>/samples --gen_masks <masks_out>` picks it up.
"""
import argparse
import os
import re

from ldm.util import HelpFormatter, add_sampling_args


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--prompt", required=True, help="the prompt to render and analyse")
    p.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml", help="model config")
    p.add_argument("--ckpt_path", default="models/sd/v1-5.ckpt",
                   help="SD v1.x checkpoint; 'none' builds random weights (smoke tests only)")
    p.add_argument("--embedding_path", nargs="*", default=[],
                   help="CatVersion adapter(s) (folder/.safetensors/.bin) and/or a Textual Inversion embeddings .pt "
                        "(write its placeholder, e.g. *, in the prompt)")
    p.add_argument("--outdir", default="outputs/attention-maps", help="folder to write results to")
    p.add_argument("--n_iter", type=int, default=1, help="images per prompt; image i uses seed + i")
    add_sampling_args(p)
    p.add_argument("--attn_downsample", type=int, default=None,
                   help="record the cross-attention layers this many times smaller than the latent (default: 4, SD's "
                        "16x16, or the factor nearest to it that the model has)")
    p.add_argument("--mask_token", default=None, help="word whose map becomes the automatic mask, e.g. the class word")
    p.add_argument("--mask_threshold", type=float, default=0.5, help="normalised attention >= this is concept")
    p.add_argument("--masks_out", default=None, help="folder for the masks (default <outdir>/masks)")
    p.add_argument("--uc_dir", default="models/uc", help="cache folder of the unconditional embedding; '' disables it")
    p.add_argument("--device", default=None, help="torch device; default: cuda if available, else cpu")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def file_label(text):
    """A token's text as a safe file-name part (`<|startoftext|>` -> `startoftext`, `*` -> `tok`)."""
    return re.sub(r"[^0-9A-Za-z]+", "-", text).strip("-")[:40] or "tok"


def run(opt):
    import torch

    from ldm import sampling
    from ldm.analysis import attention_maps as am
    from ldm.config import resolve_device
    from ldm.report import save_sheet

    device = resolve_device(opt.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    options = sampling.SamplingOptions.from_args(opt).check()
    if opt.mask_token is not None and not 0.0 < opt.mask_threshold < 1.0:
        raise ValueError(f"--mask_threshold {opt.mask_threshold} must lie strictly between 0 and 1 "
                         "(0.5 is a usual choice)")
    masks_out = opt.masks_out or os.path.join(opt.outdir, "masks")
    for folder in (opt.outdir, masks_out):
        sampling.check_output_dir(folder)
    name = sampling.prompt_to_name(opt.prompt)

    ckpt_path = None if opt.ckpt_path.lower() == "none" else opt.ckpt_path
    model = sampling.load_model(opt.config, ckpt_path, device, opt.embedding_path, verbose=False)
    unet = model.model.diffusion_model
    latent = (opt.H // sampling.LATENT_FACTOR, opt.W // sampling.LATENT_FACTOR)
    factors = am.attention_factors(unet)
    downsample = am.pick_downsample(factors, *latent, opt.attn_downsample)
    h, w = latent[0] // downsample, latent[1] // downsample
    if opt.attn_downsample is None:
        print(f"Attention maps from the {h}x{w} cross-attention layers (--attn_downsample {downsample}; this model's "
              f"layers are {', '.join(map(str, factors))} times smaller than the latent)")
    positions = am.prompt_positions(model.cond_stage_model, opt.prompt, model.embedding_manager)
    if opt.mask_token is not None:
        mask_positions = am.word_positions(model.cond_stage_model, positions, opt.mask_token)
    uc = sampling.unconditional_embedding(model, opt.uc_dir) if opt.scale != 1.0 else None
    cond = model.get_learned_conditioning([opt.prompt])

    results = []
    for seed in range(opt.seed, opt.seed + opt.n_iter):
        stem = f"{name}_{seed}"
        with am.CrossAttentionRecorder(unet, h * w, batch=1) as recorder:
            image = options.sample(model, cond, uc, seed)[0]
        maps = recorder.mean()[0].T.reshape(-1, h, w)  # (77 token positions, h, w)
        pixels = sampling.to_uint8(image)
        folder = os.path.join(opt.outdir, "attention", stem)
        for path in (folder, os.path.join(opt.outdir, "samples")):
            os.makedirs(path, exist_ok=True)
        result = {"image": sampling.save_image(pixels, os.path.join(opt.outdir, "samples", stem + ".png")),
                  "grid": os.path.join(folder, "grid.png")}
        overlays = [am.heat_overlay(pixels, heat)
                    for heat in am.upsample_normalised(maps[[p for p, _, _ in positions]], (opt.H, opt.W))]
        result["maps"] = [sampling.save_image(overlay, os.path.join(folder, f"{pos:02d}_{file_label(text)}.png"))
                          for (pos, _, text), overlay in zip(positions, overlays)]
        save_sheet(result["grid"], [[pixels, *overlays]], [f"seed {seed}"], ["image", *(text for _, _, text in positions)])
        message = f"{stem}: {len(result['maps'])} token maps in {folder}"
        if opt.mask_token is not None:
            mask = am.concept_mask(maps, mask_positions, (opt.H, opt.W), opt.mask_threshold)
            os.makedirs(masks_out, exist_ok=True)
            result["mask"] = sampling.save_image(mask.to(torch.uint8) * 255, os.path.join(masks_out, stem + ".png"))
            message += f", mask {result['mask']}"
        results.append(result)
        print(message)
    return results


def main(argv=None):
    from ldm.util import one_line_errors

    opt = get_parser().parse_args(argv)
    with one_line_errors(opt.debug):
        return run(opt)


if __name__ == "__main__":
    main()
