"""Schedule and timestep embedding against diffusers' implementations of the same SD v1 formulas."""
import numpy as np
import pytest
import torch

from ldm.modules.diffusionmodules.util import make_beta_schedule, timestep_embedding


def test_linear_schedule_is_diffusers_scaled_linear():
    from diffusers import DDPMScheduler

    betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    expected = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").betas
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(0.00085, rel=1e-12) and betas[-1] == pytest.approx(0.012, rel=1e-12)
    assert np.abs(betas - expected.double().numpy()).max() < 1e-8  # diffusers computes in float32


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unsupported beta schedule 'cosine'"):
        make_beta_schedule("cosine", 1000)


@pytest.mark.parametrize("dim", [320, 33])
def test_timestep_embedding_is_diffusers_sd_embedding(dim):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 500.5, 999])
    ours = timestep_embedding(t, dim)
    assert ours.shape == (5, dim)
    assert torch.allclose(ours, get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0), atol=1e-5)
