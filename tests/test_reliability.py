"""Reliability through the real command lines (three or more cases of each class in real processes, more in-process): config values checked against what consumes
them, hardware that is not there, config targets that would run a stranger's code, a disk that fills up mid-save
(RLIMIT_FSIZE lowered in the child), and run folders that never collide.

Each refused case ends with exit code 2, one `error: ...` line as the last line of stderr, no traceback, and no
half-written file under a final name (every weights file, image and JSON left in its folder loads whole). The cases
run four at a time, so that the module costs about a minute on two cores rather than four.
"""
import concurrent.futures
import json
import os
import resource
import subprocess
import sys
import threading
import time

import pytest
import torch

import main
from ldm.files import new_folder
from ldm.images import load_rgb
from ldm.weights import load

from .conftest import TINY_FINETUNE, TINY_INFERENCE

TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
EVIL = "lightning:\n  callbacks:\n    evil:\n      target: {target}\n      params: {params}\n"


def train_args(ckpt, data, logdir, *extra):
    return ["main.py", "--base", TINY_FINETUNE, "-t", "--actual_resume", ckpt, "--data_root", data, "--init_word", "circle",
            "-l", str(logdir), "lightning.trainer.max_steps=2", "lightning.callbacks.image_logger.params.batch_frequency=0",
            "data.params.train.params.repeats=1", *extra]


def txt2img_args(t, *extra):
    return ["scripts/txt2img.py", "--ckpt_path", "none", "--config", TINY_INFERENCE, "--H", "64", "--W", "64",
            "--ddim_steps", "2", "--outdir", str(t / "out"), "--prompt", "a circle", *extra]


def evaluate_code(t, weights):
    """scripts/evaluate.py's main in a real process, with a tiny open_clip model registered first."""
    argv = ["--ref_dir", str(t / "ref"), "--gen_dir", str(t / "gen"), "--prompt", "a circle", "--clip_model", "tiny-clip",
            "--clip_weights", str(weights), "--out", str(t / "results" / "scores.json")]
    return ["-c", f"import open_clip; open_clip.add_model_config({str(weights.parent / 'tiny-clip.json')!r}); "
                  f"from ldm.cli.evaluate import main; main({argv!r})"]


def _evil(t, name, target, params):
    path = t / name
    path.write_text(EVIL.format(target=target, params=json.dumps(params)))
    return str(path)


def _finished_run(t, ckpt, data):
    """A 2-step run (checkpoints at steps 1 and 2), trained in this process: the setup of the resume case."""
    main.main(train_args(ckpt, data, t / "logs", "lightning.modelcheckpoint.params.every_n_train_steps=1")[1:])
    (run,) = os.listdir(t / "logs")
    return t / "logs" / run


def cases(t, ckpt, data, clip_weights):
    """{name: (argv after the interpreter, RLIMIT_FSIZE or None, message in the error line)}; `t` is per case."""
    marker = str(t["marker"])
    ckpt, data = str(ckpt), str(data)
    train = lambda name, *extra: train_args(ckpt, data, t[name] / "logs", *extra)  # noqa: E731
    return {
        # values that do not fit what consumes them, in overrides and config files
        "value: batch_size a word": (train("value: batch_size a word", "data.params.batch_size=two"), None,
                                     "config key data.params.batch_size = 'two' has the wrong type; expected an integer"),
        "value: precision in a config file": (
            train("value: precision in a config file") + ["--base", TINY_FINETUNE, _evil_file(t, "value: precision in a config file", "lightning:\n  trainer:\n    precision: 17\n")],
            None, "config key lightning.trainer.precision = 17 has the wrong type; expected 64 or 32 or 16 or"),
        "value: flip_p out of range": (train("value: flip_p out of range", "data.params.train.params.flip_p=2"), None,
                                       "config key data.params.train.params.flip_p = 2 is out of range; expected a number between 0 and 1"),
        "value: learning rate NaN": (train("value: learning rate NaN", "model.base_learning_rate=.nan"), None,
                                     "config key model.base_learning_rate = nan is not a finite number"),
        "value: added trainer key of the wrong type": (
            train("value: added trainer key of the wrong type", "lightning.trainer.gradient_clip_val=high"), None,
            "config key lightning.trainer.gradient_clip_val = 'high' has the wrong type; expected an integer or a number or null"),
        # hardware the machine does not have (true on a GPU machine too: nobody has GPU 99)
        "hardware: --gpus 99,": (train("hardware: --gpus 99,", "--gpus", "99,"), None, "training asks for GPU(s) 99 but this machine has"),
        "hardware: --gpus abc": (train("hardware: --gpus abc", "--gpus", "abc"), None,
                                 "--gpus 'abc' is not a GPU count or list of ids; pass e.g. --gpus 0, or --gpus 0,1"),
        "hardware: unknown accelerator": (train("hardware: unknown accelerator", "lightning.trainer.accelerator=tpu2"), None,
                                          "lightning.trainer.accelerator 'tpu2' is unknown; pass one of"),
        "hardware: txt2img --device cuda:99": (txt2img_args(t["hardware: txt2img --device cuda:99"], "--device", "cuda:99"), None,
                                               "--device cuda:99: this machine has"),
        "hardware: txt2img --device gpu0": (txt2img_args(t["hardware: txt2img --device gpu0"], "--device", "gpu0"), None,
                                            "--device 'gpu0' is not a torch device; pass cpu or cuda (or cuda:N)"),
        # config targets that would run code
        "target: os.system callback": (
            train("target: os.system callback") + ["--base", TINY_FINETUNE, _evil(t["target: os.system callback"], "evil.yaml", "os.system", {"command": f"touch {marker}"})],
            None, "config lightning.callbacks.evil.target: 'os.system' is not a class this project builds from configs"),
        "target: subprocess.run callback": (
            train("target: subprocess.run callback") + ["--base", TINY_FINETUNE, _evil(t["target: subprocess.run callback"], "evil.yaml", "subprocess.run", {"args": ["touch", marker]})],
            None, "'subprocess.run' is not a class this project builds from configs"),
        "target: a function of ours": (
            train("target: a function of ours") + ["--base", TINY_FINETUNE, _evil(t["target: a function of ours"], "evil.yaml", "ldm.util.load_model_from_config", {"config": {}})],
            None, "'ldm.util.load_model_from_config' is a function, not a class; configs may only name classes unless you pass --allow_any_target"),
        "target: --resume of a shared run folder": (["main.py", "-t", "--resume", _evil_run(t["target: --resume of a shared run folder"], marker)], None,
                                                    "'os.system' is not a class this project builds from configs"),
        "target: txt2img --config": (txt2img_args(t["target: txt2img --config"], "--config", _evil_inference(t["target: txt2img --config"], marker)), None,
                                     "'os.system' is not a class this project builds from configs"),
        # the disk fills up during a save
        "disk full: training": (train("disk full: training", "lightning.trainer.max_steps=4",
                                      "lightning.modelcheckpoint.params.every_n_train_steps=2"), 10_000, "File too large"),
        "disk full: resumed training": (["main.py", "-t", "--resume", str(t["finished run"]), "lightning.trainer.max_steps=4"], 10_000,
                                        "File too large"),
        "disk full: txt2img": (txt2img_args(t["disk full: txt2img"]), 500, "File too large"),
        "disk full: evaluate": (evaluate_code(t["disk full: evaluate"], clip_weights), 50, "File too large"),
        "unwritable: txt2img --outdir under a file": (
            txt2img_args(t["unwritable: txt2img --outdir under a file"], "--outdir", str(t["file"]) + "/out"), None,
            "is a file, not a folder; pass another --outdir"),
    }


def _evil_file(t, name, text):
    path = t[name] / "extra.yaml"
    path.write_text(text)
    return str(path)


def _evil_run(t, marker):
    """A run folder as someone might share it: a valid last.ckpt, and a project config with a callback that runs a command."""
    (t / "run" / "checkpoints").mkdir(parents=True)
    (t / "run" / "configs").mkdir()
    torch.save({"global_step": 2, "trainable": {"x": torch.zeros(2)}}, t / "run" / "checkpoints" / "last.ckpt")
    (t / "run" / "configs" / "a-project.yaml").write_text(open(TINY_FINETUNE).read())
    _evil(t / "run" / "configs", "b-lightning.yaml", "os.system", {"command": f"touch {marker}"})
    return str(t / "run")


def _evil_inference(t, marker):
    text = open(TINY_INFERENCE).read().replace("target: ldm.models.autoencoder.AutoencoderKL", "target: os.system", 1)
    path = t / "evil-inference.yaml"
    path.write_text(text)
    return str(path)


class Folders(dict):
    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, name):
        path = self.root / name.replace(" ", "_").replace(":", "").replace(",", "").replace("-", "")
        path.mkdir(parents=True)
        self[name] = path
        return path


def _run(argv, limit, cwd):
    def lower_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600, cwd=cwd,
                          preexec_fn=lower_limit if limit else None)


@pytest.fixture(scope="module")
def results(tiny_ckpt, example_data, tmp_path_factory):
    """{case: (CompletedProcess, or the argv of a case run in-process, its folder, message)}: each case that runs
    as a real process runs once, four at a time."""
    import open_clip
    from PIL import Image

    root = tmp_path_factory.mktemp("reliability")
    t = Folders(root)
    t["marker"] = root / "pwned"
    t["file"] = root / "somefile"
    t["file"].write_text("")
    t["finished run"] = _finished_run(t["setup"], tiny_ckpt, example_data)
    clip = root / "clip"
    clip.mkdir()
    (clip / "tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(clip / "tiny-clip.json")
    torch.save(open_clip.create_model("tiny-clip").state_dict(), clip / "tiny.bin")
    for side in ("ref", "gen"):
        (t["disk full: evaluate"] / side).mkdir()
        Image.new("RGB", (32, 32), (200, 30, 30)).save(t["disk full: evaluate"] / side / "a.png")
    all_cases = cases(t, tiny_ckpt, example_data, clip / "tiny.bin")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = {name: pool.submit(_run, argv, limit, os.getcwd())
                   for name, (argv, limit, _) in all_cases.items() if name not in IN_PROCESS}
    folder = {**{name: t[name] for name in all_cases}, "disk full: resumed training": t["finished run"]}
    return {name: (futures[name].result() if name in futures else argv, folder[name], message)
            for name, (argv, _, message) in all_cases.items()}, t


def _in_process(argv, capsys):
    """The CLI's main(argv) in this process, as a CompletedProcess (much faster than a new interpreter)."""
    from ldm.cli import txt2img

    entry = {"main.py": main.main, "scripts/txt2img.py": txt2img.main}[argv[0]]
    capsys.readouterr()
    try:
        code = entry(argv[1:]) and 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


def _loads_whole(path):
    """Every file a reader of ours takes, under its final name, loads whole (nothing half-written)."""
    name = path.name
    if name.endswith((".ckpt", ".safetensors", ".bin", ".pt")):
        load(path, finite=False)
    elif name.endswith((".png", ".jpg")):
        load_rgb(path)
    elif name.endswith(".json"):
        json.loads(path.read_text())


CASE_NAMES = ["value: batch_size a word", "value: precision in a config file", "value: flip_p out of range",
              "value: learning rate NaN", "value: added trainer key of the wrong type",
              "hardware: --gpus 99,", "hardware: --gpus abc", "hardware: unknown accelerator",
              "hardware: txt2img --device cuda:99", "hardware: txt2img --device gpu0",
              "target: os.system callback", "target: subprocess.run callback", "target: a function of ours",
              "target: --resume of a shared run folder", "target: txt2img --config",
              "disk full: training", "disk full: resumed training", "disk full: txt2img", "disk full: evaluate",
              "unwritable: txt2img --outdir under a file"]


# More inputs of each class, run in this process through the same entry points (the ones above are real processes).
IN_PROCESS = {"value: flip_p out of range", "value: learning rate NaN", "hardware: --gpus abc", "hardware: txt2img --device gpu0",
              "target: subprocess.run callback", "target: a function of ours", "unwritable: txt2img --outdir under a file"}


@pytest.mark.parametrize("case", CASE_NAMES)
def test_refused_in_one_line_with_nothing_half_written(case, results, capsys):
    (ran, t) = results
    proc, folder, message = ran[case]
    if case in IN_PROCESS:
        proc = _in_process(proc, capsys)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-3000:]
    assert sum(line.startswith("error") for line in lines) == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not t["marker"].exists()  # no target ran its command
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp")]
    for path in files:
        _loads_whole(path)


def test_disk_full_during_training_leaves_the_last_complete_adapter(results):
    (ran, t) = results
    (run,) = (t["disk full: training"] / "logs").iterdir()
    assert "cannot write" in ran["disk full: training"][0].stderr
    assert not list(run.rglob("*.ckpt"))  # every checkpoint save failed, none is left half-written
    adapters = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert adapters and all(a.startswith("adapter") for a in adapters)
    for a in adapters:
        assert torch.isfinite(load(run / "checkpoints" / a / "catversion.safetensors")["control_trans"]).all()


def test_disk_full_during_a_resumed_run_keeps_last_ckpt(results):
    (_, t) = results
    last = load(t["finished run"] / "checkpoints" / "last.ckpt", finite=False)
    assert last["global_step"] == 2  # the step-2 checkpoint is whole; the step-4 one was never written


def test_run_folder_taken_in_the_same_second_gets_a_suffix(tiny_ckpt, example_data, tmp_path):
    """Every name the run could take in the next minute exists already: the run makes a new one beside it."""
    now = time.time()
    taken = [tmp_path / "logs" / f"example{time.strftime('%Y-%m-%dT%H-%M-%S', time.localtime(now + s))}_same"
             for s in range(60)]
    for folder in taken:
        folder.mkdir(parents=True)
        (folder / "other-run").write_text("")
    argv = train_args(str(tiny_ckpt), str(example_data), tmp_path / "logs", "-n", "same")
    argv.remove("-t")
    proc = _run(argv, None, os.getcwd())
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("Run folder: ")]
    folder = line[len("Run folder: "):]
    assert folder.endswith("_same_1") and os.path.isdir(os.path.join(folder, "configs"))
    assert all(os.listdir(f) == ["other-run"] for f in taken)


def test_new_folder_never_gives_one_name_twice(tmp_path):
    names, start = [], threading.Barrier(8)

    def claim():
        start.wait()
        names.append(new_folder(str(tmp_path / "run")))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(names) == sorted([str(tmp_path / "run")] + [f"{tmp_path / 'run'}_{i}" for i in range(1, 8)])
