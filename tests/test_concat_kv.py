"""CatVersion's concatenated K/V against the formula, written out here independently, and the adapter files."""
import json
import math
import os
import pathlib
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from ldm.modules.encoders.modules import FrozenCLIPEmbedder

TINY_TEXT = OmegaConf.to_container(OmegaConf.load("configs/tiny/v1-inference.yaml").model.params.cond_stage_config.params.text_config)
PROMPTS = ["teddybear on the beach", "a teddybear", ""]
POOL_KEY = "prefix_tuning.prefix_tunings.prefix_tuning1.clip_text_model_self_prefix.control_trans"
AUTHORS_CONFIG = {  # spec section 2, verbatim
    "config": {"architecture": "prefix_tuning", "bottleneck_size": 512, "cross_prefix": True, "dropout": 0.0,
               "encoder_prefix": True, "flat": True, "leave_out": [], "non_linearity": "tanh", "prefix_length": 1,
               "shared_gating": True, "use_gating": False},
    "hidden_size": 768, "model_class": "CLIPTextModel", "model_name": None, "model_type": "clip_text_model",
    "name": "prefix_tuning1", "version": "3.2.1",
}


def authors_layer_keys(layers):
    return [f"text_model.encoder.layers.{i}.self_attn.prefix_tuning.pool.prefix_tunings.prefix_tuning1"
            ".clip_text_model_self_prefix.control_trans" for i in layers]


def reference_layout(control_trans, batch, prefix_length, layers, heads):
    """Spec section 2: {layer: (keys, values)} from the flat parameter, exactly as the reference reads it."""
    flat = control_trans.unsqueeze(0).expand(batch, -1)
    pairs = flat.reshape(batch, prefix_length, len(layers) * 2, heads, -1).permute(2, 0, 3, 1, 4).split(2)
    return {layer: (pair[0], pair[1]) for layer, pair in zip(layers, pairs)}


def reference_conditioning(model, ids, extras):
    """Eager CLIP text forward; `extras` maps layer -> [(keys, values, logit bias)] prepended to that layer's K/V."""
    b, n = ids.shape
    heads = model.config.num_attention_heads
    x = model.embeddings.token_embedding(ids) + model.embeddings.position_embedding.weight[:n]
    for i, layer in enumerate(model.encoder.layers):
        attn = layer.self_attn
        h = layer.layer_norm1(x)
        q, k, v = (proj(h).view(b, n, heads, -1).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        mask = torch.full((n, n), float("-inf")).triu(1)
        for ek, ev, bias in extras.get(i, []):
            k, v = torch.cat([ek, k], 2), torch.cat([ev, v], 2)
            mask = torch.cat([torch.full((n, ek.shape[2]), float(bias)), mask], 1)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        x = x + attn.out_proj(out)
        h = layer.mlp.fc1(layer.layer_norm2(x))
        x = x + layer.mlp.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu
    return model.final_layer_norm(x)


def expected(emb, adapters_with_bias):
    """Reference conditioning of PROMPTS for [(adapter, bias)]."""
    ids = emb.tokenize(PROMPTS)
    extras = {}
    for a, bias in adapters_with_bias:
        for layer, (k, v) in reference_layout(a.control_trans, len(PROMPTS), a.num_tokens, a.layers, emb.heads).items():
            extras.setdefault(layer, []).append((k, v, bias))
    return reference_conditioning(emb.transformer, ids, extras)


@pytest.fixture
def emb():
    torch.manual_seed(0)
    return FrozenCLIPEmbedder(text_config=TINY_TEXT, concat_kv={})


@pytest.fixture(scope="module")
def vit_l():
    return FrozenCLIPEmbedder()


@pytest.mark.parametrize("knobs", [{}, {"layers": [0, 4, 11], "num_tokens": 2}])
def test_conditioning_matches_formula(knobs):
    emb = FrozenCLIPEmbedder(text_config=TINY_TEXT, concat_kv=knobs)
    a = emb.adapters[0]
    assert a.control_trans.shape == (a.num_tokens * len(a.layers) * 2 * 64,)
    with torch.no_grad():
        ours, ref = emb(PROMPTS), expected(emb, [(a, 1.0)])
        with emb.adapter_disabled():
            plain = emb(PROMPTS)
    assert (ours - ref).abs().max() < 1e-5
    assert (ours - plain).abs().max() > 1e-2  # the adapter does change the conditioning


def test_logit_bias_zero_removes_the_plus_one(emb):
    clean = FrozenCLIPEmbedder(text_config=TINY_TEXT, concat_kv={"logit_bias": 0.0})
    clean.load_state_dict(emb.state_dict())
    with torch.no_grad():
        clean.adapters[0].control_trans.copy_(emb.adapters[0].control_trans)
        ours = clean(PROMPTS)
        assert (ours - expected(clean, [(clean.adapters[0], 0.0)])).abs().max() < 1e-5
        assert (ours - emb(PROMPTS)).abs().max() > 1e-3


def test_disabled_and_strength_zero_are_the_plain_model_bitwise(emb):
    plain = FrozenCLIPEmbedder(text_config=TINY_TEXT)
    plain.load_state_dict(emb.state_dict())
    with torch.no_grad():
        base, trained = plain(PROMPTS), emb(PROMPTS)
        with emb.adapter_disabled():
            assert torch.equal(emb(PROMPTS), base)
        emb.adapters[0].strength = 0.0
        assert torch.equal(emb(PROMPTS), base)
        emb.adapters[0].strength = 1.0
        assert torch.equal(emb(PROMPTS), trained)


def test_strength_counts_the_concept_token_s_times(emb):
    """Strength 2 == the same extra token present twice (and == the formula with bias 1 + log 2)."""
    a = emb.adapters[0]
    twice = FrozenCLIPEmbedder(text_config=TINY_TEXT, concat_kv={"num_tokens": 2})
    twice.load_state_dict(emb.state_dict())
    with torch.no_grad():
        # num_tokens is the second axis of the reference layout: duplicate every token entry.
        twice.adapters[0].control_trans.copy_(a.control_trans.view(1, -1).repeat(2, 1).flatten())
        a.strength = 2.0
        ours = emb(PROMPTS)
        assert (ours - twice(PROMPTS)).abs().max() < 1e-5
        assert (ours - expected(emb, [(a, 1.0 + math.log(2.0))])).abs().max() < 1e-5
    with pytest.raises(ValueError, match="strength must be a finite number >= 0"):
        a.strength = -1.0


def test_stacked_adapters_concatenate(emb, tmp_path):
    other = FrozenCLIPEmbedder(text_config=TINY_TEXT, concat_kv={"layers": [8, 9], "logit_bias": 0.0})
    other.adapter_save(tmp_path)
    second = emb.adapter_load(tmp_path, stack=True, strength=0.5)
    assert len(emb.adapters) == 2 and not second.control_trans.requires_grad
    assert emb.adapter_parameters() == [emb.adapters[0].control_trans]
    with torch.no_grad():
        ref = expected(emb, [(emb.adapters[0], 1.0), (second, math.log(0.5))])
        assert (emb(PROMPTS) - ref).abs().max() < 1e-5


def test_each_row_through_its_own_concept(tmp_path):
    """An adapter of 3 concepts: row r's conditioning is the formula's with concept concepts[r]'s numbers (as a
    one-concept adapter reads them), and concept k saves as a one-concept adapter of those numbers."""
    torch.manual_seed(0)
    emb = FrozenCLIPEmbedder(text_config=TINY_TEXT, concat_kv={"concepts": 3, "layers": [0, 4, 11], "num_tokens": 2})
    a = emb.adapters[0]
    concepts = [2, 0, 2]
    with torch.no_grad():
        ours = emb(PROMPTS, concepts)
        for row, k in enumerate(concepts):
            one = SimpleNamespace(control_trans=a.control_trans.view(3, -1)[k], num_tokens=2, layers=a.layers)
            assert (ours[row] - expected(emb, [(one, 1.0)])[row]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="this adapter holds 3 concepts; pass each batch row's concept index"):
        emb(PROMPTS)
    emb.adapter_save(tmp_path, concept=1)
    loaded = FrozenCLIPEmbedder(text_config=TINY_TEXT).adapter_load(tmp_path)
    assert loaded.concepts == 1 and torch.equal(loaded.control_trans, a.control_trans.view(3, -1)[1])


def test_gradients_reach_only_the_adapter(emb):
    emb(PROMPTS).square().mean().backward()
    assert emb.adapters[0].control_trans.grad.abs().sum() > 0
    assert all(p.grad is None for p in emb.transformer.parameters())


def test_save_load_round_trip_both_formats(emb, tmp_path):
    with torch.no_grad():
        before = emb(PROMPTS)
    emb.adapter_save(tmp_path / "a", metadata={"base_class_word": "teddybear", "global_step": 250})
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == ["adapter_config.json", "catversion.safetensors", "pytorch_adapter.bin"]  # no temp files left
    with safe_open(tmp_path / "a" / "catversion.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["base_class_word"] == "teddybear" and meta["global_step"] == "250"
    assert (json.loads(meta["layers"]), meta["num_tokens"], float(meta["logit_bias"]), meta["width"], meta["heads"]) == ([9, 10, 11], "1", 1.0, "64", "4")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config == {**AUTHORS_CONFIG, "hidden_size": 64}
    bin_state = torch.load(tmp_path / "a" / "pytorch_adapter.bin", weights_only=True)
    assert sorted(bin_state) == sorted(authors_layer_keys([9, 10, 11]) + [POOL_KEY])
    assert all(torch.equal(t, emb.adapters[0].control_trans.detach()) for t in bin_state.values())

    for source in ["a", "a/catversion.safetensors", "a/pytorch_adapter.bin"]:
        fresh = FrozenCLIPEmbedder(text_config=TINY_TEXT)
        fresh.load_state_dict(emb.state_dict())
        loaded = fresh.adapter_load(tmp_path / source)
        assert loaded.layers == [9, 10, 11] and loaded.control_trans.requires_grad  # resumable
        with torch.no_grad():
            assert torch.equal(fresh(PROMPTS), before), source

    os.remove(tmp_path / "a" / "catversion.safetensors")  # a directory with only the authors' pair
    fresh = FrozenCLIPEmbedder(text_config=TINY_TEXT)
    fresh.load_state_dict(emb.state_dict())
    fresh.adapter_load(tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(PROMPTS), before)


def test_other_layer_set_round_trips_through_authors_format(tmp_path):
    emb = FrozenCLIPEmbedder(text_config=TINY_TEXT, concat_kv={"layers": [2, 5], "num_tokens": 2})
    emb.adapter_save(tmp_path)
    os.remove(tmp_path / "catversion.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())["config"]
    assert config["prefix_length"] == 2 and config["leave_out"] == [0, 1, 3, 4, 6, 7, 8, 9, 10, 11]
    with torch.no_grad():
        before = emb(PROMPTS)
        loaded = emb.adapter_load(tmp_path)
        assert (loaded.layers, loaded.num_tokens) == ([2, 5], 2)
        assert torch.equal(emb(PROMPTS), before)


def test_hand_written_authors_file_loads_into_vit_l(vit_l, tmp_path):
    torch.manual_seed(1)
    flat = torch.randn(4608)  # the reference's size: 1 token x 3 layers x 2 x 768
    torch.save({k: flat for k in authors_layer_keys([9, 10, 11]) + [POOL_KEY]}, tmp_path / "pytorch_adapter.bin")
    (tmp_path / "adapter_config.json").write_text(json.dumps(AUTHORS_CONFIG))
    a = vit_l.adapter_load(tmp_path)
    assert (a.layers, a.num_tokens, a.logit_bias) == ([9, 10, 11], 1, 1.0)
    # A ViT-L forward takes seconds on CPU, so check the per-layer K/V (what the tiny tests show the
    # forward turns into the formula's conditioning) against the reference layout.
    for layer, (k, v) in reference_layout(flat, 2, 1, [9, 10, 11], 12).items():
        ours_k, ours_v = a.kv(layer, 2)
        assert ours_k.shape == (2, 12, 1, 64) and torch.equal(ours_k, k) and torch.equal(ours_v, v)


def test_files_for_another_model_are_refused(vit_l, emb, tmp_path):
    torch.save({POOL_KEY: torch.randn(4608)}, tmp_path / "vit_l.bin")
    with pytest.raises(ValueError) as e:
        emb.adapter_load(tmp_path / "vit_l.bin")
    assert str(e.value) == (
        f"adapter {tmp_path / 'vit_l.bin'} has 4608 numbers = 36 layers x 2 x width 64 x 1 token(s), "
        "but this text encoder has 12 layers; was it trained for another base model?"
    )
    emb.adapter_save(tmp_path / "tiny")
    with pytest.raises(ValueError) as e:
        vit_l.adapter_load(tmp_path / "tiny" / "pytorch_adapter.bin")
    assert str(e.value) == (
        f"adapter {tmp_path / 'tiny' / 'pytorch_adapter.bin'} has 384 numbers, which is not a multiple of 2*768*1 for this "
        "text encoder (width 768, 1 token(s)); was it trained for another base model?"
    )
    with pytest.raises(ValueError, match=r"made for a text encoder of width 64 with 4 heads, this one has width 768 with 12 heads"):
        vit_l.adapter_load(tmp_path / "tiny")
    shallow = FrozenCLIPEmbedder(text_config={**TINY_TEXT, "num_hidden_layers": 6})
    with pytest.raises(ValueError) as e:
        shallow.adapter_load(tmp_path / "tiny")
    assert str(e.value) == (
        f"adapter {tmp_path / 'tiny' / 'catversion.safetensors'} covers layers [9, 10, 11], but this text encoder has "
        "layers 0-5; was it trained for another base model?"
    )


class _Plant:
    """Unpickling this object would create a file: what a malicious .bin could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_bin_is_loaded_without_running_pickled_code(emb, tmp_path):
    sentinel = tmp_path / "pwned"
    torch.save({POOL_KEY: torch.zeros(384), "x": _Plant(str(sentinel))}, tmp_path / "pytorch_adapter.bin")
    with pytest.raises(ValueError, match="holds pickled Python objects beyond tensors") as e:
        emb.adapter_load(tmp_path / "pytorch_adapter.bin")
    assert len(str(e.value).splitlines()) == 1
    assert not sentinel.exists()


@pytest.mark.parametrize("knobs, message", [
    ({"layers": [9, 9]}, "concat_kv layers must be distinct non-negative layer indices, got [9, 9]"),
    ({"layers": []}, "concat_kv layers must be distinct non-negative layer indices, got []"),
    ({"layers": [-1, 11]}, "concat_kv layers must be distinct non-negative layer indices, got [-1, 11]"),
    ({"layers": [10, 12]}, "covers layers [10, 12], but this text encoder has layers 0-11"),
    ({"num_tokens": 0}, "concat_kv num_tokens must be >= 1, got 0"),
    ({"init": "ones"}, "concat_kv init must be 'randn' (as the reference) or 'zeros', got 'ones'"),
    ({"concepts": 0}, "concat_kv concepts must be >= 1, got 0"),
    ({"layer": [9]}, "unknown concat_kv option(s) ['layer']; known: ['layers',"),
])
def test_bad_concat_kv_options_are_refused_by_name(knobs, message):
    with pytest.raises(ValueError) as e:
        FrozenCLIPEmbedder(text_config=TINY_TEXT, concat_kv=knobs)
    assert message in str(e.value)


def test_width_not_divisible_by_heads_is_refused():
    from ldm.modules.encoders.concat_kv import ConcatKV

    with pytest.raises(ValueError, match="width 64 is not divisible by 3 heads"):
        ConcatKV(64, 3)


def test_damaged_adapter_files_are_refused_by_what_is_wrong(emb, tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(ValueError, match=r"no adapter to save; build the embedder with concat_kv=\{\.\.\.\}"):
        FrozenCLIPEmbedder(text_config=TINY_TEXT).adapter_save(tmp_path / "none")
    emb.adapter_save(tmp_path / "a")
    ours, authors = tmp_path / "a" / "catversion.safetensors", tmp_path / "a" / "pytorch_adapter.bin"
    with safe_open(ours, "pt") as f:
        metadata = f.metadata()
    save_file({"control_trans": load_file(ours)["control_trans"][:-1].contiguous()}, ours, metadata=metadata)
    with pytest.raises(ValueError, match=f"adapter {ours} has 383 numbers, its metadata implies 384; the file is corrupt"):
        emb.adapter_load(ours)

    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["config"]["leave_out"] = [0]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"adapter {authors} has 3 layers of numbers but its adapter_config.json "
                                         "leave_out keeps 11; the files do not belong together"):
        emb.adapter_load(authors)

    state = torch.load(authors, weights_only=True)
    first = next(iter(state))
    state[first] = state[first] + 1  # the four copies no longer agree
    torch.save(state, authors)
    with pytest.raises(ValueError, match=f"adapter {authors} has no single `...control_trans` tensor"):
        emb.adapter_load(authors)
