"""The training loss against one written out here: diffusers' VAE and UNet, the SD schedule and q_sample by hand."""
import numpy as np
import pytest
import torch

from .conftest import diffusers_models
from .test_fast_path import REFERENCE, make_batch, train_step, use

SCALE = 0.18215  # SD v1's latent scale factor
ALPHAS_CUMPROD = torch.from_numpy(np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)).float()


def loss_by_hand(unet, vae, batch, cond, seed):
    """The reference's step: a posterior sample, t ~ U{0..999}, eps ~ N(0, I) in that order; MSE(UNet(x_t), eps)."""
    images = batch["image"].permute(0, 3, 1, 2).contiguous().float()  # the layout changes a CPU convolution's sums
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    torch.manual_seed(seed)
    z = SCALE * (posterior.mean + posterior.std * torch.randn(posterior.mean.shape))
    t = torch.randint(0, 1000, (len(images),))
    eps = torch.randn(z.shape)
    a = ALPHAS_CUMPROD[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * z + (1 - a).sqrt() * eps
    return ((unet(x_t, t, encoder_hidden_states=cond).sample - eps) ** 2).mean()


@pytest.mark.parametrize("options", [REFERENCE, {}], ids=["reference path", "fast path"])
def test_training_loss_equals_the_one_written_out(options, tiny_finetune_model, tiny_ckpt, example_data):
    from ldm.data.personalized import PersonalizedBase

    m = tiny_finetune_model.train()
    unet, vae, _ = diffusers_models(tiny_ckpt)
    batch = make_batch(PersonalizedBase(example_data, size=64, base_class_word="circle"), [(0, False), (3, True)])
    with torch.no_grad():  # the text side has its own oracle (tests/test_concat_kv.py)
        cond = m.get_learned_conditioning(batch["caption"])
    use(m, **options)
    for seed in (1, 2):
        expected = loss_by_hand(unet, vae, batch, cond, seed)
        loss = train_step(m, batch, seed)[0]
        # Measured: 0 to 2.4e-7 (2 float32 steps) on losses of ~1.6; a non-contiguous image batch alone moves it 1e-5.
        assert abs(loss - expected) <= 2e-6, (seed, loss, expected)
