"""DDIM sampling (Song et al., arXiv 2010.02502) exactly as CompVis/LDM's DDIMSampler does it.

Plain functions over `eps_fn(x, t_batch) -> eps` and `alphas_cumprod` (testable against diffusers with any epsilon
function); `DDIMSampler` wraps them in LDM's `sample()` signature.
"""
import math

import torch
from tqdm import tqdm

from ldm.models.diffusion.guidance import guided_eps_fn


def ddim_timesteps(num_steps, num_train_timesteps=1000):
    """LDM's "uniform" DDIM timesteps, ascending: `range(0, T, T // num_steps) + 1`.

    Why +1: each step goes to the level of the next lower selected timestep, the lowest to `alphas_cumprod[0]`;
    unshifted, the last step would be a wasted call from level 0 to level 0 (diffusers: `steps_offset=1`).
    As in LDM, a `num_steps` that does not divide T yields more steps (30 -> 31), where diffusers keeps 30.
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

    `alphas_prev[i]` is the level step i moves to (`alphas_cumprod[0]` for the lowest: LDM never uses diffusers'
    `set_alpha_to_one`). eta 0 is deterministic DDIM, eta 1 has the DDPM posterior's variance.
    """
    alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
    timesteps = torch.as_tensor(timesteps)
    alphas = alphas_cumprod[timesteps]
    alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[timesteps[:-1]]])
    sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
    return alphas, alphas_prev, sigmas


def ddim_step(x, eps, a_t, a_prev, sigma=0.0, noise=None):
    """One DDIM update from noise level `a_t` to `a_prev` (floats; `noise` like x when sigma > 0): (x_prev, pred_x0)."""
    pred_x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    x_prev = math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps
    return (x_prev + sigma * noise if sigma > 0 else x_prev), pred_x0


@torch.no_grad()
def sample_ddim(eps_fn, x_T, alphas_cumprod, num_steps, eta=0.0, generator=None, callback=None, progress=True):
    """Run DDIM from `x_T` (noise at the highest selected timestep) down to a sample at level 0.

    With eta > 0, one `torch.randn` like x from `generator` (None: the global RNG, as LDM) after each step's `eps_fn`
    call; with eta 0 nothing is drawn (LDM draws and multiplies by zero). `callback` gets `{"i", "t", "x", "pred_x0"}`
    after each step (i counts from 0).
    """
    timesteps = ddim_timesteps(num_steps, len(alphas_cumprod))
    alphas, alphas_prev, sigmas = ddim_schedule(alphas_cumprod, timesteps, eta)
    x = x_T
    for i, idx in enumerate(tqdm(range(len(timesteps) - 1, -1, -1), desc="DDIM Sampler", disable=not progress)):
        t = int(timesteps[idx])
        eps = eps_fn(x, x.new_full((len(x),), t, dtype=torch.long))
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if eta > 0 else None
        x, pred_x0 = ddim_step(x, eps, alphas[idx].item(), alphas_prev[idx].item(), sigmas[idx].item(), noise)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "pred_x0": pred_x0})
    return x


# LDM's sample() also offers inpainting masks, score correctors, noise dropout...; these are accepted
# at their no-op defaults only, so LDM scripts run unchanged but nothing is silently ignored.
_NOOP_OPTIONS = {"mask": None, "x0": None, "score_corrector": None, "normals_sequence": None,
                 "quantize_x0": False, "temperature": 1.0, "noise_dropout": 0.0}


class DDIMSampler:
    """LDM's `DDIMSampler(model).sample(...)` interface over `sample_ddim`.

    `model` needs `alphas_cumprod`, `apply_model(x, t, cond) -> eps` and a parameter (for the device). Returns
    `(samples, intermediates)` as LDM does: lists `x_inter` and `pred_x0` of x_T, the state after the first step and
    after every step whose countdown index (`num_steps - 1 - i`) is a multiple of `log_every_t`.
    """

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, img_callback=None, eta=0.0, x_T=None,
               verbose=True, log_every_t=100, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               **ignored):
        for name, default in _NOOP_OPTIONS.items():
            value = ignored.get(name, default)
            if value is not None if default is None else value != default:
                raise ValueError(f"sampler option {name}={value!r} is not supported; leave it at {default!r}")
        if conditioning is not None and conditioning.shape[0] != batch_size:
            raise ValueError(f"conditioning has batch {conditioning.shape[0]} but batch_size is {batch_size}; "
                             "encode one prompt per sample")
        total = len(ddim_timesteps(S, len(self.model.alphas_cumprod)))
        eps_fn = guided_eps_fn(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale)
        if x_T is None:
            x_T = torch.randn(batch_size, *shape, device=next(self.model.parameters()).device)
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

        return self._sample(eps_fn, x_T, S, eta, on_step, verbose), intermediates

    def _sample(self, eps_fn, x_T, num_steps, eta, callback, progress):
        return sample_ddim(eps_fn, x_T, self.model.alphas_cumprod, num_steps, eta=eta, callback=callback,
                           progress=progress)
