"""Classifier-free guidance: one batched call on cat([uc, c]), skipped uc half at scale 1."""
import pytest
import torch

from ldm.models.diffusion.guidance import guided_eps_fn


class CountingModel:
    """eps = x * (1 + mean of cond) + t/1000: distinct per conditioning; records each call's inputs."""

    def __init__(self):
        self.calls = []

    def apply_model(self, x, t, cond):
        self.calls.append((x.clone(), t.clone(), cond.clone()))
        return x * (1 + cond.mean(dim=(1, 2))).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) / 1000


def test_scale_one_evaluates_only_the_conditional_half():
    model, cond, uncond = CountingModel(), torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 981)
    eps = guided_eps_fn(model, cond, uncond, 1.0)(x, t)
    assert len(model.calls) == 1 and torch.equal(model.calls[0][2], cond)
    assert torch.equal(eps, CountingModel().apply_model(x, t, cond))


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_guidance_formula_in_one_batched_call(scale):
    model, cond, uncond = CountingModel(), torch.randn(2, 3, 5), torch.randn(1, 3, 5)
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 501)
    eps = guided_eps_fn(model, cond, uncond, scale)(x, t)

    assert len(model.calls) == 1
    x_in, t_in, c_in = model.calls[0]
    assert torch.equal(x_in, torch.cat([x, x])) and torch.equal(t_in, torch.cat([t, t]))
    assert torch.equal(c_in, torch.cat([uncond.expand(2, -1, -1), cond]))  # batch-1 uc broadcast, uc first
    oracle = CountingModel()
    uc_eps, c_eps = oracle.apply_model(x, t, uncond.expand(2, -1, -1)), oracle.apply_model(x, t, cond)
    torch.testing.assert_close(eps, uc_eps + scale * (c_eps - uc_eps), rtol=1e-6, atol=1e-6)


def test_bad_unconditional_conditioning_raises():
    with pytest.raises(ValueError, match="unconditional"):
        guided_eps_fn(CountingModel(), torch.randn(2, 3, 5), None, 5.0)
    with pytest.raises(ValueError, match="shape"):
        guided_eps_fn(CountingModel(), torch.randn(2, 3, 5), torch.randn(2, 4, 5), 5.0)
