"""DDIM sampling (Song et al., arXiv 2010.02502) exactly as CompVis/LDM's DDIMSampler does it.

The sampler is a few plain functions over tensors: they take `eps_fn(x, t_batch) -> eps` and the
model's `alphas_cumprod`, so they can be tested against diffusers with any epsilon function.
`DDIMSampler` is a thin wrapper with LDM's `sample()` signature so LDM-style scripts keep working.
"""
import math

import torch
from tqdm import tqdm

from ldm.models.diffusion.guidance import guided_eps_fn


def ddim_timesteps(num_steps, num_train_timesteps=1000):
    """LDM's "uniform" DDIM timesteps, ascending: `range(0, T, T // num_steps) + 1`.

    Why +1: a step from timestep t goes to the noise level of the next lower selected timestep, and
    the lowest one goes to `alphas_cumprod[0]`. Unshifted, the lowest timestep would be 0 itself and
    the last step a wasted model call (from level 0 to level 0); shifted, the last step runs from t=1
    to level 0 and the first starts at 981 (50 steps), closer to pure noise. diffusers reproduces
    this with `steps_offset=1`. As in LDM, a `num_steps` that does not divide T yields more steps
    (30 -> 31: stride 33 fits 31 times below 1000) where diffusers' "leading" spacing keeps 30.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} must be between 1 and {num_train_timesteps}")
    stride = num_train_timesteps // num_steps
    timesteps = torch.arange(0, num_train_timesteps, stride) + 1
    if timesteps[-1] >= num_train_timesteps:
        raise ValueError(f"num_steps={num_steps}: LDM's stride {stride} plus its +1 shift reaches timestep "
                         f"{int(timesteps[-1])}, past the last one ({num_train_timesteps - 1}); pick another num_steps")
    return timesteps


def ddim_schedule(alphas_cumprod, timesteps, eta=0.0):
    """Per-step noise levels, in float64 like LDM's numpy code: `(alphas, alphas_prev, sigmas)`.

    `alphas_prev[i]` is the level step i moves to: that of the next lower selected timestep, and
    `alphas_cumprod[0]` for the lowest (LDM never uses diffusers' `set_alpha_to_one`).
    `sigmas = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))`: eta 0 is deterministic DDIM,
    eta 1 has the DDPM posterior's variance.
    """
    alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
    timesteps = torch.as_tensor(timesteps)
    alphas = alphas_cumprod[timesteps]
    alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[timesteps[:-1]]])
    sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
    return alphas, alphas_prev, sigmas


def ddim_step(x, eps, a_t, a_prev, sigma=0.0, noise=None):
    """One DDIM update from noise level `a_t` to `a_prev` (floats); returns `(x_prev, pred_x0)`."""
    pred_x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    x_prev = math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps
    if sigma > 0:
        if noise is None:
            raise ValueError("a DDIM step with sigma > 0 needs `noise` (standard normal, shaped like x)")
        x_prev = x_prev + sigma * noise
    return x_prev, pred_x0


def timestep_batch(x, t):
    """The integer timestep `t` as the `(batch,)` long tensor that `apply_model` expects."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


@torch.no_grad()
def sample_ddim(eps_fn, x_T, alphas_cumprod, num_steps, eta=0.0, generator=None, callback=None, progress=True):
    """Run DDIM from `x_T` (noise at the highest selected timestep) down to a sample at level 0.

    Noise order (eta > 0 only): after each step's `eps_fn` call, in sampling order (highest t first),
    one `torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)`; with
    `generator=None` that is the global RNG, as in LDM. With eta == 0 nothing is drawn (LDM draws
    and multiplies by zero, which changes no sample).
    `callback`, if given, gets `{"i", "t", "x", "pred_x0"}` after each step (i counts from 0).
    """
    timesteps = ddim_timesteps(num_steps, len(alphas_cumprod))
    alphas, alphas_prev, sigmas = ddim_schedule(alphas_cumprod, timesteps, eta)
    x = x_T
    for i, idx in enumerate(tqdm(range(len(timesteps) - 1, -1, -1), desc="DDIM Sampler", disable=not progress)):
        t = int(timesteps[idx])
        eps = eps_fn(x, timestep_batch(x, t))
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if eta > 0 else None
        x, pred_x0 = ddim_step(x, eps, alphas[idx].item(), alphas_prev[idx].item(), sigmas[idx].item(), noise)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "pred_x0": pred_x0})
    return x


def model_device(model):
    """`model.device` (LightningModule) or else the device of its first parameter."""
    device = getattr(model, "device", None)
    return device if device is not None else next(model.parameters()).device


# LDM's sample() also offers inpainting masks, score correctors, noise dropout...; these are accepted
# at their no-op defaults only, so LDM scripts run unchanged but nothing is silently ignored.
_NOOP_OPTIONS = {"mask": None, "x0": None, "score_corrector": None, "normals_sequence": None,
                 "quantize_x0": False, "temperature": 1.0, "noise_dropout": 0.0}


def _reject_unsupported(options):
    for name, default in _NOOP_OPTIONS.items():
        value = options.get(name, default)
        if value is not None if default is None else value != default:
            raise ValueError(f"sampler option {name}={value!r} is not supported; leave it at {default!r}")


class DDIMSampler:
    """LDM's `DDIMSampler(model).sample(...)` interface over `sample_ddim`.

    `model` needs `alphas_cumprod` (its registered noise levels), `apply_model(x, t, cond) -> eps`
    and a device (`model.device` or its first parameter). `conditioning` and
    `unconditional_conditioning` are tensors (SD's cross-attention context). `verbose` toggles the
    progress bar. Returns `(samples, intermediates)` as LDM does: `intermediates` holds lists
    `x_inter` and `pred_x0`, starting with `x_T`, then the state after the first step and after every
    step whose countdown index (`num_steps - 1 - i`) is a multiple of `log_every_t`.
    """

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, img_callback=None, eta=0.0, x_T=None,
               verbose=True, log_every_t=100, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               **ignored):
        _reject_unsupported(ignored)
        if conditioning is not None and conditioning.shape[0] != batch_size:
            raise ValueError(f"conditioning has batch {conditioning.shape[0]} but batch_size is {batch_size}; "
                             "encode one prompt per sample")
        total = len(ddim_timesteps(S, len(self.model.alphas_cumprod)))
        eps_fn = guided_eps_fn(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale)
        if x_T is None:
            x_T = torch.randn(batch_size, *shape, device=model_device(self.model))
        intermediates = {"x_inter": [x_T], "pred_x0": [x_T]}

        def on_step(step):
            i, index = step["i"], total - 1 - step["i"]
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(step["pred_x0"], i)
            if index % log_every_t == 0 or index == total - 1:
                intermediates["x_inter"].append(step["x"])
                intermediates["pred_x0"].append(step["pred_x0"])

        samples = self._sample(eps_fn, x_T, S, eta, on_step, verbose)
        return samples, intermediates

    def _sample(self, eps_fn, x_T, num_steps, eta, callback, progress):
        return sample_ddim(eps_fn, x_T, self.model.alphas_cumprod, num_steps, eta=eta, callback=callback,
                           progress=progress)
