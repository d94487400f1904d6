"""diffusers-format folders (written by diffusers' and transformers' own save functions) load into our model."""
import copy
import os

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ldm.checkpoint import fingerprint, keys_to_sd, read_state_dict
from ldm.util import load_model_from_config
from ldm.weights import WeightsError

from .conftest import TINY_INFERENCE, diffusers_models


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    return diffusers_models(tiny_ckpt)


def write_folder(models, folder, safe_serialization=True, variant=None, dtype=None, max_shard_size=None):
    unet, vae, text_encoder = (copy.deepcopy(m).to(dtype) if dtype else m for m in models)
    shard = {"max_shard_size": max_shard_size} if max_shard_size else {}
    unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=safe_serialization, variant=variant, **shard)
    vae.save_pretrained(os.path.join(folder, "vae"), safe_serialization=safe_serialization, variant=variant)
    text_encoder.save_pretrained(os.path.join(folder, "text_encoder"), variant=variant, **shard)
    return str(folder)


def sd_state(tiny_ckpt):
    """What our reader should give: the checkpoint's own tensors (the schedule buffers are not model weights)."""
    return {k: v for k, v in read_state_dict(tiny_ckpt).items() if k not in ("betas", "alphas_cumprod")}


def assert_same(state, expected):
    assert sorted(state) == sorted(expected)
    different = [k for k in expected if state[k].dtype != torch.float32 or not torch.equal(state[k], expected[k])]
    assert not different, different[:5]


def test_diffusers_folder_loads_with_bitwise_equal_weights(models, tiny_ckpt, tiny_model, tmp_path):
    folder = write_folder(models, tmp_path / "sd")
    assert os.path.isfile(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    assert os.path.isfile(os.path.join(folder, "text_encoder", "model.safetensors"))
    model = load_model_from_config(OmegaConf.load(TINY_INFERENCE), folder, verbose=False)
    expected = tiny_model.state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert model.base_fingerprint == fingerprint(folder) != tiny_model.base_fingerprint


def test_bin_and_sharded_folders(models, tiny_ckpt, tmp_path):
    folder = write_folder(models, tmp_path / "sd", safe_serialization=False, max_shard_size="300KB")
    unet_files = os.listdir(os.path.join(folder, "unet"))
    assert "diffusion_pytorch_model.bin.index.json" in unet_files and len(unet_files) > 3  # several .bin shards
    assert "diffusion_pytorch_model.bin" in os.listdir(os.path.join(folder, "vae"))
    assert "model.safetensors.index.json" in os.listdir(os.path.join(folder, "text_encoder"))
    assert_same(read_state_dict(folder), sd_state(tiny_ckpt))


def test_transformers_4x_text_encoder_and_old_vae_attention_names(models, tiny_ckpt, tmp_path):
    folder = write_folder(models, tmp_path / "sd")
    # transformers 4.x wrote the text encoder with a `text_model.` level (and older versions a position_ids
    # buffer), as pytorch_model.bin with safe_serialization=False.
    text_dir = os.path.join(folder, "text_encoder")
    text = load_file(os.path.join(text_dir, "model.safetensors"))
    assert not any(k.startswith("text_model.") for k in text)
    os.remove(os.path.join(text_dir, "model.safetensors"))
    text_4x = {"text_model." + k: v for k, v in text.items()}
    text_4x["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save(text_4x, os.path.join(text_dir, "pytorch_model.bin"))
    # diffusers before 0.15 named the VAE's mid attention query/key/value/proj_attn.
    vae_path = os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def old_name(key):
        block, attention, rest = key.partition(".mid_block.attentions.0.")
        module, _, param = rest.rpartition(".")
        return f"{block}{attention}{old_names.get(module, module)}.{param}" if attention else key

    renamed = {old_name(k): v for k, v in load_file(vae_path).items()}
    assert any(".proj_attn." in k for k in renamed)
    save_file(renamed, vae_path)

    expected = sd_state(tiny_ckpt)
    state = read_state_dict(folder)
    assert torch.equal(state.pop("cond_stage_model.transformer.text_model.embeddings.position_ids"), torch.arange(77)[None])
    assert_same(state, expected)
    load_model_from_config(OmegaConf.load(TINY_INFERENCE), folder, verbose=False)  # position_ids is a known extra


def test_fp16_variant_is_chosen_or_detected(models, tiny_ckpt, tmp_path):
    expected = sd_state(tiny_ckpt)
    folder = write_folder(models, tmp_path / "both")
    write_folder(models, folder, variant="fp16", dtype=torch.float16)
    assert "diffusion_pytorch_model.fp16.safetensors" in os.listdir(os.path.join(folder, "unet"))
    assert_same(read_state_dict(folder), expected)  # the plain files win without a variant
    rounded = {k: v.half().float() for k, v in expected.items()}
    assert_same(read_state_dict(folder + ":fp16"), rounded)
    assert any(not torch.equal(rounded[k], expected[k]) for k in expected)  # fp16 really is another set of weights
    assert fingerprint(folder + ":fp16") != fingerprint(folder)

    only_fp16 = write_folder(models, tmp_path / "fp16", variant="fp16", dtype=torch.float16)
    assert_same(read_state_dict(only_fp16), rounded)
    model = load_model_from_config(OmegaConf.load(TINY_INFERENCE), only_fp16 + ":fp16", verbose=False)
    assert torch.equal(keys_to_sd(model.state_dict())["model.diffusion_model.out.2.weight"],
                       rounded["model.diffusion_model.out.2.weight"])


def _error(path):
    with pytest.raises(WeightsError) as e:  # or its CheckpointError, for a folder that reads but does not fit
        load_model_from_config(OmegaConf.load(TINY_INFERENCE), str(path), verbose=False)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_broken_folders_give_one_line_errors(models, tmp_path):
    folder = write_folder(models, tmp_path / "sd")
    unet_path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    unet = load_file(unet_path)

    wrong = dict(unet, **{"conv_out.weight": torch.zeros(4, 64, 3, 3)})
    save_file(wrong, unet_path)
    assert ("shape mismatch for model.diffusion_model.out.2.weight: checkpoint (4, 64, 3, 3), model (4, 32, 3, 3)"
            in _error(folder))

    extra = dict(unet, **{"add_embedding.linear_1.weight": torch.zeros(1)})
    del extra["mid_block.attentions.0.proj_out.bias"]
    save_file(extra, unet_path)
    msg = _error(folder)
    assert "unexpected unet/add_embedding.linear_1.weight" in msg
    assert "missing model.diffusion_model.middle_block.1.proj_out.bias" in msg

    save_file(unet, unet_path)
    os.rename(os.path.join(folder, "vae"), os.path.join(folder, "vae_moved"))
    assert f"diffusers folder {folder} has no vae/" in _error(folder)
    os.rename(os.path.join(folder, "vae_moved"), os.path.join(folder, "vae"))

    assert "has no bf16 weights" in _error(folder + ":bf16")
    os.remove(unet_path)
    for variant in ("fp16", "ema"):
        save_file(unet, unet_path.replace(".safetensors", f".{variant}.safetensors"))
    assert f"holds only variant weights (ema, fp16); choose one by passing {folder}:ema" in _error(folder)

    os.makedirs(tmp_path / "empty")
    assert "not a diffusers model" in _error(tmp_path / "empty")
    assert "or of a diffusers folder" in _error(tmp_path / "nowhere")


@pytest.mark.parametrize("damage, message", [
    ("missing_shard", "names 1 shard(s) that are not there, e.g. "),
    ("garbled_index", "cannot read shard index "),
])
def test_an_incomplete_sharded_folder_is_refused_with_the_fix(models, tmp_path, damage, message):
    folder = write_folder(models, tmp_path / "sd", max_shard_size="300KB")
    unet = os.path.join(folder, "unet")
    index = os.path.join(unet, "diffusion_pytorch_model.safetensors.index.json")
    if damage == "missing_shard":
        shard = sorted(f for f in os.listdir(unet) if f.endswith(".safetensors"))[-1]
        os.remove(os.path.join(unet, shard))
    else:
        with open(index, "w") as f:
            f.write('{"weight_map": ')
    with pytest.raises(WeightsError) as e:
        read_state_dict(folder)
    assert message in str(e.value) and index in str(e.value)
    assert str(e.value).endswith("the folder is incomplete, download it again")
