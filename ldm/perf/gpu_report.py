"""What a user's GPU will do: one command that measures training, sampling, many concepts and loading, and writes
JSON and a markdown table. The sections run in order of importance, each within what is left of a time budget, and
the report is rewritten after each one, so a run cut short still leaves every figure it took.

Weights are random (a network's speed does not depend on its weight values), built from the config's shapes.
"""
import importlib.metadata
import json
import os
import platform
import tempfile
import time
import traceback

import torch
from omegaconf import OmegaConf

from ldm.perf import lightning_run, loading, sampling, training
from ldm.perf.device import synchronize
from ldm.util import atomic_write, instantiate_from_config

SECTIONS = ("training", "fast_options", "diffusers", "profile", "concepts", "sampling", "lightning_run", "loading", "lightning_every_step", "compile")
GOALS = {
    "train_speedup": 3.0,  # fast path / reference-equivalent path, 512x512 batch 2
    "train_peak_mb": 6144,  # peak training memory at batch 2
    "thousand_steps_s": 90,  # a whole 1000-step concept
    "sampling_ratio": 1.05,  # ours / diffusers' pipeline, 50 guided DDIM steps
    "concepts_speedup_8": 3.0,  # concepts per hour, 8 in one run against 8 sequential runs
}


def environment(device):
    env = {"python": platform.python_version(), "platform": platform.platform(), "device": str(device)}
    for name in ("torch", "pytorch-lightning", "transformers", "diffusers", "safetensors", "numpy"):
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1),
                    "compute_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                    "cudnn": torch.backends.cudnn.version(), "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32})
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


class Report:
    """The figures so far, written as JSON and markdown after every section."""

    def __init__(self, out_dir, opt):
        self.out_dir, self.data = out_dir, {"args": vars(opt).copy(), "goals": GOALS}
        os.makedirs(out_dir, exist_ok=True)

    def section(self, name, fn, *args):
        start = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        try:
            self.data[name] = fn(*args)
        except Exception as e:  # a section that fails must not cost the others their figures
            self.data[name] = _error(e)
        self.data.setdefault("section_s", {})[name] = time.perf_counter() - start
        print(f"[{name}] {time.perf_counter() - start:.1f} s: {json.dumps(self.data[name], default=str)[:600]}", flush=True)
        self.write()

    def skip(self, name, why):
        self.data[name] = {"skipped": why}
        print(f"[{name}] skipped: {why}", flush=True)
        self.write()

    def write(self):
        text = json.dumps(self.data, indent=2, default=str)
        atomic_write(os.path.join(self.out_dir, "gpu_report.json"), lambda p: _write(p, text))
        md = markdown(self.data)
        atomic_write(os.path.join(self.out_dir, "gpu_report.md"), lambda p: _write(p, md))


def _error(e):
    """A failed measurement as a report entry (its traceback goes to the log)."""
    traceback.print_exc()
    first = str(e).splitlines()[0] if str(e) else ""
    return {"error": f"{type(e).__name__}: {first}"[:300]}


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


# --- sections ----------------------------------------------------------------------------------------------------
def build_model(config, device, seed=0):
    torch.manual_seed(seed)
    model = instantiate_from_config(config.model)
    model.learning_rate = config.model.base_learning_rate
    return model.to(device).train()


def training_section(model, opt, variants):
    batch = training.make_batch(opt.batch_size, opt.H, opt.W, model.device)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=model.learning_rate)
    out = {}
    for variant in variants:
        warmup = opt.warmup + (2 if variant.compiled else 0)
        try:
            out[variant.name] = training.measure_variant(model, optimizer, batch, variant, opt.steps, warmup)
        except Exception as e:  # e.g. out of memory on a small card: the other variants still count
            out[variant.name] = _error(e)
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"  {variant.name:40s} {json.dumps(out[variant.name], default=str)}", flush=True)
    return out


def fast_options_section(model, opt):
    """Smoke test: a few steps under each fast-path option (compile with --compile) against the fp32 path's losses."""
    rows = training.check_fast_options(model, training.make_batch(opt.batch_size, opt.H, opt.W, model.device),
                                       with_compile=opt.compile)
    return {**rows, "all_ok": all(row["ok"] for row in rows.values())}


def diffusers_section(model, config, opt, bf16):
    """diffusers' UNet holding our UNet's tensors: forward and backward alone, the yardstick for the fast path."""
    training.use_variant(model, training.Variant("weights", training.fast("bf16" if bf16 else "fp32", False)))
    unet = sampling.diffusers_pipeline(model, config).unet  # shares the tensors, in the dtype the fast path holds
    name = f"diffusers UNet alone ({'bf16' if bf16 else 'fp32'})"
    return {name: training.measure_diffusers_unet(unet, model, opt.batch_size, opt.H, opt.W, opt.steps, opt.warmup, bf16)}


def profile_section(model, opt, variant):
    """The kernels that dominate one step of `variant` (torch.profiler, device time where there is a device)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    batch = training.make_batch(opt.batch_size, opt.H, opt.W, model.device)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=model.learning_rate)
    attention = training.use_variant(model, variant)
    cuda = model.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with attention:
        for _ in range(2):
            training.train_step(model, optimizer, batch)
        synchronize(model.device)
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(2):
                training.train_step(model, optimizer, batch)
            synchronize(model.device)
        wall = (time.perf_counter() - start) / 2
    events = prof.key_averages()
    # Device-side entries (kernels, copies) carry the device time; an operator's own "self device time" repeats
    # its kernels', so the GPU's busy time is summed over the device-side entries alone.
    on_device = [e for e in events if cuda and e.device_type != DeviceType.CPU]
    on_host = [e for e in events if e.device_type == DeviceType.CPU]

    def device_us(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    busy = sum(device_us(e) for e in on_device) / 2 / 1e6 if cuda else None
    top_device = sorted(on_device, key=device_us, reverse=True)[:12]
    top_host = sorted(on_host, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {"variant": variant.name, "profiled_step_wall_s": wall, "device_busy_s_per_step": busy,
            "device_busy_fraction": busy / wall if busy is not None and wall else None,
            "host_ops_per_step": sum(e.count for e in on_host) / 2,
            "top_device": [{"name": e.key[:90], "ms_per_step": device_us(e) / 2e3, "calls_per_step": e.count / 2}
                           for e in top_device],
            "top_host": [{"name": e.key[:90], "ms_per_step": e.self_cpu_time_total / 2e3, "calls_per_step": e.count / 2}
                         for e in top_host]}


def concepts_section(model, opt, variant, counts):
    """Concepts per step; a count that does not fit in memory is measured again with gradient checkpointing."""
    training.use_variant(model, variant)
    out = {"variant": variant.name}
    for n in counts:
        try:
            out[str(n)] = training.measure_concepts(model, n, opt.batch_size, opt.H, opt.W, opt.steps, opt.warmup)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            saving = training.Variant(variant.name + " + checkpointing", {**variant.fast, "gradient_checkpointing": True})
            training.use_variant(model, saving)
            out[str(n)] = {**training.measure_concepts(model, n, opt.batch_size, opt.H, opt.W, opt.steps, opt.warmup),
                           "variant": saving.name}
            training.use_variant(model, variant)
    one = out[str(counts[0])]["step_s"] / counts[0]
    for n in counts:
        row = out[str(n)]
        row["concepts_per_hour"] = 3600 / (1000 * row["step_s"] / n)
        row["speedup_vs_sequential"] = one * n / row["step_s"]
    return out


def sampling_section(model, config, opt, batches):
    return {str(n): sampling.measure(model, config, n, opt.H, opt.W, steps=opt.sample_steps) for n in batches}


# --- markdown ------------------------------------------------------------------------------------------------
def _ms(s):
    return f"{1000 * s:.1f}" if isinstance(s, (int, float)) else "-"


def _mb(mb):
    return f"{mb:,.0f}" if isinstance(mb, (int, float)) else "-"


def markdown(data):
    env = data.get("environment", {})
    args = data["args"]
    lines = [f"# GPU report: {env.get('gpu') or env.get('cpu', '?')}", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, Lightning "
             f"{env.get('pytorch-lightning')}, transformers {env.get('transformers')}, diffusers {env.get('diffusers')}, "
             f"Python {env.get('python')}. Config `{args['config']}` with random weights, {args['H']}x{args['W']}, "
             f"batch {args['batch_size']}.", ""]
    train = data.get("training", {})
    if isinstance(train, dict) and "error" not in train and "skipped" not in train:
        for key, rows in data.items():  # the compiled variants, each a section of its own
            if (key.startswith("compile: ") or key == "diffusers") and "error" not in rows and "skipped" not in rows:
                train = {**train, **rows}
        ref = train.get("reference", {}).get("step_s")
        lines += ["## Training step", "",
                  f"Mean of {args['steps']} consecutive steps after {args['warmup']} warm-up steps (compiled variants: "
                  "2 more), one synchronisation at the end; peak = CUDA max allocated during those steps, weights "
                  "included.", "",
                  "| variant | step ms | steps/s | peak MB | vs reference | warm-up s |", "| --- | --- | --- | --- | --- | --- |"]
        for name, row in train.items():
            if "error" in row:
                lines.append(f"| {name} | error: {row['error']} | | | | |")
                continue
            speed = f"{ref / row['step_s']:.2f}x" if ref else "-"
            lines.append(f"| {name} | {_ms(row['step_s'])} | {1 / row['step_s']:.2f} | {_mb(row['peak_mb'])} | {speed} | "
                         f"{row['warmup_s']:.1f} |")
        lines.append("")
    smoke = data.get("fast_options", {})
    if "all_ok" in smoke:
        lines += ["## Fast-path options: a few training steps each against the fp32 path", "",
                  "| option | losses | max relative difference | tolerance | ok |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {name} | {', '.join(f'{x:.4f}' for x in row['losses'])} | {row['max_rel_diff']:.1e} | "
                  f"{row['tolerance']:.0e} | {'yes' if row['ok'] else '**NO**'} |"
                  for name, row in smoke.items() if name != "all_ok"]
        lines.append("")
    prof = data.get("profile", {})
    if prof.get("top_host"):
        busy = prof.get("device_busy_s_per_step")
        lines += [f"## Profile of one step ({prof['variant']})", "",
                  f"Step wall {_ms(prof['profiled_step_wall_s'])} ms under the profiler, "
                  f"{prof['host_ops_per_step']:,.0f} operator calls on the host"
                  + (f"; the device busy {_ms(busy)} ms of it ({100 * prof['device_busy_fraction']:.0f}%)." if busy else "."),
                  ""]
        for key, title in (("top_device", "kernel (device time)"), ("top_host", "host operator (self CPU time)")):
            if prof.get(key):
                lines += [f"| {title} | ms per step | calls per step |", "| --- | --- | --- |"]
                lines += [f"| `{t['name']}` | {t['ms_per_step']:.2f} | {t['calls_per_step']:.0f} |" for t in prof[key]]
                lines.append("")
    run = data.get("lightning_run", {})
    if "step_s" in run:
        lines += ["## A whole concept through `main.py -t`", "",
                  f"{run['steps']} steps of the real loop ({', '.join(run['overrides']) or 'config defaults'}): "
                  f"{_ms(run['step_s'])} ms per step (adapter snapshots every {run['snapshot_every']} steps), fixed cost "
                  f"{run['fixed_s']:.1f} s (start-up, model build, first steps, saving); **1000 steps: "
                  f"{run['projected_1000_steps_s']:.0f} s** projected, without the two sample grids a default run adds.", ""]
        every = data.get("lightning_every_step", {})
        if "step_s" in every:
            lines += [f"The same run reading the loss every step (`log_every_n_steps=1`): {_ms(every['step_s'])} ms per "
                      f"step, 1000 steps {every['projected_1000_steps_s']:.0f} s.", ""]
    samp = data.get("sampling", {})
    if isinstance(samp, dict) and samp and "error" not in samp and "skipped" not in samp:
        lines += ["## Sampling: 50 guided DDIM steps, prompt to decoded image", "",
                  "| batch | ours s | diffusers pipeline s | ours / diffusers | max pixel difference |",
                  "| --- | --- | --- | --- | --- |"]
        for n, row in samp.items():
            lines.append(f"| {n} | {row['ours_s']:.2f} | {row['diffusers_s']:.2f} | {row['ours_over_diffusers']:.3f} | "
                         f"{row['max_abs_pixel_diff']:.1e} |")
        lines.append("")
    conc = data.get("concepts", {})
    if isinstance(conc, dict) and "variant" in conc:
        lines += [f"## Many concepts in one step ({conc['variant']})", "",
                  "| concepts | images per step | step ms | peak MB | concepts per hour (1000 steps) | vs sequential |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for n, row in conc.items():
            if n == "variant":
                continue
            lines.append(f"| {n} | {row['images_per_step']} | {_ms(row['step_s'])} | {_mb(row['peak_mb'])} | "
                         f"{row['concepts_per_hour']:.0f} | {row['speedup_vs_sequential']:.2f}x |")
        lines.append("")
    load = data.get("loading", {})
    if isinstance(load, dict) and load and "error" not in load and "skipped" not in load:
        lines += ["## Loading the base model (fresh process each)", "",
                  "| format | load s | host before MB | host peak MB | (peak - before) / weights | GPU peak MB |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, row in load.items():
            if "error" in row:
                lines.append(f"| {name} | error: {row['error']} | | | | |")
                continue
            lines.append(f"| {name} | {row['load_s']:.1f} | {_mb(row['host_before_mb'])} | {_mb(row['host_peak_mb'])} | "
                         f"{row['host_peak_over_weights']:.2f}x | {_mb(row.get('gpu_peak_mb'))} |")
        lines.append("")
    problems = [f"- {name}: {row.get('error') or row.get('skipped')}" for name, row in data.items()
                if isinstance(row, dict) and ("error" in row or "skipped" in row)]
    if problems:
        lines += ["## Not measured", ""] + problems + [""]
    return "\n".join(lines)


# --- the run -------------------------------------------------------------------------------------------------------
def inference_config_for(config_path):
    candidate = os.path.join(os.path.dirname(config_path), "v1-inference.yaml")
    return candidate if os.path.isfile(candidate) else config_path


def run(opt):
    device = torch.device(opt.device)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("no CUDA device is present; run this on a machine with an NVIDIA GPU, or pass --device cpu "
                         "--config configs/tiny/v1-finetune.yaml for a dry run")
    if opt.H % 64 or opt.W % 64:
        raise ValueError(f"--H {opt.H} --W {opt.W}: use multiples of 64")
    if not os.path.isfile(opt.config):
        raise ValueError(f"config not found: {opt.config}; pass a finetune config such as configs/stable-diffusion/v1-finetune.yaml")
    start = time.perf_counter()

    def left():
        return opt.budget_s - (time.perf_counter() - start)

    sections = set(opt.sections.split(","))
    unknown = sections - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown --sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    report = Report(opt.out_dir, opt)
    report.section("environment", environment, device)

    def section(name, needs_s, fn, *args):
        """Run a chosen section if what is left of the budget covers what it needs; else say it was skipped."""
        if name.split(":")[0] not in sections:
            return
        if left() < needs_s:
            report.skip(name, f"{left():.0f} s of the budget left, it needs about {needs_s:.0f}")
        else:
            report.section(name, fn, *args)

    config = OmegaConf.load(opt.config)
    t0 = time.perf_counter()
    model = build_model(config, device)
    report.data["model_build_s"] = time.perf_counter() - t0
    cuda = device.type == "cuda"
    best = training.Variant("fast bf16" if cuda else "fast fp32", training.fast("bf16" if cuda else "fp32", False))
    section("training", 0, training_section, model, opt, training.standard_variants(with_compile=False))
    section("fast_options", 0, fast_options_section, model, opt)
    section("diffusers", 0, diffusers_section, model, config, opt, best.fast["precision"] == "bf16")
    section("profile", 0, profile_section, model, opt, best)
    section("concepts", 0, concepts_section, model, opt, best, opt.concepts)
    section("sampling", 0, sampling_section, model, config, opt, opt.sample_batches)
    overrides = [f"model.params.fast.precision={best.fast['precision']}", "model.params.fast.gradient_checkpointing=false"]
    with tempfile.TemporaryDirectory(prefix="gpu-report-") as workdir:
        section("lightning_run", opt.lightning_needs_s, lightning_run.run, opt.config, os.path.join(workdir, "run"),
                opt.H, opt.lightning_steps, opt.lightning_every, cuda, overrides)
        section("loading", opt.loading_needs_s, loading.measure_formats, model, config, inference_config_for(opt.config),
                os.path.join(workdir, "formats"), device)
        # The loop's price for reading the loss every step (progress bar, loggers): the same run, logging every step.
        section("lightning_every_step", opt.lightning_needs_s, lightning_run.run, opt.config,
                os.path.join(workdir, "every"), opt.H, opt.lightning_steps, opt.lightning_every, cuda,
                overrides + ["lightning.trainer.log_every_n_steps=1"])
    # Last: each compilation costs minutes, and nothing else waits on it.
    for variant in [v for v in training.standard_variants(with_compile=True) if v.compiled]:
        if opt.compile:
            section("compile: " + variant.name, opt.compile_needs_s, training_section, model, opt, [variant])
        elif "compile" in sections:
            report.skip("compile: " + variant.name, "--no-compile")
    report.data["total_s"] = time.perf_counter() - start
    report.write()
    print(f"Wrote {os.path.join(opt.out_dir, 'gpu_report.json')} and gpu_report.md in {report.data['total_s']:.0f} s")
    return report.data
