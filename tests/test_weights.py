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

from .conftest import TINY_INFERENCE


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
    wanted = "posix.system" if call == "os.system" else "io.open"
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
