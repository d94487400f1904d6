"""ldm/sampling.py: names, checks, the cached unconditional embedding, and generate() as the demo calls it."""
import os
from dataclasses import replace
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm import sampling
from ldm.checkpoint import fingerprint

TINY = "configs/tiny/v1-inference.yaml"


def test_prompt_names_are_safe_and_distinct():
    name = sampling.prompt_to_name
    assert name("teddybear on the beach") == "teddybear-on-the-beach"  # the reference's replace(" ", "-")
    assert name('a/b\\c:d*e?f"g<h>i|j\tk') == "abcdefghij-k"
    assert name("../../etc/passwd") == "etcpasswd"
    assert name("") == name("   ") == "empty-prompt"
    assert name("???").startswith("prompt-")
    long_a, long_b = "a photo of " * 30 + "one", "a photo of " * 30 + "two"
    assert name(long_a) != name(long_b) and len(name(long_a).encode()) <= 100 and name(long_a).startswith("a-photo-of-")
    cut = name("ünïcödé " * 40)  # cut on a character boundary, not inside a UTF-8 sequence
    assert len(cut.encode()) <= 100 and cut.startswith("ünïcödé-ünïcödé")
    with pytest.raises(ValueError, match="both map to the folder name 'ab'"):
        sampling.prompt_names(["a/b", "ab"])


def test_strengths_expand_to_one_per_adapter():
    assert sampling.expand_strengths([0.5], 3) == [0.5, 0.5, 0.5]
    assert sampling.expand_strengths([1, 0], 2) == [1.0, 0.0]
    assert sampling.expand_strengths([1.0], 0) == []
    for strengths, n, message in (([1, 2, 3], 2, "3 --strength values for 2"), ([-1], 1, "finite number >= 0"),
                                  ([float("nan")], 1, "finite number >= 0"), ([2.0], 0, "needs an adapter")):
        with pytest.raises(ValueError, match=message):
            sampling.expand_strengths(strengths, n)


def test_output_dir_checks(tmp_path, monkeypatch):
    sampling.check_output_dir(tmp_path / "new" / "deeper")  # creatable: fine, and nothing is created yet
    assert os.listdir(tmp_path) == []
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        sampling.check_output_dir(tmp_path / "f" / "out")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root may write anywhere; fake a read-only folder
    with pytest.raises(ValueError, match="is not writable"):
        sampling.check_output_dir(tmp_path / "out")


def test_random_weights_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = sampling.load_model(TINY, None, verbose=False)
    assert torch.equal(torch.rand(3), expected_next)
    b = sampling.load_model(TINY, None, verbose=False)
    assert a.base_fingerprint is None
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_adapter_trained_on_another_base_model_warns(tiny_finetune_model, tiny_ckpt, tmp_path):
    enc = tiny_finetune_model.cond_stage_model
    enc.adapter_save(tmp_path / "same", metadata={"base_fingerprint": fingerprint(tiny_ckpt)})
    enc.adapter_save(tmp_path / "other", metadata={"base_fingerprint": "0123456789abcdef"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampling.load_model(TINY, tiny_ckpt, embedding_paths=[str(tmp_path / "same")], verbose=False)
    with pytest.warns(UserWarning, match="was trained on base model 0123456789abcdef, but this one is"):
        sampling.load_model(TINY, tiny_ckpt, embedding_paths=[str(tmp_path / "other")], verbose=False)


def test_corrupt_or_misshapen_cache_is_recomputed(tiny_model, tiny_ckpt, tmp_path):
    path = tmp_path / f"{fingerprint(tiny_ckpt)}.safetensors"
    fresh = sampling.unconditional_embedding(tiny_model, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(fresh, tiny_model.cond_stage_model([""]))
    assert torch.equal(load_file(path)["uc"], fresh)
    for bad in (b"not a safetensors file", None):
        if bad is None:
            save_file({"uc": torch.zeros(1, 5, 64)}, str(path))
        else:
            path.write_bytes(bad)
        with pytest.warns(UserWarning, match="recomputing"):
            again = sampling.unconditional_embedding(tiny_model, str(tmp_path))
        assert torch.equal(again, fresh) and torch.equal(load_file(path)["uc"], fresh)
    # a valid cache is used as it is, whatever it holds
    save_file({"uc": torch.full((1, 77, 64), 0.25)}, str(path))
    assert torch.equal(sampling.unconditional_embedding(tiny_model, str(tmp_path)), torch.full((1, 77, 64), 0.25))
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary files left behind


def test_uncacheable_models_and_unwritable_caches_still_work(tiny_model, tmp_path):
    tiny_model.base_fingerprint = None  # random weights: nothing identifies them, so nothing is cached
    uc = sampling.unconditional_embedding(tiny_model, str(tmp_path / "uc"))
    assert uc.shape == (1, 77, 64) and not (tmp_path / "uc").exists()
    tiny_model.base_fingerprint = "0123456789abcdef"
    (tmp_path / "file").write_text("")
    with pytest.warns(UserWarning, match="could not cache"):
        again = sampling.unconditional_embedding(tiny_model, str(tmp_path / "file" / "uc"))
    assert torch.equal(again, uc)


@torch.no_grad()
def test_unconditional_embedding_is_the_empty_prompt_without_adapter(tiny_finetune_model, tmp_path):
    """The reference samples with uc from the plain text encoder: the empty prompt through the formula written out in
    tests/test_concat_kv.py with no extra K/V, though the model carries an adapter."""
    from .test_concat_kv import reference_conditioning

    enc = tiny_finetune_model.cond_stage_model
    tiny_finetune_model.base_fingerprint = None  # nothing cached: computed here
    uc = sampling.unconditional_embedding(tiny_finetune_model, str(tmp_path))
    expected = reference_conditioning(enc.transformer, enc.tokenize([""]), {})
    assert (uc - expected).abs().max() < 1.5e-5  # measured 1.4e-6
    assert (tiny_finetune_model.get_learned_conditioning([""]) - expected).abs().max() > 1e-2  # the adapter acts (3.3)


def test_generate_as_the_demo_calls_it(tiny_model, tmp_path):
    options = sampling.SamplingOptions(H=64, W=64, ddim_steps=2, seed=11, n_iter=2)
    kwargs = dict(options=options, progress=False, uc_dir=str(tmp_path / "uc"))
    results = sampling.generate(tiny_model, "circle on a red background", tmp_path / "out", **kwargs)
    folder = str(tmp_path / "out" / "circle-on-a-red-background")
    assert results == {"circle on a red background": {
        "folder": folder, "grid": os.path.join(folder, "grid.png"),
        "images": [os.path.join(folder, f"circle-on-a-red-background_{s}.png") for s in (11, 12)]}}
    # an explicit uc is used instead of the cached one, and scale 1 needs none at all
    planted = sampling.generate(tiny_model, ["circle on a red background"], tmp_path / "planted",
                                uc=torch.zeros(1, 77, 64), **kwargs)
    first = np.asarray(Image.open(results["circle on a red background"]["images"][0]))
    assert not np.array_equal(first, np.asarray(Image.open(planted["circle on a red background"]["images"][0])))
    sampling.generate(tiny_model, ["x"], tmp_path / "nouc", **{**kwargs, "uc_dir": str(tmp_path / "uc1"),
                                                                 "options": replace(options, scale=1.0)})
    assert not (tmp_path / "uc1").exists()
    with pytest.raises(ValueError, match="--H 60 must be a positive multiple of 8"):
        sampling.generate(tiny_model, ["y"], tmp_path / "bad", **{**kwargs, "options": replace(options, H=60)})
    assert not (tmp_path / "bad").exists()


def test_png_writes_are_atomic(tmp_path):
    path = tmp_path / "img.png"
    sampling.save_image(torch.zeros(4, 4, 3, dtype=torch.uint8), path)
    assert np.asarray(Image.open(path)).shape == (4, 4, 3)
    with pytest.raises(TypeError):
        sampling.save_image(torch.zeros(4, 4, 3, dtype=torch.float64), tmp_path / "bad.png")  # PIL refuses float64 RGB
    assert sorted(os.listdir(tmp_path)) == ["img.png"]


def test_pixels_are_truncated_like_the_reference():
    x = torch.tensor([0.0, 0.5, 0.999, 1.0]).view(1, 4, 1).expand(3, 4, 1)
    assert sampling.to_uint8(x)[:, 0, 0].tolist() == [0, 127, 254, 255]  # numpy's astype(uint8) of 255 * x


def test_textual_inversion_embeddings_load_through_embedding_path(tiny_ckpt, tiny_model, tmp_path):
    from ldm.modules.embedding_manager import EmbeddingManager
    from ldm.sampling import load_model

    manager = EmbeddingManager(["*"], ["circle"]).attach(tiny_model.cond_stage_model)
    with torch.no_grad():
        manager.embedding_parameters()[0].copy_(torch.randn(1, 64))
    manager.save(tmp_path / "embeddings.pt")
    model = load_model("configs/tiny/v1-inference.yaml", tiny_ckpt, embedding_paths=[str(tmp_path / "embeddings.pt")], verbose=False)
    with torch.no_grad():
        ours, expected = model.get_learned_conditioning(["a * on grass"]), tiny_model.get_learned_conditioning(["a * on grass"])
        assert torch.equal(ours, expected)
        manager.detach()
        assert not torch.equal(ours, tiny_model.get_learned_conditioning(["a * on grass"]))
