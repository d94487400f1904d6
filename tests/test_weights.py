"""ldm/weights.py: every weights file we load is read by it, safely, with the same one-line messages."""
import os

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

import main
from ldm.checkpoint import read_state_dict
from ldm.evaluation.clip_metrics import load_clip
from ldm.modules.embedding_manager import read_embeddings
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.weights import WeightsError, load, read_safetensors, read_tensors

from .conftest import PICKLED_OPEN, TINY_INFERENCE


class _RunsCode:
    """Unpickling this calls os.system (a module torch blocks outright) or io.open (a plain unknown global)."""

    def __init__(self, call, path):
        self.call, self.path = call, path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",)) if self.call == "os.system" else (open, (self.path, "w"))


def _tiny_embedder():
    text = OmegaConf.load(TINY_INFERENCE).model.params.cond_stage_config.params.text_config
    return FrozenCLIPEmbedder(text_config=OmegaConf.to_container(text))


# The five readers of pickles in the project, each given the path of a file named as it expects.
READERS = {
    "SD checkpoint": ("model.ckpt", read_state_dict),
    "resumed run": ("last.ckpt", main.check_resumable),
    "adapter": ("pytorch_adapter.bin", lambda path: _tiny_embedder().adapter_load(path)),
    "embeddings": ("embeddings.pt", read_embeddings),
    "CLIP weights": ("open_clip_pytorch_model.bin", lambda path: load_clip("ViT-B-32", path)),
}


@pytest.mark.parametrize("call", ["io.open", "os.system"])
@pytest.mark.parametrize("reader", list(READERS))
def test_every_reader_refuses_pickled_code_with_the_one_message(reader, call, tmp_path):
    name, read = READERS[reader]
    path, marker = tmp_path / name, tmp_path / "pwned"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _RunsCode(call, str(marker))}, path)
    with pytest.raises(WeightsError) as e:
        read(str(path))
    wanted = "posix.system" if call == "os.system" else PICKLED_OPEN
    assert f"{path} holds pickled Python objects beyond tensors, which are refused because unpickling them could run " \
           f"code (it would call {wanted}); " in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("reader", list(READERS))
def test_every_reader_reports_a_truncated_file_with_the_one_message(reader, tmp_path):
    name, read = READERS[reader]
    path = tmp_path / name
    torch.save({"state_dict": {"x": torch.zeros(10_000)}}, path)
    path.write_bytes(path.read_bytes()[:2_000])
    with pytest.raises(WeightsError) as e:
        read(str(path))
    assert f"{path} is corrupt or truncated (" in str(e.value) and "\n" not in str(e.value)


def test_fix_replaces_the_suggested_fix_and_a_context_may_wrap_it(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"garbage")
    with pytest.raises(WeightsError, match=r"is corrupt or truncated \(.*\); download it again$"):
        load(path)
    with pytest.raises(WeightsError, match=r"is corrupt or truncated \(.*\); start again$"):
        load(path, fix="start again")
    with pytest.raises(WeightsError, match=rf"^cannot resume: {path} is corrupt or truncated \(.*\); pass an earlier"):
        main.check_resumable(str(path))
    with pytest.raises(WeightsError, match=f"^weights file not found: {tmp_path / 'nope.pt'}; pass the path"):
        load(tmp_path / "nope.pt")


def test_zip_and_legacy_pickles_and_wrapped_state_dicts(tmp_path):
    tensors = {"a": torch.arange(6.0), "b": torch.ones(2, dtype=torch.int64)}
    torch.save({"state_dict": tensors, "global_step": 3}, tmp_path / "zip.ckpt")
    torch.save(tensors, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    for name in ("zip.ckpt", "legacy.pt"):
        read = read_tensors(tmp_path / name)
        assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)
    torch.save({"w": torch.zeros(1), "note": "text"}, tmp_path / "mixed.pt")
    with pytest.raises(WeightsError, match="mixed.pt is not a state dict of tensors; pass a file saved from"):
        read_tensors(tmp_path / "mixed.pt")


def test_allow_admits_exactly_the_named_classes(tmp_path):
    torch.save({"p": nn.ParameterDict({"x": nn.Parameter(torch.ones(2))})}, tmp_path / "ref.pt")
    with pytest.raises(WeightsError, match="it would call torch.nn.modules.container.ParameterDict"):
        load(tmp_path / "ref.pt")
    assert torch.equal(load(tmp_path / "ref.pt", allow=[nn.ParameterDict])["p"]["x"], torch.ones(2))


def test_safetensors_are_views_of_one_mapping(tmp_path):
    tensors = {"a": torch.randn(3, 4), "h": torch.randn(5).half(), "i": torch.arange(7)}
    save_file(tensors, tmp_path / "m.safetensors")
    read = read_safetensors(str(tmp_path / "m.safetensors"))
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)
    assert len({t.untyped_storage().data_ptr() for t in read.values()}) == 1  # nothing copied out of the mapping
    assert all(torch.equal(load(tmp_path / "m.safetensors")[k], v) for k, v in load_file(tmp_path / "m.safetensors").items())
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(WeightsError, match=r"bad.safetensors is corrupt or truncated \(SafetensorError: "):
        load(tmp_path / "bad.safetensors")


def _poisoned(name, value):
    """A file as `name` expects it, whose one float tensor holds `value` at one place."""
    t = torch.randn(2, 3)
    t[1, 2] = value
    if name == "pytorch_adapter.bin":  # the authors' adapter: one flat tensor under its keys
        return {"prefix_tuning.x.control_trans": t.flatten()}
    if name == "embeddings.pt":
        return {"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": t}}
    if name == "last.ckpt":  # Lightning's bookkeeping may hold an infinity of its own: only the trained numbers count
        return {"global_step": 3, "trainable": [t], "callbacks": {"ModelCheckpoint": {"kth_value": torch.tensor(float("inf"))}}}
    return {"state_dict": {"model.diffusion_model.w": t}}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("reader", list(READERS))
def test_every_reader_refuses_non_finite_numbers_naming_the_tensor(reader, value, tmp_path):
    name, read = READERS[reader]
    path = tmp_path / name
    torch.save(_poisoned(name, value), path)
    with pytest.raises(WeightsError) as e:
        read(str(path))
    kind = "NaN" if value != value else "infinite values"
    assert f"{path}: tensor " in str(e.value) and f" holds {kind}; the file is damaged" in str(e.value)
    assert "\n" not in str(e.value)


def test_non_finite_in_safetensors_and_nested_names(tmp_path):
    path = tmp_path / "catversion.safetensors"
    save_file({"control_trans": torch.tensor([0.0, float("inf")])}, str(path))
    with pytest.raises(WeightsError, match=r"tensor control_trans holds infinite values"):
        load(path)
    nested = tmp_path / "n.pt"
    torch.save({"a": [torch.zeros(2), {"b": torch.tensor([float("nan")])}], "ints": torch.arange(3)}, nested)
    with pytest.raises(WeightsError, match=r"tensor a\[1\]\.b holds NaN"):
        load(nested)
    fine = tmp_path / "fine.pt"
    torch.save({"x": torch.zeros(0), "y": torch.randn(4).half(), "z": torch.arange(2)}, fine)
    assert set(load(fine)) == {"x", "y", "z"}


def test_txt2img_refuses_a_non_finite_base_model_in_one_line(tiny_ckpt, tmp_path):
    import subprocess
    import sys

    state = read_tensors(tiny_ckpt)
    key = next(k for k in sorted(state) if k.startswith("model.diffusion_model.") and state[k].is_floating_point())
    state = {k: v.clone() for k, v in state.items()}
    state[key].view(-1)[0] = float("nan")
    bad = tmp_path / "nan.ckpt"
    torch.save({"state_dict": state}, bad)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "scripts/txt2img.py", "--config", TINY_INFERENCE, "--ckpt_path", str(bad),
                           "--outdir", str(out), "--H", "64", "--W", "64", "--ddim_steps", "2"],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: {bad}: tensor state_dict.{key} holds NaN; the file is damaged or was saved from a run " \
                                  "that diverged, use another copy"
    assert not out.exists()


def test_a_resumable_checkpoint_may_hold_lightnings_infinities(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"global_step": 3, "trainable": [torch.zeros(4)], "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(4)}}}],
                "callbacks": {"ModelCheckpoint": {"kth_value": torch.tensor(float("inf"))}}}, path)
    main.check_resumable(str(path))
    torch.save({"global_step": 3, "trainable": [torch.zeros(4)],
                "optimizer_states": [{"state": {0: {"exp_avg": torch.tensor([float("nan")])}}}]}, path)
    with pytest.raises(WeightsError, match=r"cannot resume: .*tensor optimizer_states\[0\]\.state\.0\.exp_avg holds NaN"):
        main.check_resumable(str(path))
