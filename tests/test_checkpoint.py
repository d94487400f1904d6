import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import TEXT_PREFIX, CheckpointError, fingerprint, keys_from_sd, keys_to_sd, read_state_dict
from ldm.util import load_model_from_config
from ldm.weights import WeightsError

from .conftest import PICKLED_OPEN, TINY_INFERENCE


def test_tiny_checkpoint_is_in_sd_format_and_loads(tiny_ckpt, tiny_model):
    raw = torch.load(tiny_ckpt, weights_only=True)["state_dict"]
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in raw  # transformers 4.x spelling, as SD files
    assert "model.diffusion_model.out.2.weight" in raw and "first_stage_model.decoder.conv_out.weight" in raw
    assert not tiny_model.training
    loaded = keys_to_sd(tiny_model.state_dict())
    assert set(loaded) == set(raw) - {"betas", "alphas_cumprod"}
    assert all(torch.equal(loaded[k], raw[k]) for k in loaded)
    assert tiny_model.base_fingerprint == fingerprint(tiny_ckpt)


def test_make_tiny_model_is_deterministic(tiny_ckpt, tmp_path):
    other = tmp_path / "again.safetensors"
    from ldm.cli.make_tiny_model import main

    main(["--out", str(other)])
    a, b = read_state_dict(tiny_ckpt), read_state_dict(str(other))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.count_nonzero(v) == 0 for k, v in a.items() if k.endswith("weight"))


def test_safetensors_and_bare_dict_and_known_extras_load(tiny_ckpt, tmp_path):
    from safetensors.torch import save_file

    state = read_state_dict(tiny_ckpt)
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "m.safetensors"))
    torch.save(state, tmp_path / "bare.ckpt")
    for name in ("m.safetensors", "bare.ckpt"):
        model = load_model_from_config(OmegaConf.load(TINY_INFERENCE), str(tmp_path / name), verbose=False)
        w = model.state_dict()["model.diffusion_model.out.2.weight"]
        assert torch.equal(w, state["model.diffusion_model.out.2.weight"])


def _load(path):
    return load_model_from_config(OmegaConf.load(TINY_INFERENCE), str(path), verbose=False)


def _one_line(err):
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_bad_checkpoints_give_one_line_errors(tiny_ckpt, tmp_path):
    state = read_state_dict(tiny_ckpt)

    with pytest.raises(CheckpointError) as e:
        _load(tmp_path / "nowhere.ckpt")
    assert "checkpoint not found" in _one_line(e)

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(open(tiny_ckpt, "rb").read()[:100_000])
    with pytest.raises(WeightsError) as e:  # unreadable, as opposed to readable but not fitting (CheckpointError)
        _load(truncated)
    assert f"{truncated} is corrupt or truncated (" in _one_line(e) and "; download it again" in _one_line(e)

    torch.save({"state_dict": {"encoder.weight": torch.zeros(3)}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError) as e:
        _load(tmp_path / "other.ckpt")
    assert "not a Stable Diffusion v1.x checkpoint" in _one_line(e)

    wrong = dict(state)
    wrong["model.diffusion_model.out.2.weight"] = torch.zeros(4, 64, 3, 3)
    torch.save(wrong, tmp_path / "wrong_shape.ckpt")
    with pytest.raises(CheckpointError) as e:
        _load(tmp_path / "wrong_shape.ckpt")
    assert "shape mismatch for model.diffusion_model.out.2.weight: checkpoint (4, 64, 3, 3), model (4, 32, 3, 3)" in _one_line(e)

    missing = {k: v for k, v in state.items() if not k.startswith("first_stage_model.decoder.")}
    missing["some.unknown.weight"] = torch.zeros(1)
    torch.save(missing, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError) as e:
        _load(tmp_path / "missing.ckpt")
    msg = _one_line(e)
    assert "missing first_stage_model.decoder." in msg and "unexpected some.unknown.weight" in msg

    sd2 = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
    sd2["cond_stage_model.model.positional_embedding"] = torch.zeros(77, 1024)
    torch.save(sd2, tmp_path / "sd2.ckpt")
    with pytest.raises(CheckpointError) as e:
        _load(tmp_path / "sd2.ckpt")
    assert "SD 2.x/SDXL" in _one_line(e)


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Payload(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(WeightsError) as e:
        _load(tmp_path / "evil.ckpt")
    assert f"refused because unpickling them could run code (it would call {PICKLED_OPEN})" in _one_line(e)
    assert not marker.exists()


def test_fingerprint_tracks_content(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * 10_000_000)
    b.write_bytes(b"x" * 9_999_999 + b"y")
    assert fingerprint(a) != fingerprint(b) and fingerprint(a) == fingerprint(a)


def test_text_encoder_keys_map_both_ways_and_either_spelling_is_read():
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    text_config = OmegaConf.to_container(OmegaConf.load(TINY_INFERENCE).model.params.cond_stage_config.params.text_config)
    transformer = FrozenCLIPEmbedder(text_config=text_config).transformer.state_dict()  # transformers 5.x names
    ours = {TEXT_PREFIX + k: v for k, v in transformer.items()}
    ours["model.diffusion_model.out.2.weight"] = torch.zeros(1)  # other keys are left alone
    sd = keys_to_sd(ours)
    for k in ("text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
              "text_model.encoder.layers.11.self_attn.k_proj.weight", "text_model.final_layer_norm.weight"):
        assert TEXT_PREFIX + k in sd
    assert sum(k.startswith(TEXT_PREFIX + "text_model.") for k in sd) == len(transformer)
    assert "model.diffusion_model.out.2.weight" in sd
    assert keys_to_sd(sd).keys() == sd.keys()  # already SD-spelled (a transformers 4.x folder): left as it is
    back = keys_from_sd(sd)
    assert back.keys() == ours.keys() and all(back[k] is ours[k] for k in ours)
    assert keys_from_sd(ours).keys() == ours.keys()  # 5.x-spelled keys pass through
