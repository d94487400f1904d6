"""Pretrain the toy world's text-to-image model: the tiny VAE, then the tiny UNet, on scenes drawn from the seed.

The CLIP text encoder stays random and frozen, as SD's stays frozen, shaped by ldm/toy/shaping.py.
"""
import math
import statistics

import torch
from tqdm import tqdm

from ldm.models.diffusion.ddpm import q_sample
from ldm.toy.scenes import scene_batch
from ldm.toy.shaping import shape_text_encoder
from ldm.util import instantiate_from_config, load_model_from_config


def train_base_model(config, seed, vae_steps, vae_batch_size, vae_lr, unet_steps, unet_batch_size, unet_lr, scenes,
                     vae_from=None):
    """Draw the model of `config` (an OmegaConf with `model`) from `seed`, shape its text encoder, train its VAE (or
    take the VAE of the toy checkpoint `vae_from`), then its UNet. Returns the model, its loss curves and a record."""
    torch.manual_seed(seed)
    model = instantiate_from_config(config.model)
    shape_text_encoder(model.cond_stage_model, seed=seed)
    record, curves = {}, {}
    if vae_from:  # after the fresh model is drawn, so that its UNet and text encoder are those of a full run
        donor = load_model_from_config(config, vae_from, verbose=False)
        model.first_stage_model.load_state_dict(donor.first_stage_model.state_dict())
    else:
        curves["VAE reconstruction (mean |error|, [-1, 1] pixels)"] = vae_losses = train_vae(
            model.first_stage_model, vae_steps, vae_batch_size, vae_lr, seed)
        images = torch.from_numpy(scene_batch(f"{seed}-rescale", 512)[0])
        record["vae_rescale"] = rescale_latents(model.first_stage_model, images, model.scale_factor)
        record["vae_l1_last100"] = statistics.mean(vae_losses[-100:])
    unet_losses, record["distinct_captions"] = train_unet(model, scenes, unet_steps, unet_batch_size, unet_lr, seed)
    curves["UNet noise-prediction loss"] = unet_losses
    record["unet_loss_last200"] = statistics.mean(unet_losses[-200:])
    return model, curves, record


def warmup_cosine(step, total, warmup):
    return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / total))


def train_vae(vae, steps, batch_size, lr, seed, kl_weight=1e-6):
    """L1 reconstruction plus LDM's small KL term (both summed per image, as in LDM's loss); fresh scenes every step."""
    vae.train().requires_grad_(True)
    opt = torch.optim.Adam(vae.parameters(), lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, 50))
    losses = []
    for step in (bar := tqdm(range(steps), desc="VAE", dynamic_ncols=True)):
        x = torch.from_numpy(scene_batch(f"{seed}-vae-{step}", batch_size)[0])
        reconstruction, posterior = vae(x)
        error = (reconstruction - x).abs()
        loss = error.flatten(1).sum(1).mean() + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(error.mean().item())
        bar.set_postfix(l1=f"{losses[-1]:.4f}")
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def rescale_latents(vae, images, scale_factor):
    """Fold a constant into the VAE's 1x1 convolutions so that `scale_factor * latent` has unit spread, as in SD.

    The decoded images are unchanged: the posterior mean is multiplied by `a` (its log-variance shifted by 2 log a)
    and the decoder's first convolution divides by `a` again.
    """
    a = 1.0 / (scale_factor * vae.encode(images).mean.std().item())
    e = vae.embed_dim
    vae.quant_conv.weight[:e] *= a
    vae.quant_conv.bias[:e] *= a
    vae.quant_conv.bias[e:] += 2.0 * math.log(a)
    vae.post_quant_conv.weight /= a
    return a


@torch.no_grad()
def encode_scenes(model, n, seed, batch_size=256):
    """Posterior means and standard deviations of `n` scenes, and each scene's index into the sorted distinct captions."""
    means, stds, captions = [], [], []
    for i in tqdm(range(0, n, batch_size), desc="encode", dynamic_ncols=True):
        x, text = scene_batch(f"{seed}-unet-{i}", min(batch_size, n - i))
        posterior = model.first_stage_model.encode(torch.from_numpy(x))
        means.append(posterior.mean)
        stds.append(posterior.std)
        captions += text
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    return torch.cat(means), torch.cat(stds), torch.tensor([index[c] for c in captions]), unique


def train_unet(model, n_scenes, steps, batch_size, lr, seed, ema_decay=0.999, offset_noise=0.3, noisy_share=0.5):
    """The LDM objective (predict the noise), on latents sampled from cached posteriors, with two changes that make a
    short training listen to its captions.

    On 8x8 latents an image's mean colour shows through the noise even at the last timestep (averaging 64 pixels), so a
    UNet can denoise well while ignoring the text, and then it draws colours from the starting noise instead of the
    prompt. `offset_noise` adds a per-image, per-channel constant of that standard deviation to the noise (the
    "offset noise" of SD fine-tunes), which hides the mean colour; `noisy_share` of every batch draws its timestep
    from the noisiest 30%, where the caption decides the colours, instead of uniformly.
    """
    means, stds, caption_ids, captions = encode_scenes(model, n_scenes, seed)
    text_encoder = model.cond_stage_model
    tokens = text_encoder.tokenize(captions)
    with torch.no_grad():  # the text encoder is frozen: every caption is encoded once
        cond = torch.cat([text_encoder.encode_tokens(tokens[i:i + 256]) for i in range(0, len(tokens), 256)])
    unet = model.model.diffusion_model
    unet.train().requires_grad_(True)
    ema = torch.optim.swa_utils.AveragedModel(unet, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay))
    opt = torch.optim.AdamW(unet.parameters(), lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, 200))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in (bar := tqdm(range(steps), desc="UNet", dynamic_ncols=True)):
        i = torch.randint(0, len(means), (batch_size,), generator=generator)
        z = model.scale_factor * (means[i] + stds[i] * torch.randn(means[i].shape, generator=generator))
        t = torch.randint(0, model.num_timesteps, (batch_size,), generator=generator)
        noisy = torch.rand(batch_size, generator=generator) < noisy_share
        t[noisy] = torch.randint(int(0.7 * model.num_timesteps), model.num_timesteps, (int(noisy.sum()),), generator=generator)
        noise = torch.randn(z.shape, generator=generator)
        noise += offset_noise * torch.randn((batch_size, z.shape[1], 1, 1), generator=generator)
        eps = unet(q_sample(z, t, noise, model.alphas_cumprod), t, cond[caption_ids[i]])
        loss = torch.nn.functional.mse_loss(eps, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update_parameters(unet)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    unet.load_state_dict(ema.module.state_dict())
    unet.eval().requires_grad_(False)
    return losses, len(captions)
