"""ldm/config.py: config values checked against their consumers, overrides, trusted targets, hardware requests.

The command lines' answers are in tests/test_reliability.py; here the rules themselves, on simulated machines."""
import argparse
import errno
import os
import re

import pytest
import torch

from ldm import config as cfg
from ldm.files import atomic_write
from ldm.util import one_line_errors

from .conftest import TINY_FINETUNE

TRAINER = {"max_steps": (20, "abc"), "precision": ("16-mixed", 17), "devices": ([0, 1], 1.5),
           "benchmark": (None, "maybe"), "gradient_clip_val": (0.5, [1]), "max_time": ("00:01:00:00", 3),
           "accumulate_grad_batches": (4, 0), "log_every_n_steps": (1, -3), "limit_train_batches": (0.25, -1)}


@pytest.mark.parametrize("key", TRAINER)
def test_trainer_values_are_checked_against_its_annotations_and_our_ranges(key):
    good, bad = TRAINER[key]
    cfg.check_trainer_keys({key: good})
    with pytest.raises(ValueError, match=rf"^config key lightning\.trainer\.{key} = {re.escape(repr(bad))} (has the wrong "
                                         r"type|is out of range); expected "):
        cfg.check_trainer_keys({key: bad})


def _opt(*extra, **kw):
    return argparse.Namespace(base=[TINY_FINETUNE, *extra], data_root=None, init_word=None, **kw)


def test_an_override_may_add_any_trainer_argument_and_it_is_checked():
    config = cfg.load_config(_opt(), ["lightning.trainer.gradient_clip_val=0.5", "lightning.trainer.detect_anomaly=true"])
    assert config.lightning.trainer.gradient_clip_val == 0.5 and config.lightning.trainer.detect_anomaly is True
    with pytest.raises(ValueError, match=r"did you mean lightning\.trainer\.gradient_clip_val\?$"):
        cfg.load_config(_opt(), ["lightning.trainer.gradient_clip=0.5"])
    with pytest.raises(ValueError, match=r"detect_anomaly = 'yes please' has the wrong type; expected true or false$"):
        cfg.load_config(_opt(), ["lightning.trainer.detect_anomaly='yes please'"])


@pytest.mark.parametrize("override, message", [
    ("model.params.cond_stage_config.params.concat_kv.num_tokens=0", "concat_kv.num_tokens = 0 is out of range; expected an integer at least 1"),
    ("model.params.timesteps=1.5", "model.params.timesteps = 1.5 has the wrong type; expected an integer"),
    ("model.params.unet_config.params.num_heads=x", "num_heads = 'x' has the wrong type; expected a number"),  # by its default
    ("data.params.train.params.size=[64]", "size = [64] has the wrong type; expected an integer"),
])
def test_model_and_data_params_are_checked(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cfg.load_config(_opt(), [override])


@pytest.mark.parametrize("target", ["os.system", "subprocess.Popen", "builtins.eval", "torch.hub.load",
                                    "pytorch_lightning.cli.LightningCLI", "ldm.cli.train.main"])
def test_only_trusted_classes_are_built_unless_allowed(target, monkeypatch):
    with pytest.raises(ValueError, match=r"configs are data: if you wrote this one, pass --allow_any_target$"):
        cfg.instantiate_from_config({"target": target})
    monkeypatch.setattr(cfg, "ALLOW_ANY_TARGET", True)
    assert callable(cfg.get_obj_from_str(target))


def test_the_flag_allows_a_config_the_user_wrote(tmp_path):
    extra = tmp_path / "mine.yaml"
    extra.write_text("lightning:\n  callbacks:\n    mine:\n      target: collections.OrderedDict\n")
    with pytest.raises(ValueError, match="lightning.callbacks.mine.target: 'collections.OrderedDict' is not a class"):
        cfg.load_config(_opt(str(extra)), [])
    try:
        assert cfg.load_config(_opt(str(extra), allow_any_target=True), []).lightning.callbacks.mine.target
    finally:
        cfg.ALLOW_ANY_TARGET = False


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)


@pytest.mark.parametrize("gpus, trainer, answer", [
    ("0,", {}, {"accelerator": "gpu", "devices": "0,"}), ("0,1", {}, {"accelerator": "gpu", "devices": "0,1"}),
    ("2", {"gpus": "0,"}, {"accelerator": "gpu", "devices": "2"}),  # the flag wins over the reference's config key
    (None, {"gpus": 1}, {"accelerator": "gpu", "devices": "1"}),
    (None, {"accelerator": "gpu", "devices": 2}, {"accelerator": "gpu", "devices": 2}),
    (None, {"accelerator": "auto"}, {"accelerator": "auto"}), (None, {}, {"accelerator": "cpu"}),
    (None, {"accelerator": "cpu", "devices": 4}, {"accelerator": "cpu", "devices": 4}),
])
def test_hardware_on_a_two_gpu_machine(gpus, trainer, answer, two_gpus):
    assert cfg.hardware(gpus, trainer) == answer  # what run() passes to the Trainer


@pytest.mark.parametrize("gpus, trainer, message", [
    ("2,", {}, "training asks for GPU(s) 2 but this machine has 2 CUDA device(s) (cuda:0..cuda:1); pass GPU ids below 2"),
    ("3", {}, "training asks for GPU(s) 0, 1, 2 but this machine has 2 CUDA device(s)"),
    (None, {"accelerator": "gpu", "devices": [0, 5]}, "training asks for GPU(s) 0, 5 but"),
    (None, {"accelerator": "tpu2"}, "lightning.trainer.accelerator 'tpu2' is unknown; pass one of auto, cpu, cuda, gpu"),
    (None, {"accelerator": "mps"}, "accelerator 'mps': this project trains on cpu or cuda"),
    ("first", {}, "--gpus 'first' is not a GPU count or list of ids"),
    (None, {"accelerator": "cpu", "devices": 5}, "lightning.trainer.devices=5 asks for 5 CPU processes, but this machine "
                                                 "has 4 cores; ask for at most that many"),
    ("0,", {"devices": 2}, "--gpus 0, and lightning.trainer.devices/accelerator both choose the devices; keep one of them"),
])
def test_hardware_requests_that_cannot_be_met(gpus, trainer, message, two_gpus):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        cfg.hardware(gpus, trainer)


def test_gpus_on_a_machine_without_cuda_is_an_error_not_a_silent_cpu_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^training asks for GPU\(s\) 0 but this machine has no CUDA device; drop --gpus"):
        cfg.hardware("0,", {})


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:1"])
def test_devices_the_machine_has(name, two_gpus):
    assert cfg.resolve_device(name) == torch.device(name)


@pytest.mark.parametrize("name, message", [("cuda:2", "--device cuda:2: this machine has 2 CUDA device(s)"),
                                           ("gpu", "--device 'gpu' is not a torch device; pass cpu or cuda (or cuda:N)"),
                                           ("meta", "--device meta: this project runs on cpu or cuda")])
def test_devices_the_machine_lacks(name, message, two_gpus):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        cfg.resolve_device(name)


@pytest.mark.parametrize("failure", [RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
                                     Exception("Error while serializing: I/O error: File too large (os error 27)"),
                                     OSError(errno.EFBIG, "File too large")])
def test_a_failed_write_is_one_oserror_naming_the_file_and_the_fix(failure, tmp_path):
    def write(tmp):
        open(tmp, "wb").write(b"half")
        raise failure

    with pytest.raises(OSError, match=rf"^cannot write {tmp_path / 'x.ckpt'} \(.+\); free disk space"):
        atomic_write(tmp_path / "x.ckpt", write)
    assert list(tmp_path.iterdir()) == []


def test_errors_that_are_not_write_failures_pass_unchanged(tmp_path):
    with pytest.raises(KeyError):
        atomic_write(tmp_path / "x", lambda tmp: {}["missing"])


def test_a_library_s_disk_full_error_names_the_fix(capsys):
    with pytest.raises(SystemExit):
        with one_line_errors():
            raise OSError(errno.ENOSPC, "No space left on device", "/data/last.ckpt")
    assert capsys.readouterr().err == ("error: cannot write /data/last.ckpt (No space left on device); free disk space or "
                                       "raise the file-size limit (ulimit -f), or write elsewhere\n")


@pytest.mark.parametrize("text, message", [
    ("- just\n- a list\n", "is not a mapping of keys to values; start from configs/stable-diffusion/v1-finetune.yaml"),
    ("model:\n  base_learning_rate: ${nowhere.lr}\n", "config: Interpolation key 'nowhere.lr' not found; check the ${...}"),
])
def test_a_config_that_is_no_mapping_or_points_nowhere_is_one_line(text, message, tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text(text)
    with pytest.raises(ValueError) as e:
        cfg.load_config(_opt(str(extra)), [])
    assert message in str(e.value) and "\n" not in str(e.value)
