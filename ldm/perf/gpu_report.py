"""The GPU report's sections and its markdown: they run in order of importance, each within what is left of a time
budget, and the report is rewritten after each one, so a run cut short still leaves every figure it took. Weights
are random (a network's speed does not depend on their values), built from the config's shapes."""
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
from ldm.perf.device import measure_step, timed
from ldm.report import markdown_table, write_files
from ldm.util import instantiate_from_config

SECTIONS = ("training", "fast_options", "diffusers", "profile", "concepts", "sampling", "lightning_run", "loading",
            "lightning_every_step", "compile")
# Seconds of the budget a section needs, or it is skipped: a whole main.py run, each format loaded, one compilation.
NEEDS_S = {"lightning_run": 120, "lightning_every_step": 120, "loading": 90, "compile": 150}
# Training: fast / reference step time and peak MB at 512x512 batch 2, seconds of a 1000-step concept; sampling:
# ours / diffusers' pipeline; concepts per hour of 8 in one run against 8 sequential runs.
GOALS = {"train_speedup": 3.0, "train_peak_mb": 6144, "thousand_steps_s": 90, "sampling_ratio": 1.05,
         "concepts_speedup_8": 3.0}


def environment(device):
    installed = {d.metadata["Name"].lower(): d.version for d in importlib.metadata.distributions()}
    env = {"python": platform.python_version(), "platform": platform.platform(), "device": str(device),
           **{name: installed.get(name) for name in ("torch", "pytorch-lightning", "transformers", "diffusers",
                                                     "safetensors", "numpy")}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1),
                    "compute_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                    "cudnn": torch.backends.cudnn.version(), "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32})
    else:
        env.update({"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()})
    return env


def _error(e):
    """A failed measurement as a report entry (its traceback goes to the log)."""
    traceback.print_exc()
    return {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]}


# --- sections ----------------------------------------------------------------------------------------------------
def training_section(model, opt, variants):
    batch = training.make_batch(opt.batch_size, opt.H, opt.W, model.device)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=model.learning_rate)
    out = {}
    for variant in variants:
        warmup = opt.warmup + (2 if variant.fast["compile"] else 0)
        try:
            out[variant.name] = training.measure_variant(model, optimizer, batch, variant, opt.steps, warmup)
        except Exception as e:  # e.g. out of memory on a small card: the other variants still count
            out[variant.name] = _error(e)
            torch.cuda.empty_cache()
        print(f"  {variant.name:40s} {json.dumps(out[variant.name], default=str)}", flush=True)
    return out


def fast_options_section(model, opt):
    """Smoke test: a few steps under each fast-path option (compile with --compile) against the fp32 path's losses."""
    rows = training.check_fast_options(model, training.make_batch(opt.batch_size, opt.H, opt.W, model.device),
                                       with_compile=opt.compile)
    return {**rows, "all_ok": all(row["ok"] for row in rows.values())}


def diffusers_section(model, config, opt, precision):
    """diffusers' UNet holding our UNet's tensors, the yardstick for the fast path: forward and backward to the text
    context (what reaches the adapter) on noise shaped as our step's latents; no VAE, text layers, loss bookkeeping
    or optimizer."""
    training.use_variant(model, training.variant(precision))
    unet = sampling.diffusers_pipeline(model, config).unet  # shares the tensors, in the dtype the fast path holds
    g, device = torch.Generator().manual_seed(0), model.device
    shape = (opt.batch_size, model.channels, opt.H // 8, opt.W // 8)
    x, noise = torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device)
    t = torch.randint(0, model.num_timesteps, (opt.batch_size,), generator=g).to(device)
    context = torch.randn(opt.batch_size, 77, unet.config.cross_attention_dim, generator=g).to(device)

    def step():
        ctx = context.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            eps = unet(x, t, encoder_hidden_states=ctx).sample
        torch.nn.functional.mse_loss(eps.float(), noise).backward()

    return {f"diffusers UNet alone ({precision})": measure_step(step, device, opt.steps, opt.warmup)}


def profile_section(model, opt, variant):
    """The kernels that dominate one step of `variant` (torch.profiler, device time where there is a device)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    batch = training.make_batch(opt.batch_size, opt.H, opt.W, model.device)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=model.learning_rate)
    cuda = model.device.type == "cuda"

    def two_steps():
        training.train_step(model, optimizer, batch)
        training.train_step(model, optimizer, batch)

    with training.use_variant(model, variant):
        timed(two_steps, 1, model.device)  # warm-up
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            wall = timed(two_steps, 1, model.device) / 2
    # Device-side entries (kernels, copies) carry the device time; an operator's own "self device time" repeats
    # its kernels', so the GPU's busy time is summed over the device-side entries alone.
    events = prof.key_averages()
    on_device = [e for e in events if cuda and e.device_type != DeviceType.CPU]
    on_host = [e for e in events if e.device_type == DeviceType.CPU]
    busy = sum(e.self_device_time_total for e in on_device) / 2 / 1e6 if cuda else None

    def top(events, us):
        return [{"name": e.key[:90], "ms_per_step": us(e) / 2e3, "calls_per_step": e.count / 2}
                for e in sorted(events, key=us, reverse=True)[:12]]

    return {"variant": variant.name, "profiled_step_wall_s": wall, "device_busy_s_per_step": busy,
            "device_busy_fraction": busy / wall if busy is not None and wall else None,
            "host_ops_per_step": sum(e.count for e in on_host) / 2,
            "top_device": top(on_device, lambda e: e.self_device_time_total),
            "top_host": top(on_host, lambda e: e.self_cpu_time_total)}


def concepts_section(model, opt, precision, counts):
    """Concepts per step; a count that does not fit in memory is measured again with gradient checkpointing."""
    best = training.variant(precision)
    out = {"variant": best.name}
    for n in counts:
        try:
            training.use_variant(model, best)
            out[str(n)] = training.measure_concepts(model, n, opt.batch_size, opt.H, opt.W, opt.steps, opt.warmup)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            saving = training.variant(precision, checkpointing=True)
            training.use_variant(model, saving)
            out[str(n)] = {**training.measure_concepts(model, n, opt.batch_size, opt.H, opt.W, opt.steps, opt.warmup),
                           "variant": saving.name}
    one = out[str(counts[0])]["step_s"] / counts[0]
    for n in counts:
        row = out[str(n)]
        row.update(concepts_per_hour=3600 / (1000 * row["step_s"] / n), speedup_vs_sequential=one * n / row["step_s"])
    return out


def lightning_section(opt, workdir, gpu, overrides):
    run = lightning_run.run(opt.config, workdir, opt.lightning_steps, opt.lightning_every, opt.H,
                            gpus="0," if gpu else None, overrides=overrides)
    return {**run, "overrides": overrides, "projected_1000_steps_s": run["fixed_s"] + 1000 * run["step_s"]}


# --- markdown ------------------------------------------------------------------------------------------------
def _ms(s):
    return f"{1000 * s:.1f}" if isinstance(s, (int, float)) else "-"


def _mb(mb):
    return f"{mb:,.0f}" if isinstance(mb, (int, float)) else "-"


def _measured(section):
    return isinstance(section, dict) and bool(section) and "error" not in section and "skipped" not in section


def markdown(data):
    env, args = data.get("environment", {}), data["args"]
    lines = [f"# GPU report: {env.get('gpu') or env.get('cpu', '?')}", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, Lightning "
             f"{env.get('pytorch-lightning')}, transformers {env.get('transformers')}, diffusers "
             f"{env.get('diffusers')}, Python {env.get('python')}. Config `{args['config']}` with random weights, "
             f"{args['H']}x{args['W']}, batch {args['batch_size']}.", ""]
    train = data.get("training")
    if _measured(train):
        for key, rows in data.items():  # diffusers' UNet and the compiled variants, each a section of its own
            if (key.startswith("compile: ") or key == "diffusers") and _measured(rows):
                train = {**train, **rows}
        ref = train.get("reference", {}).get("step_s")
        lines += ["## Training step", "",
                  f"Mean of {args['steps']} consecutive steps after {args['warmup']} warm-up steps (compiled variants: "
                  "2 more), one synchronisation at the end; peak = CUDA max allocated during those steps, weights "
                  "included.", "",
                  markdown_table(["variant", "step ms", "steps/s", "peak MB", "vs reference", "warm-up s"], [
                      [name, f"error: {row['error']}", "", "", "", ""] if "error" in row else
                      [name, _ms(row["step_s"]), f"{1 / row['step_s']:.2f}", _mb(row["peak_mb"]),
                       f"{ref / row['step_s']:.2f}x" if ref else "-", f"{row['warmup_s']:.1f}"]
                      for name, row in train.items()])]
    smoke = data.get("fast_options", {})
    if "all_ok" in smoke:
        lines += ["## Fast-path options: a few training steps each against the fp32 path", "",
                  markdown_table(["option", "losses", "max relative difference", "tolerance", "ok"], [
                      [name, ", ".join(f"{x:.4f}" for x in row["losses"]), f"{row['max_rel_diff']:.1e}",
                       f"{row['tolerance']:.0e}", "yes" if row["ok"] else "**NO**"]
                      for name, row in smoke.items() if name != "all_ok"])]
    prof = data.get("profile", {})
    if prof.get("top_host"):
        busy = prof["device_busy_s_per_step"]
        lines += [f"## Profile of one step ({prof['variant']})", "",
                  f"Step wall {_ms(prof['profiled_step_wall_s'])} ms under the profiler, "
                  f"{prof['host_ops_per_step']:,.0f} operator calls on the host" + (
                      f"; the device busy {_ms(busy)} ms of it ({100 * prof['device_busy_fraction']:.0f}%)." if busy
                      else "."), ""]
        lines += [markdown_table([title, "ms per step", "calls per step"], [
            [f"`{t['name']}`", f"{t['ms_per_step']:.2f}", f"{t['calls_per_step']:.0f}"] for t in prof[key]])
            for key, title in (("top_device", "kernel (device time)"), ("top_host", "host operator (self CPU time)"))
            if prof[key]]
    run, every = data.get("lightning_run", {}), data.get("lightning_every_step", {})
    if "step_s" in run:
        lines += ["## A whole concept through `main.py -t`", "",
                  f"{run['steps']} steps of the real loop ({', '.join(run['overrides']) or 'config defaults'}): "
                  f"{_ms(run['step_s'])} ms per step (adapter snapshots every {run['snapshot_every']} steps), fixed "
                  f"cost {run['fixed_s']:.1f} s (start-up, model build, first steps, saving); **1000 steps: "
                  f"{run['projected_1000_steps_s']:.0f} s** projected, without the two sample grids a default run "
                  "adds.", ""]
        if "step_s" in every:
            lines += [f"The same run reading the loss every step (`log_every_n_steps=1`): {_ms(every['step_s'])} ms "
                      f"per step, 1000 steps {every['projected_1000_steps_s']:.0f} s.", ""]
    if _measured(data.get("sampling")):
        lines += ["## Sampling: 50 guided DDIM steps, prompt to decoded image", "",
                  markdown_table(["batch", "ours s", "diffusers pipeline s", "ours / diffusers",
                                  "max pixel difference"], [
                      [n, f"{row['ours_s']:.2f}", f"{row['diffusers_s']:.2f}", f"{row['ours_over_diffusers']:.3f}",
                       f"{row['max_abs_pixel_diff']:.1e}"] for n, row in data["sampling"].items()])]
    conc = data.get("concepts", {})
    if "variant" in conc:
        lines += [f"## Many concepts in one step ({conc['variant']})", "",
                  markdown_table(["concepts", "images per step", "step ms", "peak MB", "concepts per hour (1000 steps)",
                                  "vs sequential"], [
                      [n, row["images_per_step"], _ms(row["step_s"]), _mb(row["peak_mb"]),
                       f"{row['concepts_per_hour']:.0f}", f"{row['speedup_vs_sequential']:.2f}x"]
                      for n, row in conc.items() if n != "variant"])]
    if _measured(data.get("loading")):
        lines += ["## Loading the base model (fresh process each)", "",
                  markdown_table(["format", "load s", "host before MB", "host peak MB", "(peak - before) / weights",
                                  "GPU peak MB"], [
                      [name, f"error: {row['error']}", "", "", "", ""] if "error" in row else
                      [name, f"{row['load_s']:.1f}", _mb(row["host_before_mb"]), _mb(row["host_peak_mb"]),
                       f"{row['host_peak_over_weights']:.2f}x", _mb(row.get("gpu_peak_mb"))]
                      for name, row in data["loading"].items()])]
    problems = [f"- {name}: {row.get('error') or row.get('skipped')}" for name, row in data.items()
                if isinstance(row, dict) and ("error" in row or "skipped" in row)]
    return "\n".join(lines + (["## Not measured", ""] + problems + [""] if problems else []))


# --- the run -------------------------------------------------------------------------------------------------------
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
        raise ValueError(f"config not found: {opt.config}; pass a finetune config such as "
                         "configs/stable-diffusion/v1-finetune.yaml")
    sections = set(opt.sections.split(","))
    unknown = sections - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown --sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    start = time.perf_counter()
    data = {"args": vars(opt).copy(), "goals": GOALS, "environment": environment(device)}

    def write():
        write_files({os.path.join(opt.out_dir, "gpu_report.json"): json.dumps(data, indent=2, default=str) + "\n",
                     os.path.join(opt.out_dir, "gpu_report.md"): markdown(data) + "\n"})

    def section(name, fn, *args):
        """Run a chosen section if what is left of the budget covers what it needs; else say why it did not run."""
        kind, left = name.split(":")[0], opt.budget_s - (time.perf_counter() - start)
        if kind not in sections:
            return
        if kind == "compile" and not opt.compile:
            data[name] = {"skipped": "--no-compile"}
        elif left < NEEDS_S.get(kind, 0):
            data[name] = {"skipped": f"{left:.0f} s of the budget left, it needs about {NEEDS_S[kind]:.0f}"}
        else:
            print(f"[{name}] ...", flush=True)
            t0 = time.perf_counter()
            try:
                data[name] = fn(*args)
            except Exception as e:  # a section that fails must not cost the others their figures
                data[name] = _error(e)
            data.setdefault("section_s", {})[name] = time.perf_counter() - t0
        print(f"[{name}] {json.dumps(data[name], default=str)[:600]}", flush=True)
        write()

    write()
    config = OmegaConf.load(opt.config)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = instantiate_from_config(config.model)
    model.learning_rate = config.model.base_learning_rate
    model = model.to(device).train()
    data["model_build_s"] = time.perf_counter() - t0
    precision = "bf16" if device.type == "cuda" else "fp32"  # the fast path's best
    section("training", training_section, model, opt, training.STANDARD)
    section("fast_options", fast_options_section, model, opt)
    section("diffusers", diffusers_section, model, config, opt, precision)
    section("profile", profile_section, model, opt, training.variant(precision))
    section("concepts", concepts_section, model, opt, precision, opt.concepts)
    section("sampling", lambda: {str(n): sampling.measure(model, config, n, opt.H, opt.W, steps=opt.sample_steps)
                                 for n in opt.sample_batches})
    overrides = [f"model.params.fast.precision={precision}", "model.params.fast.gradient_checkpointing=false"]
    with tempfile.TemporaryDirectory(prefix="gpu-report-") as workdir:
        section("lightning_run", lightning_section, opt, os.path.join(workdir, "run"), device.type == "cuda", overrides)
        inference = os.path.join(os.path.dirname(opt.config), "v1-inference.yaml")
        section("loading", loading.measure_formats, model, config,
                inference if os.path.isfile(inference) else opt.config, os.path.join(workdir, "formats"), device)
        # The loop's price for reading the loss every step (progress bar, loggers): the same run, logging every step.
        section("lightning_every_step", lightning_section, opt, os.path.join(workdir, "every"), device.type == "cuda",
                overrides + ["lightning.trainer.log_every_n_steps=1"])
    for variant in training.COMPILED:  # last: each compilation costs minutes, and nothing else waits on it
        section("compile: " + variant.name, training_section, model, opt, [variant])
    data["total_s"] = time.perf_counter() - start
    write()
    print(f"Wrote {os.path.join(opt.out_dir, 'gpu_report.json')} and gpu_report.md in {data['total_s']:.0f} s")
    return data
