#!/usr/bin/env python
"""Sample Stable Diffusion v1.5 with learned CatVersion concepts (the reference's scripts/txt2img_generator.py).

    python scripts/txt2img.py --ckpt_path models/sd/v1-5.ckpt \\
        --embedding_path logs/teddybear/checkpoints/adapter --prompt "teddybear on the beach" --seed 78

Write prompts with the concept's base class word (e.g. `teddybear`): the learned keys and values act on every prompt.
Images go to <outdir>/<prompt-with-dashes>/<prompt-with-dashes>_<seed>.png, plus grid.png; iteration i uses seed + i.
Several --embedding_path values stack concepts of DIFFERENT class words (raise the --strength of a weak one); two
concepts of the same class word blend into one object. The unconditional embedding (the empty prompt, without
adapters) is cached per base model in --uc_dir. --authors switches every sampling difference in docs/fidelity.md to
the authors' sampler; flags given explicitly still win (`--authors --seed 78 --n_iter 1` is one example of run.sh).
"""
import argparse
import os
import sys
import warnings

from ldm.util import HelpFormatter, add_sampling_args

# The authors' sampler (docs/fidelity.md rows 52-58): their defaults, x_T device, uc file and output files.
AUTHORS = dict(seed=8888, n_iter=2, noise_device="device", uc_path="models/authors/uc.pt", jpeg=True, tf32=True)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="teddybear on the beach", help="the prompt to render")
    src.add_argument("--from-file", dest="from_file", default=None,
                     help="a text file with one prompt per line (blank lines skipped); each prompt gets its own folder")
    p.add_argument("--outdir", default="outputs/txt2img-samples", help="folder to write results to")
    p.add_argument("--plms", action="store_true", help="use PLMS sampling (deterministic; no --ddim_eta)")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta (0.0 = deterministic sampling)")
    p.add_argument("--n_iter", type=int, default=1, help="iterations per prompt; iteration i uses seed + i")
    p.add_argument("--n_samples", type=int, default=1, help="batch size: images per iteration")
    add_sampling_args(p)
    p.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml", help="model config")
    p.add_argument("--ckpt_path", default="models/sd/v1-5.ckpt",
                   help="SD v1.x checkpoint (.ckpt or .safetensors) or diffusers folder; 'none' builds the model with "
                        "random weights, for smoke tests only")
    p.add_argument("--embedding_path", nargs="*", default=[],
                   help="CatVersion adapter(s) (none: plain SD): a run's checkpoints/adapter folder, a catversion."
                        "safetensors or the authors' pytorch_adapter.bin, several stacking concepts; or a Textual "
                        "Inversion embeddings.pt (put its placeholder, e.g. *, in the prompt)")
    p.add_argument("--strength", type=float, nargs="+", default=[1.0],
                   help="concept strength, one for all adapters or one per adapter: 0 = base model, 1 = as trained")
    p.add_argument("--uc_dir", default="models/uc",
                   help="cache folder for the unconditional embedding, one file per base model; '' disables the cache")
    p.add_argument("--uc_path", default=None,
                   help="use this saved unconditional embedding (e.g. the authors' models/uc.pt), not a computed one")
    p.add_argument("--noise_device", choices=("cpu", "device"), default="cpu",
                   help="where x_T is drawn after torch.manual_seed(seed + i): cpu (the same images on every device) "
                        "or device (the sampling device, as the authors' sampler: their images on a GPU)")
    p.add_argument("--jpeg", action="store_true",
                   help="write the authors' files: JPEG at quality 75, <name>_<seed>.jpg and the grid as <name>.jpg")
    p.add_argument("--tf32", action="store_true",
                   help="TF32 CUDA matmuls and convolutions, as the authors' torch 1.10 on Ampere GPUs")
    p.add_argument("--authors", action="store_true",
                   help="the authors' sampler at once: --seed 8888 --n_iter 2 --noise_device device --uc_path "
                        "models/authors/uc.pt --jpeg --tf32 (explicit flags still win)")
    p.add_argument("--device", default=None, help="torch device; default: cuda if available, else cpu")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def parse_args(argv=None):
    parser = get_parser()
    if parser.parse_known_args(argv)[0].authors:  # as defaults, so that explicit flags override them
        parser.set_defaults(**AUTHORS)
    return parser.parse_args(argv)


def read_prompts(opt):
    if opt.from_file is None:
        return [opt.prompt]
    if not os.path.isfile(opt.from_file):
        raise ValueError(f"prompt file not found: {opt.from_file}; pass a text file with one prompt per line")
    with open(opt.from_file, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {opt.from_file} has no prompts; write one prompt per line")
    return prompts


def run(opt):
    import torch
    from omegaconf import OmegaConf

    from ldm import sampling
    from ldm.config import resolve_device

    # Everything that can be checked cheaply is checked before the model costs time to load and before any file is
    # written; load_model checks the checkpoint path, the adapters and the strengths before it builds anything.
    prompts = read_prompts(opt)
    device = resolve_device(opt.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not os.path.isfile(opt.config):
        raise ValueError(f"config not found: {opt.config}; pass --config configs/stable-diffusion/v1-inference.yaml")
    config = OmegaConf.load(opt.config)
    timesteps = OmegaConf.select(config, "model.params.timesteps", default=1000)
    options = sampling.SamplingOptions.from_args(opt).check(timesteps)
    sampling.check_output_dir(opt.outdir)
    sampling.prompt_names(prompts)
    if opt.uc_path is not None and not os.path.isfile(opt.uc_path):
        raise ValueError(f"--uc_path {opt.uc_path} not found; pass a saved unconditional embedding such as "
                         "models/authors/uc.pt (run from the repository root)")
    ckpt_path = None if opt.ckpt_path.lower() == "none" else opt.ckpt_path
    if ckpt_path is None:
        print("Warning: --ckpt_path none: random weights, the images are noise (smoke test)")
    if opt.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = sampling.load_model(config, ckpt_path, device, opt.embedding_path, opt.strength)
    uc = sampling.read_uc(opt.uc_path, model) if opt.uc_path else None
    results = sampling.generate(model, prompts, opt.outdir, options, uc=uc, uc_dir=opt.uc_dir, jpeg=opt.jpeg)
    for result in results.values():
        print(f"Your samples are ready and waiting for you here: {result['folder']}")
    return results


def main(argv=None):
    from ldm.util import one_line_errors

    opt = parse_args(argv)
    with warnings.catch_warnings(), one_line_errors(opt.debug):
        # One plain line on stderr: a truncated prompt must be noticed, not buried under a source-code excerpt.
        warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}", file=sys.stderr)
        return run(opt)


if __name__ == "__main__":
    main()
