"""DDIM: our functions against diffusers' DDIMScheduler configured as LDM/SD v1 (the independent oracle)."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from ldm.models.diffusion.ddim import DDIMSampler, ddim_schedule, ddim_timesteps, sample_ddim
from ldm.models.diffusion.guidance import guided_eps_fn


def diffusers_ddim():
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def ldm_alphas_cumprod():
    """SD v1's schedule as LDM registers it: betas and their cumprod in float64, stored as float32."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.tensor(np.cumprod(1 - betas.numpy()), dtype=torch.float32)


def make_eps_fn(channels=4):
    """A fixed, nonlinear, t-dependent stand-in for the UNet: tanh of a random channel mix."""
    w = torch.randn(channels, channels, generator=torch.Generator().manual_seed(0)) / channels ** 0.5
    return lambda x, t: torch.tanh(0.7 * torch.einsum("oc,bchw->bohw", w, x) + t.view(-1, 1, 1, 1) / 1000)


def x_T(seed=1):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_steps", [1, 2, 10, 20, 25, 50, 100, 200, 250, 500])
def test_timesteps_match_diffusers_when_steps_divide_1000(num_steps):
    sched = diffusers_ddim()
    sched.set_timesteps(num_steps)
    assert ddim_timesteps(num_steps).tolist() == sched.timesteps.flip(0).tolist()


def test_timesteps_pin_ldm_extra_step_when_steps_do_not_divide_1000():
    """LDM uses range(0, 1000, 1000 // S): for S=30 the stride 33 fits 31 times, so LDM samples 31 steps
    where diffusers' "leading" spacing samples 30; the first 30 timesteps coincide."""
    sched = diffusers_ddim()
    sched.set_timesteps(30)
    ours, theirs = ddim_timesteps(30).tolist(), sched.timesteps.flip(0).tolist()
    assert len(ours) == 31 and len(theirs) == 30
    assert ours[:30] == theirs and ours[30] == 991


@pytest.mark.parametrize("num_steps", [0, 3, 9, 27, 501, 1000, 1001])
def test_timesteps_out_of_range_raise(num_steps):
    # 3, 9, 27: the stride (333, 111, 37) divides 999, so the +1 shift would reach timestep 1000.
    with pytest.raises(ValueError, match="num_steps"):
        ddim_timesteps(num_steps)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_schedule_matches_diffusers(eta):
    sched = diffusers_ddim()
    sched.set_timesteps(50)
    stride = 1000 // 50
    ts = sched.timesteps.tolist()  # descending
    their_alphas = torch.stack([sched.alphas_cumprod[t] for t in ts])
    their_prev = torch.stack([sched.alphas_cumprod[t - stride] if t - stride >= 0 else sched.final_alpha_cumprod
                              for t in ts])
    their_sigmas = eta * torch.stack([sched._get_variance(t, t - stride) for t in ts]).sqrt()

    # Same alphas_cumprod in: alphas are the same numbers; sigmas agree to float32 rounding (diffusers computes
    # 1 - a / a_prev in float32, which loses ~1e-5 relative to cancellation at t=1; we compute in float64).
    alphas, prev, sigmas = (v.flip(0) for v in ddim_schedule(sched.alphas_cumprod, ddim_timesteps(50), eta))
    torch.testing.assert_close(alphas, their_alphas.double(), rtol=0, atol=0)
    torch.testing.assert_close(prev, their_prev.double(), rtol=0, atol=0)
    torch.testing.assert_close(sigmas, their_sigmas.double(), rtol=2e-5, atol=1e-7)

    # LDM's own alphas_cumprod (float64 cumprod) differs from diffusers' float32 cumprod by < 1e-6 relative.
    alphas, prev, sigmas = (v.flip(0) for v in ddim_schedule(ldm_alphas_cumprod(), ddim_timesteps(50), eta))
    torch.testing.assert_close(alphas, their_alphas.double(), rtol=2e-6, atol=0)
    torch.testing.assert_close(prev, their_prev.double(), rtol=2e-6, atol=0)
    torch.testing.assert_close(sigmas, their_sigmas.double(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_trajectory_matches_diffusers(eta):
    sched = diffusers_ddim()
    sched.set_timesteps(10)
    eps_fn = make_eps_fn()

    ours = []
    sample_ddim(eps_fn, x_T(), sched.alphas_cumprod, 10, eta=eta, generator=torch.Generator().manual_seed(7),
                callback=lambda s: ours.append(s["x"]), progress=False)

    # Documented noise order: one randn per step after the model call, only when eta > 0.
    noise_gen, x, theirs = torch.Generator().manual_seed(7), x_T(), []
    for t in sched.timesteps:
        eps = eps_fn(x, t.expand(x.shape[0]))
        noise = torch.randn(x.shape, generator=noise_gen) if eta > 0 else None
        x = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        theirs.append(x)

    assert len(ours) == len(theirs) == 10
    # Float32 rounding only: |x| grows to ~20 with this stand-in eps, so the bound is 1e-5 absolute + 1e-5 relative.
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ours[-1], x_T())  # the run did something


def test_same_generator_seed_gives_bitwise_identical_samples():
    def run(seed):
        return sample_ddim(make_eps_fn(), x_T(), ldm_alphas_cumprod(), 10, eta=1.0,
                           generator=torch.Generator().manual_seed(seed), progress=False)
    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


def test_eta_zero_draws_no_noise():
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    sample_ddim(make_eps_fn(), x_T(), ldm_alphas_cumprod(), 5, eta=0.0, generator=gen, progress=False)
    assert torch.equal(gen.get_state(), state)


class TinyModel(torch.nn.Module):
    """The interface DDIMSampler needs: alphas_cumprod, apply_model(x, t, cond) and a parameter's device."""

    def __init__(self):
        super().__init__()
        self.register_buffer("alphas_cumprod", ldm_alphas_cumprod())
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.eps_fn = make_eps_fn()

    def apply_model(self, x, t, cond):
        return self.eps_fn(x, t) + self.scale * cond.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_ldm_wrapper_equals_functional_sampler():
    model = TinyModel()
    cond, uncond = torch.randn(2, 3, 5), torch.randn(1, 3, 5)
    steps = []
    torch.manual_seed(11)
    samples, inter = DDIMSampler(model).sample(S=50, batch_size=2, shape=(4, 8, 8), conditioning=cond,
                                               unconditional_guidance_scale=7.5, unconditional_conditioning=uncond,
                                               eta=0.0, verbose=False, callback=steps.append)
    torch.manual_seed(11)
    start = torch.randn(2, 4, 8, 8)
    expected = sample_ddim(guided_eps_fn(model, cond, uncond, 7.5), start, model.alphas_cumprod, 50, progress=False)
    assert torch.equal(samples, expected)
    assert steps == list(range(50))
    # LDM logs x_T, the first step, and every step whose countdown index is a multiple of log_every_t (here: the last).
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) == 3
    assert torch.equal(inter["x_inter"][0], start) and torch.equal(inter["x_inter"][-1], samples)


def test_ldm_wrapper_rejects_bad_input():
    sampler = DDIMSampler(TinyModel())
    with pytest.raises(ValueError, match="mask"):
        sampler.sample(S=10, batch_size=1, shape=(4, 8, 8), conditioning=torch.zeros(1, 3, 5),
                       mask=torch.ones(1, 4, 8, 8), verbose=False)
    with pytest.raises(ValueError, match="batch_size"):
        sampler.sample(S=10, batch_size=2, shape=(4, 8, 8), conditioning=torch.zeros(1, 3, 5), verbose=False)
    with pytest.raises(ValueError, match="unconditional"):
        sampler.sample(S=10, batch_size=1, shape=(4, 8, 8), conditioning=torch.zeros(1, 3, 5),
                       unconditional_guidance_scale=5.0, verbose=False)
