"""The SD v1 KL autoencoder: exact SD v1.5 checkpoint layout, parity with diffusers, posterior, checkpoint loading."""

import pytest
import torch
from omegaconf import OmegaConf

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

from .conftest import randomize_, reference_keys

SD_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
TINY_CONFIG = "configs/tiny/v1-inference.yaml"
PREFIX = "first_stage_model."


def vae_config(path):
    return OmegaConf.load(path).model.params.first_stage_config


def tiny_vae():
    return randomize_(instantiate_from_config(vae_config(TINY_CONFIG)), std=0.1).eval()


def images(seed=1):
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_sd_v15_vae_has_the_checkpoint_layout():
    with torch.device("meta"):
        vae = instantiate_from_config(vae_config(SD_CONFIG))
        z = vae.encode(torch.randn(1, 3, 512, 512)).mode()
        assert z.shape == (1, 4, 64, 64)
        assert vae.decode(z).shape == (1, 3, 512, 512)
    reference = reference_keys(PREFIX)
    ours = {PREFIX + k: list(v.shape) for k, v in vae.state_dict().items()}
    assert len(ours) == 248
    assert ours == reference


def test_vae_matches_diffusers():
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    vae = tiny_vae()
    ckpt = {PREFIX + k: v for k, v in vae.state_dict().items()}
    original_config = OmegaConf.to_container(OmegaConf.load(TINY_CONFIG))
    config = create_vae_diffusers_config_from_ldm(original_config, ckpt)
    theirs = DiffusersAutoencoderKL(**config).eval()
    theirs.load_state_dict(convert_ldm_vae_checkpoint(ckpt, config), strict=True)

    x = images()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        posterior, expected_posterior = vae.encode(x), theirs.encode(x).latent_dist
        decoded, expected_decoded = vae.decode(z), theirs.decode(z).sample
    assert posterior.mean.shape == (2, 4, 8, 8) and decoded.shape == (2, 3, 64, 64)
    assert (posterior.mean - expected_posterior.mean).abs().max() < 1e-4
    assert (posterior.std - expected_posterior.std).abs().max() < 1e-4
    assert (decoded - expected_decoded).abs().max() < 1e-4
    assert posterior.mean.std() > 0.1 and decoded.std() > 0.1  # far from trivially equal


def test_posterior_sampling_and_kl():
    moments = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    posterior = DiagonalGaussianDistribution(moments)
    mean, logvar = moments[:, :4], moments[:, 4:]
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    sample = posterior.sample(generator=torch.Generator().manual_seed(5))
    assert torch.allclose(sample, mean + torch.exp(0.5 * logvar) * noise)
    assert torch.equal(posterior.mode(), mean)
    expected_kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, torch.exp(0.5 * logvar)), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=[1, 2, 3])
    assert torch.allclose(posterior.kl(), expected_kl, atol=1e-4)


def test_forward_round_trip_shapes_and_determinism():
    vae = tiny_vae()
    x = images()
    with torch.no_grad():
        reconstruction, posterior = vae(x, sample_posterior=False)
        assert torch.equal(reconstruction, vae.decode(posterior.mode()))
        a, _ = vae(x, generator=torch.Generator().manual_seed(3))
        b, _ = vae(x, generator=torch.Generator().manual_seed(3))
    assert reconstruction.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, reconstruction)


def test_loads_a_vae_checkpoint_and_drops_its_loss_weights(tmp_path):
    source = tiny_vae()
    state = dict(source.state_dict(), **{"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.ones(2)})
    path = tmp_path / "vae.ckpt"
    torch.save({"state_dict": state}, path)
    loaded = AutoencoderKL(**OmegaConf.to_container(vae_config(TINY_CONFIG).params), ckpt_path=str(path))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())


def test_a_checkpoint_that_does_not_fit_is_refused(tmp_path):
    state = tiny_vae().state_dict()
    del state["decoder.conv_out.bias"]
    path = tmp_path / "vae.ckpt"
    torch.save(state, path)
    params = OmegaConf.to_container(vae_config(TINY_CONFIG).params)
    with pytest.raises(ValueError, match=r"1 missing keys, e.g. \['decoder.conv_out.bias'\]"):
        AutoencoderKL(**params, ckpt_path=str(path))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"attn_resolutions": [16]}, r"ddconfig.attn_resolutions=\[16\] is not supported .*use attn_resolutions: \[\]"),
        ({"double_z": False}, "ddconfig.double_z=False is not supported .*use double_z: true"),
        ({"resamp_with_conv": False}, "ddconfig.resamp_with_conv=False is not supported .*use resamp_with_conv: true"),
    ],
)
def test_unsupported_ddconfig_is_refused(change, message):
    params = OmegaConf.to_container(vae_config(TINY_CONFIG).params)
    params["ddconfig"].update(change)
    with pytest.raises(ValueError, match=message):
        AutoencoderKL(**params)
