#!/usr/bin/env python
"""Time training and sampling steps of the reference-equivalent path against the fast path, with diffusers' UNet
on the same weights as an outside yardstick.

    python scripts/benchmark.py --config configs/stable-diffusion/v1-finetune.yaml --H 256 --W 256 --steps 3 \\
        --device cpu --out bench.json

The model is built from --config with random weights (a network's speed does not depend on its weight values).
Paths, all on the same model, inputs and seeds, taking turns step by step (order reversed every round, so that a
machine shared with other work slows all of them alike):
  reference  fp32, no caches, math attention (no fused kernels): VAE encode and all text layers every step,
             no gradient checkpointing, contiguous memory, not compiled;
  fast       the config's `model.params.fast` options (--precision / --compile override two of them);
  diffusers  diffusers' UNet2DConditionModel with the converted weights: forward and backward to the text context
             (training), one guided DDIM step with its DDIMScheduler (sampling); the fast path's precision.
A training step is optimizer zero_grad + loss + backward + AdamW step; a sampling step is one DDIM step with
classifier-free guidance (scale 10: one UNet call on 2 x batch). The first round is warm-up (it fills the caches).
Peak memory of a training step after warm-up, for each path in a fresh process (--memory process): CUDA max
allocated, or on a CPU the peak resident set (weights and libraries included).
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from ldm.models.diffusion.ddim import ddim_schedule, ddim_step, ddim_timesteps  # noqa: E402
from ldm.models.diffusion.guidance import guided_eps_fn  # noqa: E402
from ldm.util import HelpFormatter  # noqa: E402
from scripts.make_tiny_model import make_tiny_model  # noqa: E402

PATHS = ("reference", "fast", "diffusers")
REFERENCE_FAST = {"cache_latents": False, "cache_text": False, "precision": "fp32", "gradient_checkpointing": False,
                  "channels_last": False, "compile": False}
GUIDANCE_SCALE = 10.0
CAPTION = "teddybear"


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default="configs/tiny/v1-finetune.yaml",
                   help="finetune config (tiny, or configs/stable-diffusion/v1-finetune.yaml with random weights)")
    p.add_argument("--H", type=int, default=512, help="image height in pixels (a multiple of 64)")
    p.add_argument("--W", type=int, default=512, help="image width in pixels (a multiple of 64)")
    p.add_argument("--batch_size", type=int, default=2, help="images per training step / samples per sampling step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per path (after one warm-up round)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's). On a CPU shared with other work, 1 keeps timings stable: "
                        "a multi-threaded op stalls whenever one of its threads is descheduled")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of each step's random numbers")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "auto"), help="override fast.precision")
    p.add_argument("--compile", action="store_true", help="override fast.compile with true")
    p.add_argument("--no_diffusers", action="store_true", help="skip the diffusers yardstick")
    p.add_argument("--memory", choices=("process", "inline", "none"), default="process",
                   help="peak memory of each path's training step: in a fresh process per path (fair), in this process "
                        "(quick; includes every path's weights), or not at all")
    p.add_argument("--out", default=None, help="write the figures to this JSON file")
    p.add_argument("--measure_memory", choices=PATHS, default=None, help=argparse.SUPPRESS)  # the child processes
    return p


# --- building ---------------------------------------------------------------------------------------------
def load_config(opt):
    if opt.H % 64 or opt.W % 64 or opt.H <= 0 or opt.W <= 0:
        raise ValueError(f"--H {opt.H} --W {opt.W}: use positive multiples of 64 (VAE /8, then three UNet halvings)")
    if opt.steps < 1 or opt.batch_size < 1:
        raise ValueError("--steps and --batch_size must be at least 1")
    if not os.path.isfile(opt.config):
        raise ValueError(f"config not found: {opt.config}; pass a finetune config such as configs/tiny/v1-finetune.yaml")
    config = OmegaConf.load(opt.config)
    if "concat_kv" not in config.model.params.cond_stage_config.get("params", {}):
        raise ValueError(f"{opt.config} trains no CatVersion adapter (no cond_stage_config.params.concat_kv); "
                         "pass a finetune config")
    return config


def fast_options(config, opt):
    fast = OmegaConf.to_container(config.model.params.get("fast", OmegaConf.create()), resolve=True)
    if opt.precision is not None:
        fast["precision"] = opt.precision
    if opt.compile:
        fast["compile"] = True
    return fast


def build_model(config, opt, device):
    # Random weights, with PyTorch's initialisation where SD's starts at zero (a zero layer would hide whole branches).
    model = make_tiny_model(opt.config, seed=opt.seed)  # despite its name: any config, the SD v1.5 one included
    model.learning_rate = config.model.base_learning_rate
    return model.to(device).train(), torch.optim.AdamW(model.trainable_parameters(), lr=model.learning_rate)


def build_diffusers_unet(config, unet, device):
    """diffusers' UNet sharing the weights of ours (their layout, the same tensors: no second copy in memory)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    ckpt = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    dconfig = create_unet_diffusers_config_from_ldm(OmegaConf.to_container(config, resolve=True), ckpt)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**dconfig)
    theirs.load_state_dict(convert_ldm_unet_checkpoint(ckpt, dconfig), strict=True, assign=True)
    return theirs.to(device).eval().requires_grad_(False)


def make_inputs(opt, device):
    g = torch.Generator().manual_seed(opt.seed)
    b = opt.batch_size
    return {
        "image": (torch.rand(b, opt.H, opt.W, 3, generator=g) * 2 - 1).to(device),
        "caption": [CAPTION] * b,
        "index": list(range(b)),
        "flip": [i % 2 == 1 for i in range(b)],
    }


# --- one step of each path --------------------------------------------------------------------------------
class Bench:
    def __init__(self, config, opt, device, paths):
        self.opt, self.device = opt, torch.device(device)
        self.fast = fast_options(config, opt)
        self.model, self.optimizer = build_model(config, opt, device)
        self.model.fast = self.model.check_fast_options(self.fast)
        self.fast_precision = self.model.fast_precision()  # "auto" resolved for this device
        self.batch = make_inputs(opt, device)
        self.theirs = build_diffusers_unet(config, self.model.model.diffusion_model, device) if "diffusers" in paths else None
        if set(paths) == {"diffusers"}:  # memory process: only diffusers' UNet stays resident
            self.model.first_stage_model = self.model.cond_stage_model = None
        shape = (opt.batch_size, self.model.channels, opt.H // 8, opt.W // 8)
        self.x_T = torch.randn(shape, generator=torch.Generator().manual_seed(opt.seed + 1)).to(self.device)
        self.t_sample = 981  # the first of 50 DDIM steps; the cost of a step does not depend on it
        self.active = None
        if "diffusers" in paths:
            self._setup_diffusers_sampling()
        if {"reference", "fast"} & set(paths):
            self._setup_sampling()

    def _setup_sampling(self):
        model = self.model
        with torch.no_grad():
            with model.cond_stage_model.adapter_disabled():
                self.uc = model.get_learned_conditioning([""] * self.opt.batch_size)
            self.c = model.get_learned_conditioning(self.batch["caption"])
        timesteps = ddim_timesteps(50, model.num_timesteps)
        alphas, alphas_prev, _ = ddim_schedule(model.alphas_cumprod, timesteps)
        i = int((timesteps == self.t_sample).nonzero())
        self.a_t, self.a_prev = alphas[i].item(), alphas_prev[i].item()

    def _setup_diffusers_sampling(self):
        from diffusers import DDIMScheduler

        # The LDM schedule in diffusers' spelling (as tests/test_ddim.py checks).
        self.scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        self.scheduler.set_timesteps(50)
        g = torch.Generator().manual_seed(self.opt.seed + 2)
        width = self.theirs.config.cross_attention_dim
        self.d_context = torch.randn(2 * self.opt.batch_size, 77, width, generator=g).to(self.device)

    def use(self, path):
        """Switch the model's options to `path` (outside the timed region: it may change memory formats)."""
        if path != self.active and path in ("reference", "fast"):
            self.model.fast = self.model.check_fast_options(REFERENCE_FAST if path == "reference" else self.fast)
            self.model.prepare_fast_path()
        self.active = path

    def attention(self, path):
        return sdpa_kernel(SDPBackend.MATH) if path == "reference" else nullcontext()

    def autocast(self):
        """diffusers runs in the fast path's precision."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.fast_precision == "bf16")

    def train_step(self, path, seed):
        torch.manual_seed(seed)
        if path == "diffusers":
            b = self.opt.batch_size
            x_noisy, noise = torch.randn(self.x_T.shape, device=self.device), torch.randn(self.x_T.shape, device=self.device)
            t = torch.randint(0, 1000, (b,), device=self.device)
            context = self.d_context[:b].clone().requires_grad_(True)
            with self.autocast():
                eps = self.theirs(x_noisy, t, encoder_hidden_states=context).sample
            F.mse_loss(eps.float(), noise).backward()
            return
        self.optimizer.zero_grad(set_to_none=True)
        with self.attention(path):
            loss = self.model.shared_step(self.batch)
            loss.backward()
        self.optimizer.step()

    def sample_step(self, path):
        with torch.no_grad():
            if path == "diffusers":
                t = self.scheduler.timesteps[0]
                with self.autocast():
                    eps = self.theirs(torch.cat([self.x_T, self.x_T]), t, encoder_hidden_states=self.d_context).sample
                eps_uncond, eps_cond = eps.float().chunk(2)
                eps = eps_uncond + GUIDANCE_SCALE * (eps_cond - eps_uncond)
                return self.scheduler.step(eps, t, self.x_T).prev_sample
            t = torch.full((self.opt.batch_size,), self.t_sample, device=self.device, dtype=torch.long)
            with self.attention(path):
                eps = guided_eps_fn(self.model, self.c, self.uc, GUIDANCE_SCALE)(self.x_T, t)
            return ddim_step(self.x_T, eps, self.a_t, self.a_prev)[0]

    def timed(self, fn, *args):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


# --- memory -------------------------------------------------------------------------------------------------
def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: "5" resets the peak resident set size to the current one
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_memory(config, opt, device, path):
    """Peak memory of a training step of `path` in this (fresh) process, after a warm-up step."""
    bench = Bench(config, opt, device, [path])
    bench.use(path)
    bench.train_step(path, opt.seed)  # warm-up; fills the fast path's caches
    reset_peak(bench.device)
    bench.train_step(path, opt.seed + 1)
    return peak_mb(bench.device)


def memory_in_fresh_process(opt, path):
    argv = [sys.executable, os.path.abspath(__file__), "--measure_memory", path, "--config", opt.config,
            "--H", str(opt.H), "--W", str(opt.W), "--batch_size", str(opt.batch_size), "--device", opt.device,
            "--seed", str(opt.seed)]
    if opt.threads is not None:
        argv += ["--threads", str(opt.threads)]
    if opt.precision:
        argv += ["--precision", opt.precision]
    if opt.compile:
        argv.append("--compile")
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"memory measurement of the {path} path failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mem_mb"]


# --- the run ----------------------------------------------------------------------------------------------
def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"{name}, {os.cpu_count()} cores, {threads} thread{'s' if threads > 1 else ''}"


def run(opt):
    config = load_config(opt)
    opt.device = opt.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if opt.threads is not None:
        torch.set_num_threads(opt.threads)
    if opt.measure_memory:
        print(json.dumps({"peak_mem_mb": measure_memory(config, opt, opt.device, opt.measure_memory)}))
        return None
    paths = [p for p in PATHS if not (p == "diffusers" and opt.no_diffusers)]
    bench = Bench(config, opt, opt.device, paths)
    times = {(p, kind): [] for p in paths for kind in ("train", "sample")}
    peaks = {}
    for round_ in range(opt.steps + 1):  # round 0 is warm-up
        for path in paths if round_ % 2 == 0 else paths[::-1]:
            bench.use(path)
            inline = opt.memory == "inline" and reset_peak(bench.device)
            train_s = bench.timed(bench.train_step, path, opt.seed + round_)
            if inline:
                peaks[path] = max(peaks.get(path, 0.0), peak_mb(bench.device))
            sample_s = bench.timed(bench.sample_step, path)
            if round_:
                times[(path, "train")].append(train_s)
                times[(path, "sample")].append(sample_s)
            print(f"round {round_}{' (warm-up)' if not round_ else ''} {path:9s} train {train_s:8.3f} s  "
                  f"sample {sample_s:8.3f} s", flush=True)
    del bench
    result = {
        "device": device_name(torch.device(opt.device)), "config": opt.config, "H": opt.H, "W": opt.W,
        "batch_size": opt.batch_size, "steps": opt.steps, "torch": torch.__version__,
        "fast_options": fast_options(load_config(opt), opt),
    }
    for (path, kind), values in times.items():
        result[f"{path}_{kind}_step_s"] = statistics.median(values)
        result[f"{path}_{kind}_step_all_s"] = values
    result["train_speedup"] = result["reference_train_step_s"] / result["fast_train_step_s"]
    result["sample_speedup"] = result["reference_sample_step_s"] / result["fast_sample_step_s"]
    if "diffusers" in paths:
        result["fast_over_diffusers_train"] = result["fast_train_step_s"] / result["diffusers_train_step_s"]
        result["fast_over_diffusers_sample"] = result["fast_sample_step_s"] / result["diffusers_sample_step_s"]
    for path in paths:
        if opt.memory == "process":
            peaks[path] = memory_in_fresh_process(opt, path)
        if path in peaks:
            result[f"{path}_peak_mem_mb"] = peaks[path]
    result["memory"] = opt.memory
    report(result, paths)
    if opt.out:
        os.makedirs(os.path.dirname(os.path.abspath(opt.out)), exist_ok=True)
        with open(opt.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def report(result, paths):
    print(f"\n{result['device']} | {result['config']} | {result['H']}x{result['W']} | batch {result['batch_size']} | "
          f"median of {result['steps']} steps")
    print(f"{'path':10s} {'train step s':>13s} {'sample step s':>14s} {'peak MB':>9s}")
    for path in paths:
        mem = result.get(f"{path}_peak_mem_mb")
        print(f"{path:10s} {result[f'{path}_train_step_s']:13.3f} {result[f'{path}_sample_step_s']:14.3f} "
              f"{'-' if mem is None else f'{mem:9.0f}':>9s}")
    print(f"train speedup (reference / fast): {result['train_speedup']:.2f}x; "
          f"sample speedup: {result['sample_speedup']:.2f}x")
    if "diffusers" in paths:
        print(f"fast / diffusers: train {result['fast_over_diffusers_train']:.2f}x, "
              f"sample {result['fast_over_diffusers_sample']:.2f}x (below 1: faster than diffusers)")


def main(argv=None):
    opt = get_parser().parse_args(argv)
    try:
        return run(opt)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
