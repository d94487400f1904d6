"""scripts/txt2img.py and run.sh on the tiny model (64x64 images, 2 DDIM steps)."""
import glob
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm.checkpoint import fingerprint
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.util import load_model_from_config
from ldm.cli.txt2img import main as txt2img_main

TINY = "configs/tiny/v1-inference.yaml"
PROMPT = "circle on a green background"
NAME = "circle-on-a-green-background"


@pytest.fixture(scope="module")
def adapter_model(tiny_ckpt, tmp_path_factory):
    """The tiny model with adapter A in memory (never saved and reloaded), and adapters A and B saved to folders."""
    model = load_model_from_config(OmegaConf.load("configs/tiny/v1-finetune.yaml"), tiny_ckpt, verbose=False)
    enc = model.cond_stage_model
    param = enc.adapter_parameters()[0]
    folders = []
    for seed in (1, 2):
        folder = str(tmp_path_factory.mktemp(f"adapter{seed}"))
        with torch.no_grad():
            param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)))
        enc.adapter_save(folder)
        folders.append(folder)
    with torch.no_grad():
        param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))  # back to A
    return model, folders[0], folders[1]


def run(tiny_ckpt, outdir, *args):
    return txt2img_main(["--config", TINY, "--ckpt_path", tiny_ckpt, "--H", "64", "--W", "64", "--ddim_steps", "2",
                         "--outdir", str(outdir), "--uc_dir", str(outdir) + "-uc", "--device", "cpu", *args])


def pixels(path):
    return np.asarray(Image.open(path))


def only_image(results):
    (result,) = results.values()
    (path,) = result["images"]
    return pixels(path)


# --- seeds, files, grid, determinism -------------------------------------------------------------------------------
def test_same_seed_gives_identical_files_and_iterations_use_seed_plus_i(tiny_ckpt, tmp_path):
    first = run(tiny_ckpt, tmp_path / "a", "--prompt", PROMPT, "--seed", "7", "--n_iter", "2")
    second = run(tiny_ckpt, tmp_path / "b", "--prompt", PROMPT, "--seed", "7", "--n_iter", "2")
    folder = tmp_path / "a" / NAME
    assert sorted(os.listdir(folder)) == [f"{NAME}_7.png", f"{NAME}_8.png", "grid.png"]
    for name in os.listdir(folder):
        assert (folder / name).read_bytes() == (tmp_path / "b" / NAME / name).read_bytes()
    assert first[PROMPT]["images"] == [str(folder / f"{NAME}_7.png"), str(folder / f"{NAME}_8.png")]
    img7, img8 = pixels(folder / f"{NAME}_7.png"), pixels(folder / f"{NAME}_8.png")
    assert img7.shape == (64, 64, 3) and not np.array_equal(img7, img8)
    # iteration 2 is exactly a fresh run with seed 8
    alone = run(tiny_ckpt, tmp_path / "c", "--prompt", PROMPT, "--seed", "8")
    assert np.array_equal(only_image(alone), img8)
    # the grid: one row per iteration, 2-pixel black padding (torchvision make_grid)
    grid = pixels(folder / "grid.png")
    assert grid.shape == (2 * 66 + 2, 66 + 2, 3)
    assert np.array_equal(grid[2:66, 2:66], img7) and np.array_equal(grid[68:132, 2:66], img8)
    assert not grid[0:2].any() and not grid[66:68].any()
    assert second[PROMPT]["grid"] == str(tmp_path / "b" / NAME / "grid.png")


def test_cli_equals_the_pipeline_assembled_by_hand(adapter_model, tiny_ckpt, tmp_path):
    """--strength 1 with adapter A from disk == A in memory: its conditioning, the adapter-free empty prompt as uc,
    manual_seed then x_T from the CPU generator, DDIM eta 0, the VAE, and the reference's uint8 cast."""
    model, adapter_a, _ = adapter_model
    enc = model.cond_stage_model
    with torch.no_grad():
        cond = enc([PROMPT])
        with enc.adapter_disabled():
            uc = enc([""])
        torch.manual_seed(857)
        x_T = torch.randn(1, 4, 8, 8)
        z, _ = DDIMSampler(model).sample(2, 1, (4, 8, 8), conditioning=cond, x_T=x_T, eta=0.0,
                                         unconditional_guidance_scale=10.0, unconditional_conditioning=uc, verbose=False)
        x = torch.clamp((model.decode_first_stage(z) + 1.0) / 2.0, min=0.0, max=1.0)
    expected = (255.0 * x[0].permute(1, 2, 0).numpy()).astype(np.uint8)
    got = only_image(run(tiny_ckpt, tmp_path, "--prompt", PROMPT, "--seed", "857", "--embedding_path", adapter_a,
                         "--strength", "1"))
    assert np.array_equal(got, expected)


# --- strength and stacking -----------------------------------------------------------------------------------------
def test_strength_zero_is_the_base_model_and_stacking_adds_a_concept(adapter_model, tiny_ckpt, tmp_path):
    _, adapter_a, adapter_b = adapter_model
    base = only_image(run(tiny_ckpt, tmp_path / "base", "--prompt", PROMPT))

    def image(name, *args):
        return only_image(run(tiny_ckpt, tmp_path / name, "--prompt", PROMPT, *args))

    s0 = image("s0", "--embedding_path", adapter_a, "--strength", "0")
    s1 = image("s1", "--embedding_path", adapter_a)
    half = image("half", "--embedding_path", adapter_a, "--strength", "0.5")
    only_b = image("b", "--embedding_path", adapter_b)
    both = image("ab", "--embedding_path", adapter_a, adapter_b)
    assert np.array_equal(s0, base)
    assert not np.array_equal(s1, base) and not np.array_equal(half, base) and not np.array_equal(half, s1)
    # the middle strength lies between: closer to each end than the two ends are to each other
    d = lambda p, q: np.abs(p.astype(int) - q.astype(int)).mean()  # noqa: E731
    assert d(half, base) < d(s1, base) and d(half, s1) < d(s1, base)
    for single in (s1, only_b, base):
        assert not np.array_equal(both, single)
    # one strength per adapter: B switched off leaves A alone
    a_only = image("a_b0", "--embedding_path", adapter_a, adapter_b, "--strength", "1", "0")
    assert np.array_equal(a_only, s1)


# --- the cached unconditional embedding ----------------------------------------------------------------------------
def test_uc_cache_is_keyed_by_fingerprint_adapter_free_and_reused(adapter_model, tiny_ckpt, tmp_path):
    model, adapter_a, _ = adapter_model
    first = only_image(run(tiny_ckpt, tmp_path / "out", "--prompt", PROMPT, "--embedding_path", adapter_a))
    uc_dir = tmp_path / "out-uc"
    cache = uc_dir / f"{fingerprint(tiny_ckpt)}.safetensors"
    assert os.listdir(uc_dir) == [cache.name]
    cached = load_file(cache)["uc"]
    enc = model.cond_stage_model
    with torch.no_grad():
        with_adapter = enc([""])
        with enc.adapter_disabled():
            plain = enc([""])
    assert cached.shape == (1, 77, 64) and torch.equal(cached, plain) and not torch.allclose(cached, with_adapter)
    # a planted cache is what the next run uses
    save_file({"uc": with_adapter.contiguous()}, str(cache))
    planted = only_image(run(tiny_ckpt, tmp_path / "out", "--prompt", PROMPT, "--embedding_path", adapter_a))
    assert not np.array_equal(planted, first)


# --- sampler, batches, prompt files, long prompts ------------------------------------------------------------------
def test_plms_runs_and_differs_from_ddim(tiny_ckpt, tmp_path):
    ddim = only_image(run(tiny_ckpt, tmp_path / "ddim", "--prompt", PROMPT))
    plms = only_image(run(tiny_ckpt, tmp_path / "plms", "--prompt", PROMPT, "--plms"))
    assert plms.shape == ddim.shape and not np.array_equal(plms, ddim)


def test_prompt_file_and_batches(tiny_ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("circle on a red background\n\n  square: blue?  \n", encoding="utf-8")
    results = run(tiny_ckpt, tmp_path / "out", "--from-file", str(prompts), "--n_samples", "2", "--seed", "3")
    assert sorted(results) == ["circle on a red background", "square: blue?"]
    folder = tmp_path / "out" / "square-blue"
    assert sorted(os.listdir(folder)) == ["grid.png", "square-blue_3_0.png", "square-blue_3_1.png"]
    assert pixels(folder / "grid.png").shape == (66 + 2, 2 * 66 + 2, 3)
    assert not np.array_equal(pixels(folder / "square-blue_3_0.png"), pixels(folder / "square-blue_3_1.png"))


def test_long_prompt_warns_that_it_was_truncated(tiny_ckpt, tmp_path, capsys):
    run(tiny_ckpt, tmp_path, "--prompt", "circle " * 100)
    err = capsys.readouterr().err
    assert "warning: 1 prompt(s) longer than 77 CLIP tokens were truncated" in err


# --- bad input: one line, exit 2, nothing written ------------------------------------------------------------------
BAD = [
    (["--H", "100"], "--H 100 must be a positive multiple of 8"),
    (["--W", "0"], "--W 0 must be a positive multiple of 8"),
    (["--scale", "-1"], "--scale -1.0 must be a finite number >= 0"),
    (["--n_samples", "0"], "--n_samples 0 must be at least 1"),
    (["--n_iter", "0"], "--n_iter 0 must be at least 1"),
    (["--ddim_steps", "0"], "--ddim_steps 0 must be at least 1"),
    (["--ddim_steps", "3"], "--ddim_steps 3: num_steps=3: LDM's stride 333"),
    (["--plms", "--ddim_eta", "0.5"], "--plms is deterministic and takes no --ddim_eta"),
    (["--embedding_path", "{tmp}/nowhere"], "adapter not found: {tmp}/nowhere"),
    (["--embedding_path", "{tmp}"], "holds neither catversion.safetensors nor pytorch_adapter.bin"),
    (["--embedding_path", "{tmp}/nowhere.pt"], "embeddings not found: {tmp}/nowhere.pt; pass the embeddings.pt of a"),
    (["--config", "{tmp}/nope.yaml"], "config not found: {tmp}/nope.yaml; pass --config configs/stable-diffusion/"),
    (["--strength", "0.5"], "--strength needs an adapter to act on"),
    (["--from-file", "{tmp}/missing.txt"], "prompt file not found: {tmp}/missing.txt"),
    (["--from-file", "{tmp}/empty.txt"], "prompt file {tmp}/empty.txt has no prompts"),
    (["--outdir", "{tmp}/file.txt/out"], "{tmp}/file.txt is a file, not a folder"),
    (["--device", "bogus"], "--device 'bogus' is not a torch device"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, message, tiny_ckpt, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "file.txt").write_text("")
    args = [a.format(tmp=tmp_path) for a in args]
    if "--from-file" not in args:
        args += ["--prompt", PROMPT]
    with pytest.raises(SystemExit) as exc:
        run(tiny_ckpt, tmp_path / "out", *args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message.format(tmp=tmp_path) in err
    assert sorted(os.listdir(tmp_path)) == ["empty.txt", "file.txt"]


def test_bad_files_found_after_loading_still_write_nothing(adapter_model, tiny_ckpt, tmp_path, capsys, monkeypatch):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00" * 100)
    broken = tmp_path / "adapter" / "catversion.safetensors"
    broken.parent.mkdir()
    broken.write_bytes(b"\x01" * 100)
    cases = [(["--ckpt_path", str(tmp_path / "missing.ckpt")], "checkpoint not found:"),
             (["--ckpt_path", str(garbage)], str(garbage)),
             (["--embedding_path", str(broken.parent)], f"{broken} is corrupt or truncated ("),
             (["--embedding_path", adapter_model[1], adapter_model[2], "--strength", "1", "1", "1"],
              "3 --strength values for 2 --embedding_path adapters")]
    for args, message in cases:
        with pytest.raises(SystemExit) as exc:
            txt2img_main(["--config", TINY, "--ckpt_path", tiny_ckpt, "--H", "64", "--W", "64", "--ddim_steps", "2",
                          "--outdir", str(tmp_path / "out"), "--uc_dir", str(tmp_path / "uc"), *args])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "out").exists() and not (tmp_path / "uc").exists()
    # an output folder without write permission (os.access is faked: as root every folder is writable)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(SystemExit):
        run(tiny_ckpt, tmp_path / "out", "--prompt", PROMPT)
    assert "is not writable; pass another --outdir" in capsys.readouterr().err


def test_debug_shows_the_exception(tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match="--H 100 must be"):
        run(tiny_ckpt, tmp_path, "--H", "100", "--debug")


def test_bad_input_in_a_real_process_has_no_traceback(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "scripts/txt2img.py", "--ckpt_path", str(tmp_path / "missing.ckpt"),
                           "--outdir", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: checkpoint not found:") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr + proc.stdout and not out.exists()


# --- run.sh --------------------------------------------------------------------------------------------------------
def _run_sh(tmp_path, **env):
    env = {**os.environ, "SD_CKPT": str(tmp_path / "no-sd.ckpt"), "OUTDIR": str(tmp_path / "out"),
           "UC_DIR": str(tmp_path / "uc"), "PYTHON": sys.executable, **env}
    return subprocess.run(["sh", "run.sh"], capture_output=True, text=True, env=env, timeout=600)


def test_run_sh_without_sd_weights_explains_and_samples_the_toy_model(tmp_path):
    from .conftest import TOY_CKPT

    toy = load_model_from_config(OmegaConf.load("configs/toy/v1-finetune.yaml"), TOY_CKPT, verbose=False)
    with torch.no_grad():
        toy.cond_stage_model.adapter_parameters()[0].normal_(generator=torch.Generator().manual_seed(3))
    adapter = str(tmp_path / "adapter")
    toy.cond_stage_model.adapter_save(adapter)
    proc = _run_sh(tmp_path, TOY_STEPS="2", TOY_ADAPTER=adapter)
    assert proc.returncode == 0, proc.stderr
    assert "v1-5-pruned-emaonly" in proc.stdout and "stable-diffusion-v1-5/stable-diffusion-v1-5" in proc.stdout
    assert "models/sd/v1-5.ckpt" in proc.stdout and f"Using the demo's adapter {adapter}" in proc.stdout
    image = tmp_path / "out" / NAME / f"{NAME}_857.png"
    assert pixels(image).shape == (64, 64, 3) and (tmp_path / "out" / NAME / "grid.png").is_file()
    # the same as asking txt2img directly
    direct = txt2img_main(["--config", "configs/toy/v1-inference.yaml", "--ckpt_path", TOY_CKPT, "--H", "64", "--W", "64",
                           "--ddim_steps", "2", "--outdir", str(tmp_path / "direct"), "--uc_dir", str(tmp_path / "uc2"),
                           "--device", "cpu", "--prompt", PROMPT, "--seed", "857", "--embedding_path", adapter])
    assert np.array_equal(only_image(direct), pixels(image))


def test_run_sh_finds_the_adapter_the_demo_just_trained(tmp_path):
    """The demo's run folder is `<data><time>_demo`; run.sh's toy example must pick its adapter up by itself."""
    from ldm.cli.demo import main as demo_main

    logs = tmp_path / "logs"
    demo_main(["--steps", "2", "--n", "2", "--logdir", str(logs), "--data_root", str(tmp_path / "data"),
               "--outdir", str(tmp_path / "demo")])
    adapter = glob.glob(str(logs / "*_demo" / "checkpoints" / "adapter"))
    assert len(adapter) == 1
    proc = _run_sh(tmp_path, TOY_STEPS="2", LOGDIR=str(logs))
    assert proc.returncode == 0, proc.stderr
    assert f"Using the demo's adapter {adapter[0]} (concept word: circle)." in proc.stdout
    # and it was used: the picture is the one txt2img makes with that adapter, not the plain toy model's
    from .conftest import TOY_CKPT

    toy = ["--config", "configs/toy/v1-inference.yaml", "--ckpt_path", TOY_CKPT, "--H", "64", "--W", "64",
           "--ddim_steps", "2", "--uc_dir", str(tmp_path / "uc2"), "--device", "cpu", "--prompt", PROMPT, "--seed", "857"]
    image = pixels(tmp_path / "out" / NAME / f"{NAME}_857.png")
    with_adapter = only_image(txt2img_main(toy + ["--outdir", str(tmp_path / "a"), "--embedding_path", adapter[0]]))
    assert np.array_equal(image, with_adapter)
    assert not np.array_equal(image, only_image(txt2img_main(toy + ["--outdir", str(tmp_path / "b")])))


def test_run_sh_with_sd_weights_but_no_adapters_says_how_to_train_them(tiny_ckpt, tmp_path):
    proc = _run_sh(tmp_path, SD_CKPT=tiny_ckpt, TEAPOT_ADAPTER=str(tmp_path / "t"), TEDDYBEAR_ADAPTER=str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Skipping") == 4 and "--init_word teddybear" in proc.stdout
    assert "COLORFULTEAPOT_ADAPTER=logs/<run folder>/checkpoints/adapter" in proc.stdout
    assert not (tmp_path / "out").exists()


# --- the real model's shape, random weights ------------------------------------------------------------------------
def test_sd_v1_5_shaped_random_model_smoke_512(tmp_path):
    """2 DDIM steps at 512x512, guidance 10, on an SD-v1.5-shaped model with random weights (`--ckpt_path none`), CPU.

    Measured on the 2-core development machine, while other test suites shared it (load average 3-10): peak RSS
    6.3 GB (4.3 GB are the float32 weights, 1.07 G parameters; the VAE decode at 512x512 adds about 0.7 GB), CPU time
    about 100 s (user + system) in every run, wall time 83-230 s depending on that load (model built in 7 s, then per
    UNet step at batch 2 about 25 s of the 2 cores, VAE decode about 16 s). On an idle 2-core machine that CPU time
    means roughly 50-60 s of wall time (estimate, not measured).
    """
    code = ("import resource, runpy, sys; sys.argv = ['txt2img.py'] + sys.argv[1:]; "
            "runpy.run_path('scripts/txt2img.py', run_name='__main__'); "
            "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code, "--ckpt_path", "none", "--ddim_steps", "2", "--device", "cpu",
                           "--outdir", str(tmp_path), "--prompt", "teddybear on the beach"],
                          capture_output=True, text=True, timeout=900)
    wall = time.time() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = tmp_path / "teddybear-on-the-beach"
    image = pixels(folder / "teddybear-on-the-beach_42.png")
    assert image.shape == (512, 512, 3) and np.array_equal(pixels(folder / "grid.png"), image)  # a 1-image grid is the image
    peak_gb = int(proc.stdout.split("MAXRSS_KB")[1].split()[0]) / 1e6
    assert peak_gb < 8.0, f"peak RSS {peak_gb:.1f} GB"  # measured 6.3 GB: weights + one VAE decode at 512x512
    assert wall < 600, f"{wall:.0f} s"


# --- the authors' behaviour, switched on (docs/fidelity.md rows 53, 54, 58) ----------------------------------------
class SamplerSpy:
    """What DDIMSampler.sample received: x_T and the unconditional embedding of each call."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = DDIMSampler.sample

        def spy(sampler, *args, **kwargs):
            self.calls.append({"x_T": kwargs["x_T"].clone(), "uc": kwargs["unconditional_conditioning"].clone()})
            return original(sampler, *args, **kwargs)

        monkeypatch.setattr(DDIMSampler, "sample", spy)


@pytest.mark.parametrize("noise", ["cpu", "device"])
def test_noise_device_draws_x_T_as_chosen(noise, tiny_ckpt, tmp_path, monkeypatch):
    spy = SamplerSpy(monkeypatch)
    run(tiny_ckpt, tmp_path / "out", "--prompt", PROMPT, "--seed", "11", "--n_iter", "2", "--noise_device", noise)
    model_channels = OmegaConf.load(TINY).model.params.channels
    for i, call in enumerate(spy.calls):
        torch.manual_seed(11 + i)  # the authors: torch.manual_seed(seed + i), then randn on the sampling device
        expected = torch.randn((1, model_channels, 8, 8), device=torch.device("cpu"))
        assert torch.equal(call["x_T"], expected)
    assert len(spy.calls) == 2


def test_jpeg_writes_the_authors_file_names(tiny_ckpt, tmp_path):
    results = run(tiny_ckpt, tmp_path / "out", "--prompt", PROMPT, "--seed", "857", "--n_iter", "2", "--jpeg")
    folder = tmp_path / "out" / NAME
    assert sorted(os.listdir(folder)) == sorted([f"{NAME}_857.jpg", f"{NAME}_858.jpg", f"{NAME}.jpg"])
    assert results[PROMPT]["grid"] == str(folder / f"{NAME}.jpg")
    for name in os.listdir(folder):
        with Image.open(folder / name) as im:
            assert im.format == "JPEG"
    # quality 75: the same image saved by PIL at its default quality gives the same bytes
    png = only_image(run(tiny_ckpt, tmp_path / "png", "--prompt", PROMPT, "--seed", "857"))
    again = tmp_path / "again.jpg"
    Image.fromarray(png).save(again, quality=75)
    assert (folder / f"{NAME}_857.jpg").read_bytes() == again.read_bytes()


def test_uc_path_feeds_exactly_that_tensor_to_guidance(tiny_ckpt, tmp_path, monkeypatch):
    width = OmegaConf.load(TINY).model.params.cond_stage_config.params.text_config.hidden_size
    uc = torch.randn(1, 77, width, generator=torch.Generator().manual_seed(5))
    torch.save(uc, tmp_path / "uc.pt")  # as the authors ship theirs: a bare tensor
    spy = SamplerSpy(monkeypatch)
    run(tiny_ckpt, tmp_path / "out", "--prompt", PROMPT, "--uc_path", str(tmp_path / "uc.pt"))
    assert torch.equal(spy.calls[0]["uc"], uc)
    assert not os.path.exists(str(tmp_path / "out") + "-uc")  # nothing computed, nothing cached


@pytest.mark.parametrize("content, found", [
    (lambda w: torch.randn(2, 77, w), "a tensor of shape (2, 77, {w})"),
    (lambda w: torch.randn(1, 77, w + 1), "a tensor of shape (1, 77, {w1})"),
    (lambda w: {"a": torch.zeros(1), "b": torch.zeros(1)}, "2 entries (a, b)"),
])
def test_uc_path_of_the_wrong_shape_is_one_line(content, found, tiny_ckpt, tmp_path, capsys):
    width = OmegaConf.load(TINY).model.params.cond_stage_config.params.text_config.hidden_size
    torch.save(content(width), tmp_path / "uc.pt")
    with pytest.raises(SystemExit) as e:
        run(tiny_ckpt, tmp_path / "out", "--prompt", PROMPT, "--uc_path", str(tmp_path / "uc.pt"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --uc_path {tmp_path / 'uc.pt'} should hold one tensor of shape (1, 77, {width}) (the empty "
                   f"prompt's embedding for this model), found {found.format(w=width, w1=width + 1)}; pass the uc.pt "
                   "that belongs to the base model")
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_authors_preset_is_their_sampler_and_explicit_flags_win(tiny_ckpt, tmp_path, monkeypatch):
    from ldm.cli.txt2img import parse_args

    opt = parse_args(["--authors"])
    assert (opt.seed, opt.n_iter, opt.noise_device, opt.uc_path, opt.jpeg, opt.tf32) == (
        8888, 2, "device", "models/authors/uc.pt", True, True)
    assert os.path.isfile(opt.uc_path)  # their file ships with the project
    opt = parse_args(["--seed", "78", "--authors", "--n_iter", "1", "--noise_device", "cpu"])
    assert (opt.seed, opt.n_iter, opt.noise_device) == (78, 1, "cpu")
    assert (parse_args([]).seed, parse_args([]).jpeg) == (42, False)
    # a whole run: their uc (here one that fits the tiny model), their seeds and file names
    width = OmegaConf.load(TINY).model.params.cond_stage_config.params.text_config.hidden_size
    uc = torch.randn(1, 77, width, generator=torch.Generator().manual_seed(6))
    torch.save(uc, tmp_path / "uc.pt")
    spy = SamplerSpy(monkeypatch)
    # Saved and put back by hand: cuBLAS's flag is no plain attribute, which monkeypatch cannot always restore.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        run(tiny_ckpt, tmp_path / "out", "--prompt", PROMPT, "--authors", "--uc_path", str(tmp_path / "uc.pt"))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert sorted(os.listdir(tmp_path / "out" / NAME)) == [f"{NAME}.jpg", f"{NAME}_8888.jpg", f"{NAME}_8889.jpg"]
    assert len(spy.calls) == 2 and all(torch.equal(c["uc"], uc) for c in spy.calls)


def test_run_sh_with_sd_weights_runs_the_authors_four_examples_with_their_files(tmp_path):
    """run.sh's commands, recorded by a stand-in for python: their prompts, seeds and flags, their adapters and sampler."""
    (tmp_path / "sd.ckpt").write_bytes(b"")
    log = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nprintf "%s|" "$@" >> {log}\necho >> {log}\n')
    fake.chmod(0o755)
    proc = _run_sh(tmp_path, SD_CKPT=str(tmp_path / "sd.ckpt"), PYTHON=str(fake))
    assert proc.returncode == 0, proc.stderr
    calls = [line.rstrip("|").split("|") for line in log.read_text().splitlines()]
    expected = [("colorful_teapot", "colorful_teapot bicycle", "857"), ("colorful_teapot", "colorful_teapot cake", "545"),
                ("teddybear", "teddybear on swimming pool", "231"), ("teddybear", "teddybear on the beach", "78")]
    assert len(calls) == 4
    for args, (concept, prompt, seed) in zip(calls, expected):
        args.remove("--authors")  # every other option takes one value
        flags = dict(zip(args[1::2], args[2::2]))
        assert args[0] == "scripts/txt2img.py"
        assert {k: flags[k] for k in ("--ddim_eta", "--n_samples", "--n_iter", "--scale", "--ddim_steps")} == {
            "--ddim_eta": "0.0", "--n_samples": "1", "--n_iter": "1", "--scale": "10", "--ddim_steps": "50"}
        assert (flags["--prompt"], flags["--seed"], flags["--ckpt_path"]) == (prompt, seed, str(tmp_path / "sd.ckpt"))
        assert flags["--embedding_path"] == f"models/authors/adapters/{concept}"
        assert os.path.isfile(os.path.join(flags["--embedding_path"], "pytorch_adapter.bin"))
    assert all("--authors" in line for line in log.read_text().splitlines())
