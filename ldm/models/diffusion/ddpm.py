"""LatentDiffusion: frozen SD v1 (UNet, VAE, CLIP) as a Lightning module that trains only a personalization adapter.

The diffusion math lives in plain functions (`ldm.modules.diffusionmodules.util`), the samplers in `ddim.py`/`plms.py`
and the CatVersion mechanism in `ldm.modules.encoders.concat_kv`; this file only wires them together.
"""
import os
from contextlib import contextmanager

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import make_beta_schedule
from ldm.util import instantiate_from_config


class DiffusionWrapper(nn.Module):
    """Keeps the UNet under `model.diffusion_model.` so SD checkpoint keys match."""

    def __init__(self, diff_model_config):
        super().__init__()
        self.diffusion_model = instantiate_from_config(diff_model_config)

    def forward(self, x, t, c_crossattn):
        return self.diffusion_model(x, t, context=c_crossattn)


def q_sample(x_start, t, noise, alphas_cumprod):
    """Sample x_t ~ q(x_t | x_0): sqrt(a_t) x_0 + sqrt(1 - a_t) noise."""
    a = alphas_cumprod[t].view(-1, *([1] * (x_start.dim() - 1)))
    return a.sqrt() * x_start + (1 - a).sqrt() * noise


class LatentDiffusion(pl.LightningModule):
    def __init__(
        self,
        unet_config,
        first_stage_config,
        cond_stage_config,
        timesteps=1000,
        beta_schedule="linear",
        linear_start=0.00085,
        linear_end=0.012,
        first_stage_key="image",
        cond_stage_key="caption",
        image_size=64,
        channels=4,
        scale_factor=0.18215,
        conditioning_key="crossattn",
        parameterization="eps",
        personalization_config=None,
        **ignored,  # reference keys without meaning here (monitor, use_ema, log_every_t, ...)
    ):
        super().__init__()
        if parameterization != "eps" or conditioning_key != "crossattn":
            raise ValueError("only epsilon prediction with cross-attention conditioning (SD v1) is supported")
        self.first_stage_key, self.cond_stage_key = first_stage_key, cond_stage_key
        self.image_size, self.channels, self.scale_factor = image_size, channels, scale_factor
        self.model = DiffusionWrapper(unet_config)
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        # Textual Inversion baseline: learned word embeddings instead of (or besides) CatVersion's K/V.
        self.embedding_manager = None
        if personalization_config is not None:
            self.embedding_manager = instantiate_from_config(personalization_config)
            self.embedding_manager.attach(self.cond_stage_model)
        self.num_timesteps = timesteps
        betas = torch.as_tensor(make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end), dtype=torch.float64)
        # Derived from the config, so not part of the state dict (real checkpoints carry them; the loader ignores them).
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float(), persistent=False)
        self.learning_rate = 1e-4
        self.base_fingerprint = None
        self.strict_loading = False  # resumable checkpoints carry only the trainable tensors
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    # Frozen parts stay in eval mode even while Lightning trains (no dropout, no norm statistics).
    def train(self, mode=True):
        super().train(mode)
        for m in (self.model, self.first_stage_model, self.cond_stage_model):
            m.eval()
        return self

    # --- the three frozen networks -------------------------------------------------------------------
    def get_learned_conditioning(self, prompts):
        return self.cond_stage_model.encode(list(prompts))

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, posterior, generator=None):
        z = posterior.sample(generator=generator) if hasattr(posterior, "sample") else posterior
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)

    def apply_model(self, x_noisy, t, cond):
        return self.model(x_noisy, t, c_crossattn=cond)

    # --- training ------------------------------------------------------------------------------------
    def get_input(self, batch):
        """Images (b, h, w, c) in [-1, 1] as the reference datasets yield them, and their captions."""
        x = batch[self.first_stage_key]
        x = x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()
        z = self.get_first_stage_encoding(self.encode_first_stage(x))
        return z, list(batch[self.cond_stage_key])

    def p_losses(self, z, cond, t, noise=None):
        """Plain MSE between the true and the predicted noise, mean over all elements (`loss_simple`)."""
        noise = torch.randn_like(z) if noise is None else noise
        eps = self.apply_model(q_sample(z, t, noise, self.alphas_cumprod), t, cond)
        return F.mse_loss(eps.float(), noise.float())

    def shared_step(self, batch):
        z, captions = self.get_input(batch)
        t = torch.randint(0, self.num_timesteps, (z.shape[0],), device=self.device)
        return self.p_losses(z, self.get_learned_conditioning(captions), t)

    def training_step(self, batch, batch_idx):
        loss = self.shared_step(batch)
        self.log("train/loss_simple", loss, prog_bar=True, on_step=True, batch_size=len(batch[self.cond_stage_key]))
        opt = self.optimizers()
        self.log("lr-abs", opt.param_groups[0]["lr"], prog_bar=True, on_step=True, logger=True)
        return loss

    def trainable_parameters(self):
        params = list(self.cond_stage_model.adapter_parameters())
        if self.embedding_manager is not None:
            params += list(self.embedding_manager.embedding_parameters())
        return params

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise ValueError("nothing to train: add `concat_kv:` to cond_stage_config.params (or a personalization_config)")
        return torch.optim.AdamW(params, lr=self.learning_rate)

    def save_personalization(self, directory, metadata=None):
        """Write what was learned: the CatVersion adapter files and/or the Textual Inversion `embeddings.pt`."""
        if self.cond_stage_model.adapter_parameters():
            self.cond_stage_model.adapter_save(directory, metadata=metadata)
        if self.embedding_manager is not None:
            os.makedirs(directory, exist_ok=True)
            self.embedding_manager.save(os.path.join(directory, "embeddings.pt"))

    # Lightning checkpoints hold only what trains: a resumable file of kilobytes, not a copy of SD.
    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = {}
        checkpoint["trainable"] = [p.detach().cpu().clone() for p in self.trainable_parameters()]

    def on_load_checkpoint(self, checkpoint):
        with torch.no_grad():
            for p, saved in zip(self.trainable_parameters(), checkpoint["trainable"], strict=True):
                p.copy_(saved)

    @torch.no_grad()
    def log_images(self, captions, ddim_steps=50, scale=10.0, seed=0):
        """DDIM samples for `captions` with the learned concept and, from the same noise, without it."""
        from ldm.models.diffusion.ddim import DDIMSampler

        n, shape = len(captions), (self.channels, self.image_size, self.image_size)
        with self.cond_stage_model.adapter_disabled():
            uc = self.get_learned_conditioning([""] * n)
            c_base = self.get_learned_conditioning(captions)
        c = self.get_learned_conditioning(captions)
        x_T = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)).to(self.device)
        sampler = DDIMSampler(self)
        out = {}
        for key, cond in (("samples", c), ("samples_base", c_base)):
            z, _ = sampler.sample(ddim_steps, n, shape, conditioning=cond, unconditional_guidance_scale=scale,
                                  unconditional_conditioning=uc, eta=0.0, x_T=x_T, verbose=False)
            out[key] = self.decode_first_stage(z)
        return out

    @contextmanager
    def ema_scope(self, context=None):  # the reference's samplers enter it; no EMA here
        yield
