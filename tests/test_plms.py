"""PLMS: our sampler against diffusers' PNDMScheduler with skip_prk_steps (its port of LDM's PLMS)."""
import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler

from ldm.models.diffusion.ddim import sample_ddim
from ldm.models.diffusion.guidance import guided_eps_fn
from ldm.models.diffusion.plms import PLMSSampler, sample_plms


def diffusers_plms():
    return PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)


def ldm_alphas_cumprod():
    """SD v1's schedule as LDM registers it: betas and their cumprod in float64, stored as float32."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.tensor(np.cumprod(1 - betas.numpy()), dtype=torch.float32)


def recording_eps_fn(calls):
    """A fixed, nonlinear, t-dependent stand-in for the UNet that records the timestep of each call."""
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) / 2

    def eps_fn(x, t):
        calls.append(int(t[0]))
        return torch.tanh(0.7 * torch.einsum("oc,bchw->bohw", w, x) + t.view(-1, 1, 1, 1) / 1000)
    return eps_fn


def x_T():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def run_diffusers(num_steps, calls):
    """diffusers' loop; returns the state after each step (its first output is the Euler trial point)."""
    sched, eps_fn, x, states = diffusers_plms(), recording_eps_fn(calls), x_T(), []
    sched.set_timesteps(num_steps)
    for t in sched.timesteps:
        x = sched.step(eps_fn(x, t.expand(x.shape[0])), t, x).prev_sample
        states.append(x)
    return states


def test_trajectory_matches_diffusers():
    """Ten steps exercise every branch: the improved Euler start, then Adams-Bashforth orders 2, 3 and 4.
    diffusers evaluates the model at the same 11 points (the trial point reuses the second timestep) and
    returns the trial point as an extra first output; after that, every step agrees."""
    our_calls, their_calls, ours = [], [], []
    sample_plms(recording_eps_fn(our_calls), x_T(), diffusers_plms().alphas_cumprod, 10,
                callback=lambda s: ours.append(s["x"]), progress=False)
    theirs = run_diffusers(10, their_calls)

    assert our_calls == their_calls == [901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert len(ours) == 10 and len(theirs) == 11
    for a, b in zip(ours, theirs[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # PLMS is a different integrator from DDIM: same model, same points, a different sample.
    ddim = sample_ddim(recording_eps_fn([]), x_T(), diffusers_plms().alphas_cumprod, 10, progress=False)
    assert (ours[-1] - ddim).abs().max() > 1e-3


def test_pins_extra_step_when_steps_do_not_divide_1000():
    """The one difference by design, inherited from LDM's timesteps (see ddim_timesteps): for 30 steps LDM
    runs 31 (stride 33 fits 31 times below 1000), diffusers 30, so we make 32 model calls to its 31
    and the samples differ. Ours start one stride higher, at 991; below that the sampled timesteps coincide."""
    our_calls, their_calls = [], []
    ours = sample_plms(recording_eps_fn(our_calls), x_T(), diffusers_plms().alphas_cumprod, 30, progress=False)
    theirs = run_diffusers(30, their_calls)[-1]
    assert len(our_calls) == 32 and len(their_calls) == 31
    our_sampled, their_sampled = our_calls[:1] + our_calls[2:], their_calls[:1] + their_calls[2:]  # minus trial
    assert our_sampled[0] == 991 and our_sampled[1:] == their_sampled
    assert (ours - theirs).abs().max() > 1e-3


def test_single_step_reevaluates_the_same_timestep():
    """With one step there is no next timestep: LDM's trial eps is taken at the same t (and so do we)."""
    calls = []
    sample_plms(recording_eps_fn(calls), x_T(), ldm_alphas_cumprod(), 1, progress=False)
    assert calls == [1, 1]


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("alphas_cumprod", ldm_alphas_cumprod())
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.eps_fn = recording_eps_fn([])

    def apply_model(self, x, t, cond):
        return self.eps_fn(x, t) + self.scale * cond.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_ldm_wrapper_equals_functional_sampler():
    model = TinyModel()
    cond, uncond = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    torch.manual_seed(3)
    samples, inter = PLMSSampler(model).sample(S=20, batch_size=2, shape=(4, 8, 8), conditioning=cond,
                                               unconditional_guidance_scale=10.0, unconditional_conditioning=uncond,
                                               verbose=False)
    torch.manual_seed(3)
    start = torch.randn(2, 4, 8, 8)
    expected = sample_plms(guided_eps_fn(model, cond, uncond, 10.0), start, model.alphas_cumprod, 20, progress=False)
    assert torch.equal(samples, expected)
    assert torch.equal(inter["x_inter"][0], start) and torch.equal(inter["x_inter"][-1], samples)


def test_ldm_wrapper_rejects_nonzero_eta():
    with pytest.raises(ValueError, match="eta must be 0"):
        PLMSSampler(TinyModel()).sample(S=10, batch_size=1, shape=(4, 8, 8), conditioning=torch.zeros(1, 3, 5),
                                        eta=0.5, verbose=False)
