"""The authors' behaviour, switched on (docs/fidelity.md): their preset, their photos, their adapters, their masked
CLIP-I layout."""
import os

import pytest
import torch

import main
from ldm.models.diffusion.ddpm import LatentDiffusion

from .conftest import TINY_FINETUNE
from .test_evaluate import tiny_weights  # noqa: F401  (a fixture: the tiny CLIP the evaluation tests build)

PHOTOS = "tests/data/authors/teddybear"


@pytest.fixture
def tf32_flags():
    """torch's TF32 flags are process-wide: put back what the test found."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("preset", [True, False], ids=["authors-preset", "ours"])
def test_training_on_their_photos_with_and_without_the_authors_preset(preset, tiny_ckpt, tmp_path, monkeypatch,
                                                                      tf32_flags):
    seen = []
    original = LatentDiffusion.get_training_conditioning

    def spy(model, captions, *rest, **kwargs):  # the captions the model encodes for a training step
        seen.append((list(captions), dict(model.fast)))
        return original(model, captions, *rest, **kwargs)

    monkeypatch.setattr(LatentDiffusion, "get_training_conditioning", spy)
    base = [TINY_FINETUNE, "configs/authors.yaml"] if preset else [TINY_FINETUNE]
    args = ["--base", *base, "-t", "--actual_resume", tiny_ckpt, "--data_root", PHOTOS, "--init_word", "teddybear",
            "-l", str(tmp_path), "-n", "authors", "lightning.trainer.max_steps=2", "data.params.train.params.repeats=1",
            "lightning.callbacks.image_logger.params.batch_frequency=1000"]
    logdir, model = main.run(*main.get_parser().parse_known_args(args))
    assert len(seen) == 2 and model.global_step == 2
    assert all(captions == ([""] * 2 if preset else ["teddybear"] * 2) for captions, _ in seen)
    fast = seen[0][1]
    per_step = dict(cache_latents=False, cache_text=False, gradient_checkpointing=False, channels_last=False, tf32=True)
    assert ({k: fast[k] for k in per_step} == per_step) == preset
    assert torch.backends.cuda.matmul.allow_tf32 == torch.backends.cudnn.allow_tf32 == preset
    adapter = torch.load(os.path.join(logdir, "checkpoints", "adapter", "pytorch_adapter.bin"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in adapter.values())


# --- their released adapters and uc.pt, from the project's copy ----------------------------------------------------
AUTHORS = "models/authors"


def test_the_copies_are_the_files_the_readme_names():
    import hashlib
    import re

    with open(os.path.join(AUTHORS, "README.md")) as f:
        rows = re.findall(r"^\| `([^`]+)` \|.*\| `([0-9a-f]{64})` \|$", f.read(), re.M)
    assert len(rows) == 4 and os.path.isfile(os.path.join(AUTHORS, "LICENSE"))
    for pattern, digest in rows:
        paths = [os.path.join(AUTHORS, pattern.replace("*", c)) for c in ("colorful_teapot", "teddybear")]
        for path in dict.fromkeys(paths):
            with open(path, "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == digest, path


def test_their_uc_pt_is_the_empty_prompt_shape_and_reads_safely():
    from ldm.weights import load

    uc = load(os.path.join(AUTHORS, "uc.pt"))
    assert isinstance(uc, torch.Tensor) and uc.shape == (1, 77, 768) and uc.dtype == torch.float32
    assert torch.isfinite(uc).all()


@pytest.mark.parametrize("concept", ["colorful_teapot", "teddybear"])
def test_their_released_adapters_give_the_formulas_conditioning_on_sd_shaped_clip(concept):
    """Random ViT-L/14 text weights; the formula (extra K/V prepended after the projections, +1 on their logits) is the
    independent transcription in tests/test_concat_kv.py."""
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    from .test_concat_kv import reference_conditioning, reference_layout

    torch.manual_seed(0)
    emb = FrozenCLIPEmbedder()  # SD v1.5's text encoder shape, random weights
    folder = os.path.join(AUTHORS, "adapters", concept)
    saved = torch.load(os.path.join(folder, "pytorch_adapter.bin"), map_location="cpu", weights_only=True)  # saved on CUDA
    flat = next(iter(saved.values()))
    assert flat.shape == (4608,) and all(torch.equal(v, flat) for v in saved.values())
    a = emb.adapter_load(folder)
    assert (a.layers, a.num_tokens, a.logit_bias) == ([9, 10, 11], 1, 1.0) and torch.equal(a.control_trans, flat)
    prompts = [concept.replace("_", " ") + " on the beach", ""]
    extras = {layer: [(k, v, 1.0)] for layer, (k, v) in reference_layout(flat, 2, 1, [9, 10, 11], 12).items()}
    with torch.no_grad():
        ours = emb(prompts)
        formula = reference_conditioning(emb.transformer, emb.tokenize(prompts), extras)
        with emb.adapter_disabled():
            plain = emb(prompts)
    assert (ours - formula).abs().max() <= 1e-5
    assert (ours - plain).abs().max() > 1e-2  # the adapter does act


# --- their masked CLIP-I layout: background-removed copies in <dir>/rm_mask/ ----------------------------------------
def test_rm_mask_layout_equals_a_direct_computation(tmp_path, tiny_weights, capsys):
    import json

    import numpy as np
    import open_clip
    from PIL import Image

    from .test_evaluate import PROMPT, TINY, _random_image, _write_images, evaluate

    rng = np.random.default_rng(3)
    for side, n in (("ref", 2), ("gen", 3)):
        _write_images(tmp_path / side, {f"{side}{i}.png": _random_image(rng) for i in range(n)})
        _write_images(tmp_path / side / "rm_mask", {f"{side}{i}.png": _random_image(rng, (40, 56)) for i in range(n)})
    argv = ["--ref_dir", str(tmp_path / "ref"), "--gen_dir", str(tmp_path / "gen"), "--prompt", PROMPT,
            "--clip_weights", str(tiny_weights), "--clip_model", TINY, "--out", str(tmp_path / "scores.json")]
    evaluate.main(argv + ["--rm_mask"])
    report = json.loads((tmp_path / "scores.json").read_text())

    model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=str(tiny_weights),
                                                                 force_quick_gelu=True)
    model.eval()

    def feature(path):
        with torch.no_grad():
            return model.encode_image(preprocess(Image.open(path).convert("RGB"))[None])[0].double()

    def mean_cosine(ref_folder, gen_folder):
        refs, gens = [[feature(p) for p in sorted(f.glob("*.png"))] for f in (ref_folder, gen_folder)]
        return np.mean([float(g @ r / (g.norm() * r.norm())) for g in gens for r in refs])

    masked = mean_cosine(tmp_path / "ref" / "rm_mask", tmp_path / "gen" / "rm_mask")
    assert report["masked_clip_i"] == pytest.approx(masked, abs=1e-6)
    assert report["masked_clip_i_rule"].startswith("rm_mask: background-removed copies")
    # the unmasked score pairs every reference itself (their script reuses the last masked reference instead)
    assert report["clip_i"] == pytest.approx(mean_cosine(tmp_path / "ref", tmp_path / "gen"), abs=1e-6)
    assert abs(report["clip_i"] - masked) > 1e-3 and len(report["per_image"]) == 3
    assert all("masked_clip_i" in row for row in report["per_image"])
    assert "masked CLIP-I rule: rm_mask" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv + ["--rm_mask", "--ref_masks", str(tmp_path), "--gen_masks", str(tmp_path)])
    assert e.value.code == 2 and "two masked CLIP-I rules" in capsys.readouterr().err


def test_textual_inversion_config_has_textual_inversions_own_values():
    """rinongal/textual_inversion@424192d configs/stable-diffusion/v1-finetune.yaml, transcribed."""
    from omegaconf import OmegaConf

    c = OmegaConf.load("configs/stable-diffusion/v1-finetune-textual-inversion.yaml")
    manager, train = c.model.params.personalization_config.params, c.data.params.train.params
    logger = c.lightning.callbacks.image_logger.params
    ours = [c.model.base_learning_rate, c.data.params.batch_size, c.data.params.num_workers,
            manager.placeholder_strings, manager.initializer_words, manager.num_vectors_per_token,
            train.size, train.repeats, train.flip_p, train.placeholder_token, len(train.templates),
            c.lightning.modelcheckpoint.params.every_n_train_steps, logger.batch_frequency, logger.max_images,
            c.lightning.trainer.max_steps]
    assert ours == [5.0e-03, 2, 2, ["*"], ["sculpture"], 1, 512, 100, 0.5, "*", 81, 500, 500, 8, 6100]


def test_sd_finetune_config_holds_the_authors_training_values():
    """Their configs/stable-diffusion/v1-finetune.yaml values, main.py's defaults and the adapter-transformers
    PrefixTuningConfig they build (docs/fidelity.md rows 11, 12, 14, 27, 31, 32, 36, 38, 42, 44)."""
    from omegaconf import OmegaConf

    c = OmegaConf.load("configs/stable-diffusion/v1-finetune.yaml")
    p = c.model.params
    kv = p.cond_stage_config.params.concat_kv
    assert (kv.layers, kv.num_tokens, kv.init, kv.logit_bias) == ([9, 10, 11], 1, "randn", 1.0)
    assert (c.data.params.batch_size, c.data.params.num_workers, c.model.base_learning_rate) == (2, 2, 5.0e-03)
    assert "scheduler_config" not in p and "use_ema" not in p  # constant learning rate, no EMA
    trainer = c.lightning.trainer
    assert (trainer.max_steps, trainer.benchmark, trainer.precision, p.fast.precision) == (1001, True, "32-true", "fp32")
    assert not {"gradient_clip_val", "accumulate_grad_batches"} & set(trainer)
    assert c.lightning.modelcheckpoint.params.every_n_train_steps == 250


def test_adapter_starts_standard_normal_and_trains_with_torch_adamw(tiny_finetune_model):
    from ldm.modules.encoders.concat_kv import ConcatKV

    torch.manual_seed(0)
    flat = ConcatKV(768, 12).control_trans.detach()
    assert flat.shape == (4608,)
    assert abs(flat.mean().item()) < 0.05 and abs(flat.std().item() - 1.0) < 0.05  # randn, no scaling
    tiny_finetune_model.learning_rate = 1e-2
    optimizer = tiny_finetune_model.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert group["params"] == tiny_finetune_model.cond_stage_model.adapter_parameters()
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (1e-2, 0.01, (0.9, 0.999), 1e-8)


def test_loss_is_their_per_sample_mse_with_noise_drawn_after_the_seed(tiny_finetune_model):
    """Their p_losses at logvar 0, l_simple_weight 1, original_elbo_weight 0: per-sample MSE over (c, h, w), then the
    batch mean; the noise is randn_like(z); x_t = sqrt(a_t) z + sqrt(1 - a_t) noise."""
    model = tiny_finetune_model
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, model.channels, 8, 8, generator=g)
    t = torch.tensor([3, 917])
    with torch.no_grad():
        cond = model.get_learned_conditioning(["a circle", "a circle"])
        torch.manual_seed(9)
        ours = model.p_losses(z, cond, t)
        torch.manual_seed(9)
        noise = torch.randn_like(z)
        a = model.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        x_t = (a.sqrt() * z.double() + (1 - a).sqrt() * noise.double()).float()
        eps = model.apply_model(x_t, t, cond)
        theirs = ((noise - eps) ** 2).mean(dim=[1, 2, 3]).mean()
    assert abs(ours.item() - theirs.item()) < 1e-6 and ours.item() > 0.1
