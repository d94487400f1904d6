"""PLMS sampling exactly as CompVis/LDM's PLMSSampler does it (pseudo linear multistep, Liu et al.,
"Pseudo Numerical Methods for Diffusion Models", arXiv 2202.09778, without the Runge-Kutta warm-up)."""
import torch
from tqdm import tqdm

from ldm.models.diffusion.ddim import DDIMSampler, ddim_schedule, ddim_step, ddim_timesteps

# Adams-Bashforth weights over [eps now, eps one step ago, ...] and their denominator, keyed by the
# number of earlier eps available. Integer weights then one division, as LDM writes them.
_ADAMS_BASHFORTH = {1: ((3, -1), 2), 2: ((23, -16, 5), 12), 3: ((55, -59, 37, -9), 24)}


@torch.no_grad()
def sample_plms(eps_fn, x_T, alphas_cumprod, num_steps, callback=None, progress=True):
    """Run PLMS from `x_T` down to a sample at level 0 on DDIM's timesteps and noise levels; deterministic.

    Each step is a DDIM eta=0 step with eps extrapolated from earlier steps' (Adams-Bashforth of order 2, 3, 4 once 1,
    2, 3 exist). The first is a pseudo improved Euler step: a trial DDIM step to the next timestep, eps evaluated there,
    the real step taken with the mean of both eps (one extra model call; the trial eps never enters the history).
    `callback` gets `{"i", "t", "x", "pred_x0"}` after each step."""
    timesteps = ddim_timesteps(num_steps, len(alphas_cumprod))
    alphas, alphas_prev, _ = ddim_schedule(alphas_cumprod, timesteps)
    x, old_eps = x_T, []
    for i, idx in enumerate(tqdm(range(len(timesteps) - 1, -1, -1), desc="PLMS Sampler", disable=not progress)):
        t = int(timesteps[idx])
        a_t, a_prev = alphas[idx].item(), alphas_prev[idx].item()
        eps = eps_fn(x, x.new_full((len(x),), t, dtype=torch.long))
        if old_eps:
            weights, denominator = _ADAMS_BASHFORTH[len(old_eps)]
            eps_prime = sum(w * e for w, e in zip(weights, [eps, *reversed(old_eps)])) / denominator
        else:
            x_trial, _ = ddim_step(x, eps, a_t, a_prev)
            t_next = int(timesteps[max(idx - 1, 0)])  # with a single step, LDM re-evaluates the same t
            eps_prime = (eps + eps_fn(x_trial, x.new_full((len(x),), t_next, dtype=torch.long))) / 2
        x, pred_x0 = ddim_step(x, eps_prime, a_t, a_prev)
        old_eps = (old_eps + [eps])[-3:]
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "pred_x0": pred_x0})
    return x


class PLMSSampler(DDIMSampler):
    """LDM's `PLMSSampler(model).sample(...)`: the same interface as `DDIMSampler`, with eta fixed at 0."""

    def _sample(self, eps_fn, x_T, num_steps, eta, callback, progress):
        if eta != 0:
            raise ValueError(f"PLMS is deterministic: eta must be 0, got {eta}; use DDIMSampler for eta > 0")
        return sample_plms(eps_fn, x_T, self.model.alphas_cumprod, num_steps, callback=callback, progress=progress)
