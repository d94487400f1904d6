import os

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import sampling
from ldm.analysis import attention_maps as am
from ldm.evaluation.clip_metrics import load_mask_folder
from ldm.images import list_images
from ldm.modules.attention import CrossAttention
from ldm.modules.embedding_manager import EmbeddingManager
from ldm.cli.attention_maps import main as attention_maps_main

from .conftest import TINY_INFERENCE, TOY_CKPT, TOY_INFERENCE


def test_recording_path_is_the_attention_sdpa_computes():
    torch.manual_seed(0)
    attn = CrossAttention(32, context_dim=16, heads=4, dim_head=8)
    x, context = torch.randn(2, 9, 32), torch.randn(2, 5, 16)
    fused = attn(x, context)
    seen = []
    attn.probs_hook = lambda module, probs: seen.append(probs)
    explicit = attn(x, context)
    del attn.probs_hook
    assert torch.allclose(explicit, fused, atol=1e-6, rtol=0)
    assert seen[0].shape == (2, 4, 9, 5)
    assert torch.allclose(seen[0].sum(-1), torch.ones(2, 4, 9), atol=1e-6)
    assert attn.probs_hook is None  # the default (fused) path again


def _sample(model, scale, steps=2, recorder=None):
    cond = model.get_learned_conditioning(["a circle on grass"])
    uc = model.get_learned_conditioning([""])
    return sampling.sample_images(model, cond, uc, seed=3, H=64, W=64, ddim_steps=steps, scale=scale, progress=False)


def test_recorder_keeps_per_layer_distributions_of_the_conditional_half(tiny_model):
    with am.CrossAttentionRecorder(tiny_model.model.diffusion_model, pixels=4, batch=1, keep_raw=True) as rec:
        image = _sample(tiny_model, scale=10.0)
    # The tiny UNet at 64 px has five cross-attention layers at 2x2 (latent 8x8 / 4): two encoder, three decoder.
    names = [name for name, _ in rec.raw]
    assert len(set(names)) == 5 and len(names) == 5 * 2 and rec.calls == 10
    for _, probs in rec.raw:
        assert probs.shape == (1, 4, 4, 77)  # conditional half only, 4 heads, 4 pixels, 77 tokens
        assert torch.allclose(probs.sum(-1), torch.ones(1, 4, 4), atol=1e-6)
    mean = torch.stack([p.mean(1) for _, p in rec.raw]).mean(0)
    assert torch.allclose(rec.mean(), mean, atol=1e-7)
    assert torch.allclose(rec.mean().sum(-1), torch.ones(1, 4), atol=1e-6)
    # Recording does not change the sample, and the first step's maps are those of the conditional prompt alone.
    assert torch.allclose(image, _sample(tiny_model, scale=10.0), atol=1e-4)
    with am.CrossAttentionRecorder(tiny_model.model.diffusion_model, pixels=4, batch=1, keep_raw=True) as alone:
        _sample(tiny_model, scale=1.0)  # same x_T and first timestep; the later steps differ
    for (_, guided), (_, plain) in zip(rec.raw[:5], alone.raw[:5]):
        assert torch.allclose(guided, plain, atol=1e-6)


def test_recorder_names_the_resolutions_it_saw(tiny_model):
    with am.CrossAttentionRecorder(tiny_model.model.diffusion_model, pixels=9) as rec:
        _sample(tiny_model, scale=1.0, steps=1)
    with pytest.raises(ValueError, match=r"no cross-attention layer with 9 pixels ran; the layers seen have \[64, 16, 4, 1\]"):
        rec.mean()


def test_mask_is_the_normalised_word_map_thresholded():
    maps = torch.zeros(3, 2, 2)
    maps[1] = torch.tensor([[0.1, 0.2], [0.3, 0.5]])  # normalised: [[0, .25], [.5, 1]]
    mask = am.concept_mask(maps, [1], (2, 2), threshold=0.5)
    assert mask.tolist() == [[False, False], [True, True]]
    assert am.concept_mask(maps, [0], (4, 4)).all()  # a constant map says nothing about location
    with pytest.raises(ValueError, match="--mask_threshold 1.0 must lie strictly between 0 and 1"):
        am.concept_mask(maps, [1], (2, 2), threshold=1.0)


def test_word_positions_cover_multi_token_words_and_expanded_placeholders(tiny_model):
    enc = tiny_model.cond_stage_model
    positions = am.prompt_positions(enc, "a teddybear on grass")
    assert [text for _, _, text in positions] == ["<|startoftext|>", "a", "teddy", "bear", "on", "grass", "<|endoftext|>"]
    assert am.word_positions(enc, positions, "teddybear") == [2, 3]
    with pytest.raises(ValueError, match=r"--mask_token 'circle' is not in the prompt \(its tokens: a teddy bear on grass\)"):
        am.word_positions(enc, positions, "circle")
    manager = EmbeddingManager(["*"], ["circle"], num_vectors_per_token=2).attach(enc)
    positions = am.prompt_positions(enc, "a * on grass", manager)
    assert [text for _, _, text in positions][1:-1] == ["a", "*", "*", "on", "grass"]
    assert am.word_positions(enc, positions, "*") == [2, 3]


def test_script_writes_one_map_per_token_and_a_binary_mask(tiny_ckpt, tmp_path):
    out = tmp_path / "maps"
    args = ["--config", TINY_INFERENCE, "--ckpt_path", tiny_ckpt, "--prompt", "a circle on grass", "--outdir", str(out),
            "--ddim_steps", "2", "--H", "64", "--W", "64", "--seed", "5", "--mask_token", "circle", "--uc_dir", ""]
    (result,) = attention_maps_main(args)
    stem = "a-circle-on-grass_5"
    assert result["image"] == str(out / "samples" / f"{stem}.png")
    tokens = sorted(os.listdir(out / "attention" / stem))
    assert tokens == ["00_startoftext.png", "01_a.png", "02_circle.png", "03_on.png", "04_grass.png",
                      "05_endoftext.png", "grid.png"]
    for name in tokens:
        with Image.open(out / "attention" / stem / name) as im:
            assert im.mode == "RGB" and (name == "grid.png" or im.size == (64, 64))
    with Image.open(out / "masks" / f"{stem}.png") as im:
        mask = np.asarray(im)
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255} and mask.max() == 255
    # evaluate.py's reader pairs it with the generated image by stem
    masks = load_mask_folder(out / "masks", list(list_images(out / "samples")))
    assert np.array_equal(masks[stem], mask > 127)


def test_script_refuses_a_mask_word_missing_from_the_prompt_before_sampling(tiny_ckpt, tmp_path, capsys):
    args = ["--config", TINY_INFERENCE, "--ckpt_path", tiny_ckpt, "--prompt", "a circle", "--outdir", str(tmp_path / "o"),
            "--H", "64", "--W", "64", "--mask_token", "square", "--uc_dir", ""]
    with pytest.raises(SystemExit) as e:
        attention_maps_main(args)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: --mask_token 'square' is not in the prompt (its tokens: a circle); "
                                               "pass a word of the prompt, usually the concept's class word")
    assert not (tmp_path / "o" / "samples").exists()


def test_default_downsample_picks_a_size_the_model_has(tmp_path, capsys):
    # The toy model has cross-attention 1 and 2 times below its 8x8 latent, not SD's 4 (which stopped the script).
    args = ["--config", TOY_INFERENCE, "--ckpt_path", TOY_CKPT, "--prompt", "circle on a blue background", "--outdir",
            str(tmp_path / "maps"), "--ddim_steps", "2", "--H", "64", "--W", "64", "--uc_dir", ""]
    (result,) = attention_maps_main(args)
    out = capsys.readouterr().out
    assert ("Attention maps from the 4x4 cross-attention layers (--attn_downsample 2; this model's layers are 1, 2 "
            "times smaller than the latent)") in out
    assert len(result["maps"]) == 7
    with Image.open(result["grid"]) as grid:  # the image and 6 token maps of 64 px, enlarged to 256, labelled
        assert grid.size[0] > 7 * 256 and grid.size[1] > 256
    # a factor given explicitly that the model lacks is refused in one line, before sampling
    with pytest.raises(SystemExit) as e:
        attention_maps_main(args[:5] + [str(tmp_path / "other")] + args[6:] + ["--attn_downsample", "4"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: --attn_downsample 4: this model has no cross-attention layers 4 "
                                               "times smaller than the latent, only 1, 2; pass one of those or omit the flag")
    assert not (tmp_path / "other" / "samples").exists()


def test_attention_factors_and_the_pick(tiny_model, toy_model):
    assert am.attention_factors(tiny_model.model.diffusion_model) == [1, 2, 4, 8]  # as SD v1
    assert am.attention_factors(toy_model.model.diffusion_model) == [1, 2]
    assert am.pick_downsample([1, 2, 4, 8], 64, 64) == 4
    assert am.pick_downsample([1, 2], 8, 8) == 2
    assert am.pick_downsample([2, 8], 8, 8) == 8  # as near to 4 as 2 on a log scale: the coarser
    assert am.pick_downsample([1, 2, 4, 8], 6, 6) == 2  # 4 does not divide a 6x6 latent
