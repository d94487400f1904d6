"""Training steps of one model under the options a user can choose. A variant is a set of `model.params.fast`
options plus two switches the reference never had: fused attention (the reference-equivalent path forces PyTorch's
plain "math" attention) and TF32 matrix products."""
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ldm.modules.encoders.concat_kv import ConcatKV
from ldm.perf.device import measure_step


@dataclass
class Variant:
    name: str
    fast: dict
    math_attention: bool = False
    tf32: bool = False


def fast(precision, checkpointing=False, compile=False, channels_last="auto"):
    return {"cache_latents": True, "cache_text": True, "precision": precision, "gradient_checkpointing": checkpointing,
            "channels_last": channels_last, "compile": compile}


def variant(precision, checkpointing=False, compile=False, tf32=False):
    """The fast path with these options, named after them."""
    switches = (("checkpointing", checkpointing), ("TF32", tf32), ("compile", compile))
    name = " + ".join([f"fast {precision}"] + [switch for switch, on in switches if on])
    return Variant(name, fast(precision, checkpointing, compile), tf32=tf32)


# What the reference does: every network every step, fp32, plain attention, nothing cached, nothing recomputed.
REFERENCE = Variant("reference", {**fast("fp32", channels_last=False), "cache_latents": False, "cache_text": False},
                    math_attention=True)
# fp32 before bf16: bf16 leaves the UNet's weights rounded to bf16 (LatentDiffusion._hold_unet_weights); compiled
# variants apart (they cost minutes of compilation).
STANDARD = [REFERENCE, variant("fp32"), variant("fp32", True), variant("fp32", tf32=True), variant("bf16"),
            variant("bf16", True)]
COMPILED = [variant("bf16", compile=True), variant("bf16", True, compile=True)]


def make_batch(batch_size, H, W, device, seed=0):
    """Random images in [-1, 1] as PersonalizedBase yields them (b, H, W, 3), one caption, cache keys."""
    g = torch.Generator().manual_seed(seed)
    return {"image": (torch.rand(batch_size, H, W, 3, generator=g) * 2 - 1).to(device),
            "caption": ["teddybear"] * batch_size, "index": list(range(batch_size)),
            "flip": [i % 2 == 1 for i in range(batch_size)]}


def use_variant(model, variant):
    """Switch `model` (on its device) to `variant`'s options; returns the attention context to train under."""
    model.fast = model.check_fast_options(variant.fast)
    if variant.fast["compile"]:  # a fresh compilation: guards of an earlier one were taken with other module settings
        torch._dynamo.reset()
        object.__setattr__(model, "_compiled_unet", None)
    model.prepare_fast_path()
    torch.backends.cuda.matmul.allow_tf32 = variant.tf32
    return sdpa_kernel(SDPBackend.MATH) if variant.math_attention else nullcontext()


def train_step(model, optimizer, batch):
    optimizer.zero_grad(set_to_none=True)
    loss = model.shared_step(batch)
    loss.backward()
    optimizer.step()
    return loss


def measure_variant(model, optimizer, batch, variant, steps, warmup):
    try:
        with use_variant(model, variant):
            return measure_step(lambda: train_step(model, optimizer, batch), model.device, steps, warmup)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def measure_concepts(model, n, batch_size, H, W, steps, warmup, seed=0):
    """Step time and peak memory of `n` concepts trained in one step (batch_size images each) as a run of `n`
    concept folders trains them: a fresh adapter of `n` concepts shaped as the model's own, each row's concept
    index in the batch (n = 1: the plain path)."""
    enc = model.cond_stage_model
    before = enc.adapters[0]
    model.clear_fast_caches()
    torch.manual_seed(seed)
    enc._attach(ConcatKV(before.width, before.heads, before.layers, before.num_tokens, logit_bias=before.logit_bias,
                         concepts=n), trainable=True, source="benchmark")
    model.concept_names = [f"concept{i}" for i in range(n)] if n > 1 else []
    try:
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
        batch = make_batch(n * batch_size, H, W, model.device, seed=n)
        if n > 1:
            batch["concept"] = [i // batch_size for i in range(n * batch_size)]
        result = measure_step(lambda: train_step(model, optimizer, batch), model.device, steps, warmup)
    finally:
        enc._attach(before, trainable=True, source="benchmark")
        model.concept_names = []
    return {"concepts": n, "images_per_step": n * batch_size, **result}


def check_fast_options(model, batch, steps=3, with_compile=True, seed=0):
    """`steps` AdamW steps from the same adapter and random seeds under the fp32 fast path with nothing else on, then
    each option alone, all "auto" (bf16 on CUDA) and bf16 last (they leave the UNet's weights rounded to bf16): the
    losses must be finite and within the option's tolerance of the fp32 path's (fp32 options change only the order
    of sums; bf16 rounds). Measured on a CPU (tiny model, 3 steps): 2e-7 to 4e-7 for channels-last, 0 for
    checkpointing, 8e-4 to 3e-3 for bf16; not yet on a GPU."""
    base = fast("fp32", channels_last=False)
    options = [("fp32", base, 0.0), ("channels_last", {**base, "channels_last": True}, 1e-4),
               ("gradient_checkpointing", {**base, "gradient_checkpointing": True}, 1e-4)]
    options += [("compile", {**base, "compile": True}, 1e-4)] if with_compile else []
    auto = {**base, "precision": "auto", "gradient_checkpointing": "auto", "channels_last": "auto"}
    options += [("auto", auto, 5e-2), ("bf16", {**base, "precision": "bf16"}, 5e-2)]
    start = [p.detach().clone() for p in model.trainable_parameters()]
    out, reference = {}, None
    for name, fast_options, tolerance in options:
        with torch.no_grad():
            for p, p0 in zip(model.trainable_parameters(), start):
                p.copy_(p0)
        model.clear_fast_caches()
        use_variant(model, Variant(name, fast_options))
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=model.learning_rate)
        losses = []
        for k in range(steps):
            torch.manual_seed(seed + k)
            losses.append(train_step(model, optimizer, batch).item())
        reference = reference or losses
        diff = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
        out[name] = {"losses": losses, "max_rel_diff": diff, "tolerance": tolerance,
                     "ok": all(map(math.isfinite, losses)) and diff <= tolerance}
    return out
