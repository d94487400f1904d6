"""The SD v1 UNet: exact SD v1.5 checkpoint layout, numerical parity with diffusers, gradient checkpointing."""

import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.util import instantiate_from_config

from .conftest import randomize_, reference_keys

SD_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
TINY_CONFIG = "configs/tiny/v1-inference.yaml"
PREFIX = "model.diffusion_model."


def unet_config(path):
    return OmegaConf.load(path).model.params.unet_config


def tiny_unet(**overrides):
    cfg = unet_config(TINY_CONFIG)
    cfg.params.update(overrides)
    return randomize_(instantiate_from_config(cfg), std=0.1).eval()


def tiny_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)  # 64x64 images
    return x, torch.tensor([3, 961]), torch.randn(2, 77, 64, generator=g)


def test_sd_v15_unet_has_the_checkpoint_layout():
    with torch.device("meta"):
        unet = instantiate_from_config(unet_config(SD_CONFIG))
    reference = reference_keys(PREFIX)
    ours = {PREFIX + k: list(v.shape) for k, v in unet.state_dict().items()}
    assert sorted(ours) == sorted(reference)
    assert ours == reference
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


def test_sd_v15_unet_runs_on_64x64_latents():
    # Shapes only, on the meta device: the real forward is too slow for the test suite on a CPU.
    with torch.device("meta"):
        unet = instantiate_from_config(unet_config(SD_CONFIG))
        eps = unet(torch.randn(2, 4, 64, 64), torch.tensor([0, 999]), torch.randn(2, 77, 768))
    assert eps.shape == (2, 4, 64, 64)


def test_unet_matches_diffusers():
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    unet = tiny_unet()
    ckpt = {PREFIX + k: v for k, v in unet.state_dict().items()}
    original_config = OmegaConf.to_container(OmegaConf.load(TINY_CONFIG))
    config = create_unet_diffusers_config_from_ldm(original_config, ckpt)
    theirs = UNet2DConditionModel(**config).eval()
    theirs.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config), strict=True)

    x, t, context = tiny_inputs()
    with torch.no_grad():
        ours = unet(x, t, context)
        expected = theirs(x, t, encoder_hidden_states=context).sample
        other_context = unet(x, t, torch.randn_like(context))
        other_t = unet(x, t + 1, context)
        shared_t = unet(x, 961, context)
    assert ours.shape == (2, 4, 8, 8)
    assert (ours - expected).abs().max() < 1e-4
    assert torch.allclose(shared_t[1], ours[1], atol=1e-6)
    # The comparison is only meaningful if the text and the timestep move the output far beyond the tolerance.
    assert (other_context - ours).abs().max() > 1e-2
    assert (other_t - ours).abs().max() > 1e-3


def count_resblock_runs(unet, x, t, context):
    """eps, and how often a ResBlock's body ran during forward and backward."""
    runs = []
    # One downstream of a cross-attention, so that its input depends on the context.
    handle = unet.middle_block[0].in_layers.register_forward_hook(lambda *_: runs.append(1))
    try:
        eps = unet(x, t, context)
        if eps.requires_grad:
            eps.square().sum().backward()
    finally:
        handle.remove()
    return eps, len(runs)


def test_gradient_checkpointing_gives_the_same_values_and_gradients():
    plain, checkpointed = tiny_unet(), tiny_unet(use_checkpoint=True)
    plain.requires_grad_(False)  # frozen, as in CatVersion: only the conditioning gets a gradient
    checkpointed.requires_grad_(False)
    x, t, context = tiny_inputs()
    results = []
    for unet in (plain, checkpointed):
        c = context.clone().requires_grad_(True)
        eps, runs = count_resblock_runs(unet, x, t, c)
        results.append((eps.detach(), c.grad, runs))
    (eps_a, grad_a, runs_a), (eps_b, grad_b, runs_b) = results
    assert torch.allclose(eps_a, eps_b, atol=1e-6)
    assert grad_a.abs().max() > 0
    assert torch.allclose(grad_a, grad_b, atol=1e-6)
    assert (runs_a, runs_b) == (1, 2)  # recomputed in backward, so activations were not stored


def test_no_checkpointing_without_a_graph():
    unet = tiny_unet(use_checkpoint=True).requires_grad_(False)
    x, t, context = tiny_inputs()
    assert count_resblock_runs(unet, x, t, context)[1] == 1
    with torch.no_grad():
        assert count_resblock_runs(unet.train(), x, t, context)[1] == 1


def test_half_precision_weights_answer_in_the_callers_dtype():
    unet = tiny_unet()
    x, t, context = tiny_inputs()
    with torch.no_grad():
        expected = unet(x, t, context)
        eps = unet.to(torch.bfloat16)(x, t, context)
    assert eps.dtype == torch.float32
    assert (eps - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"use_spatial_transformer": False}, "use_spatial_transformer=False is not supported"),
        ({"use_scale_shift_norm": True}, "use_scale_shift_norm=True is not supported"),
        ({"num_classes": 10}, "num_classes=10 is not supported"),
        ({"dims": 3}, "dims=3 is not supported"),
        ({"context_dim": None}, "context_dim is required"),
        ({"num_head_channels": 8}, "num_head_channels=8 is not supported"),
        ({"num_heads": -1}, "num_heads=-1 is invalid"),
    ],
)
def test_unsupported_options_are_refused(overrides, message):
    params = dict(OmegaConf.to_container(unet_config(TINY_CONFIG).params), **overrides)
    with pytest.raises(ValueError, match=message):
        UNetModel(**params)


def test_forward_needs_the_context():
    x, t, _ = tiny_inputs()
    with pytest.raises(ValueError, match="context is required"):
        tiny_unet()(x, t)
