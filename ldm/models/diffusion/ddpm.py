"""LatentDiffusion: frozen SD v1 (UNet, VAE, CLIP) as a Lightning module that trains only a personalization adapter."""
import os

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.attention import BasicTransformerBlock
from ldm.modules.diffusionmodules.openaimodel import ResBlock
from ldm.modules.diffusionmodules.util import make_beta_schedule
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.rng import collect_rng_states, restore_rng_states
from ldm.util import instantiate_from_config

# The training fast path (`model.params.fast` in the finetune configs, where each option is documented).
# "auto" means: on for a CUDA device, off elsewhere (it pays off on GPUs only).
FAST_DEFAULTS = {
    "cache_latents": True,  # VAE posterior once per (image, flip); still sampled every step: no numeric change
    "cache_text": True,  # frozen text layers below the first adapter once per caption: no numeric change
    "precision": "fp32",  # "fp32" | "bf16" | "auto" (bf16 on CUDA): autocast of the UNet, changes the numbers
    "gradient_checkpointing": "auto",  # true | false | "auto": recompute UNet activations in backward (memory for time)
    "channels_last": "auto",  # true | false | "auto": NHWC UNet convolutions
    "compile": False,  # torch.compile the UNet: minutes of compilation, then faster steps
    # true: TF32 CUDA matmuls and cuDNN convolutions (the authors' torch 1.10 default), set for the whole process and
    # not restored; false leaves torch's own flags alone
    "tf32": False,
}
FAST_VALUES = {"precision": ("fp32", "bf16", "auto"), "gradient_checkpointing": (True, False, "auto"),
               "channels_last": (True, False, "auto")}  # the others: true or false


def q_sample(x_start, t, noise, alphas_cumprod):
    """Sample x_t ~ q(x_t | x_0): sqrt(a_t) x_0 + sqrt(1 - a_t) noise."""
    a = alphas_cumprod[t].view(-1, *([1] * (x_start.dim() - 1)))
    return a.sqrt() * x_start + (1 - a).sqrt() * noise


class LatentDiffusion(pl.LightningModule):
    # `ignored`: keys of the reference's configs that mean nothing here (monitor, use_ema, log_every_t, ...).
    def __init__(self, unet_config, first_stage_config, cond_stage_config, timesteps=1000, beta_schedule="linear",
                 linear_start=0.00085, linear_end=0.012, first_stage_key="image", cond_stage_key="caption",
                 image_size=64, channels=4, scale_factor=0.18215, conditioning_key="crossattn", parameterization="eps",
                 personalization_config=None, fast=None, concepts=None, **ignored):
        super().__init__()
        if parameterization != "eps" or conditioning_key != "crossattn":
            raise ValueError("only epsilon prediction with cross-attention conditioning (SD v1) is supported")
        self.first_stage_key, self.cond_stage_key = first_stage_key, cond_stage_key
        self.image_size, self.channels, self.scale_factor = image_size, channels, scale_factor
        # Several concepts in one run ({data folder name: base class word}): one adapter holding one concept each,
        # batches with each row's concept index (`concept`), each concept's files in a folder of its own.
        self.concept_names = list(concepts or {})
        self.concept_words = dict(concepts or {})
        self.concept_losses = None  # the last step's loss of each concept
        if len(self.concept_names) > 1:
            if personalization_config is not None or "concat_kv" not in cond_stage_config.get("params", {}):
                raise ValueError("several concepts in one run need CatVersion's cond_stage_config.params.concat_kv; "
                                 "Textual Inversion trains one concept per run")
            cond_stage_config = OmegaConf.merge(cond_stage_config, {"params": {"concat_kv": {"concepts": len(concepts)}}})
        self.model = nn.Module()  # keeps the UNet under `model.diffusion_model.`, as in SD checkpoints
        self.model.diffusion_model = instantiate_from_config(unet_config)
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        # Textual Inversion baseline: learned word embeddings instead of (or besides) CatVersion's K/V.
        self.embedding_manager = None
        if personalization_config is not None:
            self.embedding_manager = instantiate_from_config(personalization_config).attach(self.cond_stage_model)
        self.num_timesteps = timesteps
        betas = torch.as_tensor(make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end), dtype=torch.float64)
        # Derived from the config, so not part of the state dict (real checkpoints carry them; the loader ignores them).
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float(), persistent=False)
        self.learning_rate = 1e-4
        self.base_fingerprint = None
        self.strict_loading = False  # resumable checkpoints carry only the trainable tensors
        self.fast = self.check_fast_options(fast)
        self._latent_cache = {}  # (image index, flip) -> VAE moments (1, 2c, h, w)
        self._text_cache = {}  # (caption, first adapted layer) -> hidden states entering that layer (77, width)
        self._compiled_unet = None
        self._channels_last = False  # set by prepare_fast_path, together with the weights' layout
        self._rng_states_to_restore = None  # from a checkpoint, until training starts
        self.requires_grad_(False).eval()

    # Frozen parts stay in eval mode even while Lightning trains (no dropout, no norm statistics).
    def train(self, mode=True):
        super().train(mode)
        for m in (self.model, self.first_stage_model, self.cond_stage_model):
            m.eval()
        return self

    # --- the three frozen networks -------------------------------------------------------------------
    def get_learned_conditioning(self, prompts, concepts=None):
        return self.cond_stage_model.encode(list(prompts), concepts)

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
        if self._channels_last:
            x_noisy = x_noisy.contiguous(memory_format=torch.channels_last)
        compiled = self.fast["compile"] and self._compiled_unet is not None
        unet = self._compiled_unet if compiled else self.model.diffusion_model
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.fast_precision() == "bf16"):
            return unet(x_noisy, t, context=cond)  # the UNet answers in x_noisy's dtype (fp32)

    # --- training ------------------------------------------------------------------------------------
    def get_input(self, batch):
        """Latents sampled from the VAE posterior of the batch's images, and its captions.

        Images are (b, h, w, c) in [-1, 1] as the reference datasets yield them. With `fast.cache_latents` and a batch
        that names its pictures (`index`, `flip`), each picture's posterior is computed once; the sample from it is
        drawn anew every step, as the reference does: the numbers do not change."""
        z = self.get_first_stage_encoding(self._posterior(batch))
        return z, list(batch[self.cond_stage_key])

    def _posterior(self, batch):
        if not self.fast["cache_latents"] or "index" not in batch or "flip" not in batch:
            return self.encode_first_stage(self._images(batch))
        keys = list(zip(_as_list(batch["index"]), (bool(f) for f in _as_list(batch["flip"]))))
        images = None
        for i, key in enumerate(keys):
            if key not in self._latent_cache:
                # One picture at a time: on a CPU a convolution's numbers can depend on the batch it runs in, and a
                # picture's moments must not depend on which others it first came with (a resumed run starts with an
                # empty cache and meets the pictures in other company). Each is encoded once per run: this costs little.
                images = self._images(batch) if images is None else images
                self._latent_cache[key] = self.encode_first_stage(images[i:i + 1]).parameters
        return DiagonalGaussianDistribution(torch.cat([self._latent_cache[key] for key in keys]))

    def _images(self, batch):
        x = batch[self.first_stage_key]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    def get_training_conditioning(self, captions, concepts=None):
        """`get_learned_conditioning(captions, concepts)` for a training step, through the text cache with `fast.cache_text`.

        The frozen layers below the first adapted one see no trainable number, so their output for a caption is
        computed once; each step runs only the adapted layers and the final layer norm, once per distinct caption
        (CatVersion's batches repeat one caption; once per distinct caption and concept with several concepts). Not with
        a Textual Inversion embedding manager: its trainable word embeddings enter at the bottom."""
        enc = self.cond_stage_model
        if not self.fast["cache_text"] or self.embedding_manager is not None:
            return self.get_learned_conditioning(captions, concepts)
        start = enc.first_adapted_layer
        keys = list(zip(captions, [0] * len(captions) if concepts is None else concepts))
        distinct = list(dict.fromkeys(keys))
        for caption, _ in distinct:
            if (caption, start) not in self._text_cache:  # one caption at a time, as the pictures in _posterior
                self._text_cache[(caption, start)] = enc.frozen_hidden_states(enc.tokenize([caption]), start)[0]
        cond = enc.encode_from_hidden(torch.stack([self._text_cache[(c, start)] for c, _ in distinct]), start,
                                      None if concepts is None else [k for _, k in distinct])
        if len(distinct) == 1:
            # A view of the one row: the UNet's cross-attention can then project it once for the whole batch.
            return cond.expand(len(captions), -1, -1)
        row = {key: i for i, key in enumerate(distinct)}
        return torch.cat([cond[row[k]:row[k] + 1] for k in keys])  # slices, not an index tensor: no device copy

    def clear_fast_caches(self):
        """Forget cached latents and text states (they are stale once the frozen weights or the data change)."""
        self._latent_cache.clear()
        self._text_cache.clear()

    def p_losses(self, z, cond, t, noise=None, concepts=None):
        """Plain MSE between the true and the predicted noise, mean over all elements (`loss_simple`).

        With each row's concept index: the SUM of the concepts' own mean losses (kept in `concept_losses`), so that
        each concept's adapter gets exactly the gradient of its own one-concept step, and AdamW, which works element
        by element (weight decay too), steps each concept's numbers as that concept's own run would."""
        noise = torch.randn_like(z) if noise is None else noise
        eps = self.apply_model(q_sample(z, t, noise, self.alphas_cumprod), t, cond)
        if concepts is None:
            return F.mse_loss(eps.float(), noise.float())
        per_row = (eps.float() - noise.float()).pow(2).flatten(1).mean(1)
        index = torch.as_tensor(concepts, device=per_row.device)
        n = len(self.concept_names)
        losses = per_row.new_zeros(n).index_add(0, index, per_row) / torch.bincount(index, minlength=n)
        self.concept_losses = losses.detach()
        return losses.sum()

    def shared_step(self, batch):
        # Random numbers in the reference's order: posterior sample, timesteps, noise.
        z, captions = self.get_input(batch)
        concepts = batch.get("concept")
        t = torch.randint(0, self.num_timesteps, (z.shape[0],), device=self.device)
        return self.p_losses(z, self.get_training_conditioning(captions, concepts), t, concepts=concepts)

    # --- fast-path switches --------------------------------------------------------------------------
    @staticmethod
    def check_fast_options(fast):
        options = {**FAST_DEFAULTS, **dict(fast or {})}
        unknown = sorted(set(options) - set(FAST_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown fast option(s) {unknown}; known: {list(FAST_DEFAULTS)}")
        for name, value in options.items():
            allowed = FAST_VALUES.get(name, (True, False))
            if not any(value is a if isinstance(a, bool) else value == a for a in allowed):  # 1 is not true
                words = [str(a).lower() for a in allowed]
                hint = (("; for fp16 keep fp32 here and set lightning.trainer.precision: 16-mixed (its GradScaler is "
                         "needed)") if name == "precision" else "")
                raise ValueError(f"fast.{name} must be {', '.join(words[:-1])} or {words[-1]}, got {value!r}{hint}")
        return options

    def _fast_on(self, name):
        value = self.fast[name]
        return self.device.type == "cuda" if value == "auto" else value

    def fast_precision(self):
        """The UNet's compute precision on the current device: "fp32" or "bf16"."""
        if self.fast["precision"] != "auto":
            return self.fast["precision"]
        return "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"

    def prepare_fast_path(self):
        """Apply the module-level options for the current device: checkpointing, memory format, compilation.

        Lightning calls it when fitting starts; call it yourself after `.to(device)` when driving the model by hand."""
        checkpointing = self._fast_on("gradient_checkpointing")
        for module in self.model.modules():
            if isinstance(module, (ResBlock, BasicTransformerBlock)):
                module.use_checkpoint = checkpointing
        self._channels_last = self._fast_on("channels_last")
        self.model.to(memory_format=torch.channels_last if self._channels_last else torch.contiguous_format)
        self._hold_unet_weights(torch.bfloat16 if self.fast_precision() == "bf16" else torch.float32)
        if self.fast["tf32"]:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if self.fast["compile"] and self._compiled_unet is None:
            # Kept outside the module tree, so state-dict keys stay free of torch.compile's `_orig_mod.`.
            object.__setattr__(self, "_compiled_unet", torch.compile(self.model.diffusion_model))
        return self

    def _hold_unet_weights(self, dtype):
        """Under bf16 autocast every UNet convolution and linear layer multiplies with the bf16 rounding of its frozen
        weights, cast anew at every use (autocast caches the casts of trainable tensors only): about 750 cast kernels
        and 1.7 GB of traffic per SD training step. Holding those weights in bf16 gives the same numbers without the
        casts, in almost half the memory. Norm weights stay fp32 (the norms run in fp32). Back in fp32 the weights keep
        their bf16 rounding: reload the model for exact fp32 numbers."""
        # The time embedding stays fp32: the UNet casts its inputs (and the text context) to that layer's dtype, and
        # a bf16 context would sum the gradients of its 16 cross-attention uses in bf16 instead of fp32.
        keep = set(self.model.diffusion_model.time_embed.modules())
        for module in self.model.modules():
            if (isinstance(module, (nn.Linear, nn.Conv2d)) and module not in keep
                    and module.weight.dtype in (torch.float32, torch.bfloat16)):
                module.to(dtype)

    def on_fit_start(self):
        self.clear_fast_caches()
        self.prepare_fast_path()

    def on_before_batch_transfer(self, batch, dataloader_idx):
        # Cache keys as Python values before Lightning moves the batch: reading them back from a GPU would wait for
        # the device on every step.
        for key in ("index", "flip", "concept"):
            if isinstance(batch.get(key), torch.Tensor):
                batch[key] = batch[key].tolist()
        return batch

    def training_step(self, batch, batch_idx):
        loss = self.shared_step(batch)
        n, size = max(len(self.concept_names), 1), len(batch[self.cond_stage_key])
        # With several concepts: their mean (comparable with a one-concept run's loss), and each concept's own.
        self.log("train/loss_simple", loss / n, prog_bar=True, on_step=True, batch_size=size)
        if n > 1:
            for name, value in zip(self.concept_names, self.concept_losses):
                self.log(f"train/loss_simple/{name}", value, on_step=True, batch_size=size // n)
        self.log("lr-abs", self.optimizers().param_groups[0]["lr"], prog_bar=True, on_step=True, logger=True)
        return loss

    def trainable_parameters(self):
        extra = [] if self.embedding_manager is None else self.embedding_manager.embedding_parameters()
        return self.cond_stage_model.adapter_parameters() + extra

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise ValueError("nothing to train: add `concat_kv:` to cond_stage_config.params (or a personalization_config)")
        return torch.optim.AdamW(params, lr=self.learning_rate)

    def save_personalization(self, directory, metadata=None):
        """Write what was learned: the CatVersion adapter files and/or the Textual Inversion `embeddings.pt`.

        With several concepts, `<parent>/<name>` becomes `<parent>/<concept folder>/<name>` for each concept."""
        if len(self.concept_names) > 1:
            parent, name = os.path.split(directory)
            for c, concept in enumerate(self.concept_names):
                meta = {**(metadata or {}), "base_class_word": self.concept_words[concept]}
                self.cond_stage_model.adapter_save(os.path.join(parent, concept, name), metadata=meta, concept=c)
        elif self.cond_stage_model.adapter_parameters():
            self.cond_stage_model.adapter_save(directory, metadata=metadata)
        if self.embedding_manager is not None:
            os.makedirs(directory, exist_ok=True)
            self.embedding_manager.save(os.path.join(directory, "embeddings.pt"))

    # Lightning checkpoints hold only what trains: a resumable file of kilobytes, not a copy of SD. And the global
    # random states, so that --resume draws the same timesteps, noise and latent samples as an uninterrupted run
    # (Lightning saves the optimizer and the loops; the data order is the datamodule's state).
    def on_save_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = {}
        checkpoint["trainable"] = [p.detach().cpu().clone() for p in self.trainable_parameters()]
        checkpoint["rng_states"] = collect_rng_states()

    def on_load_checkpoint(self, checkpoint):
        with torch.no_grad():
            for p, saved in zip(self.trainable_parameters(), checkpoint["trainable"], strict=True):
                p.copy_(saved)
        self._rng_states_to_restore = checkpoint.get("rng_states")

    def on_train_start(self):
        # Checkpoints are written between steps, where nothing draws random numbers until the next training step;
        # restoring the states just before the loop starts (not when the file is read) keeps whatever happens
        # during setup from shifting the streams.
        if self._rng_states_to_restore is not None:
            restore_rng_states(self._rng_states_to_restore)
            self._rng_states_to_restore = None

    def sample_prompts(self, batch, limit):
        """(captions, concept indices or None) for sample sheets: the batch's first `limit` captions; with several
        concepts the first caption of each concept, every concept shown whatever `limit`."""
        captions, concepts = list(batch[self.cond_stage_key]), batch.get("concept")
        if concepts is None:
            return captions[:limit], None
        first = {int(k): i for i, k in reversed(list(enumerate(concepts)))}
        return [captions[first[k]] for k in sorted(first)], sorted(first)

    @torch.no_grad()
    def log_images(self, captions, ddim_steps=50, scale=10.0, seed=0, concepts=None):
        """DDIM samples for `captions` with the learned concept(s) (row i through concept `concepts[i]`, if given) and,
        from the same noise, without."""
        n, shape = len(captions), (self.channels, self.image_size, self.image_size)
        with self.cond_stage_model.adapter_disabled():
            uc = self.get_learned_conditioning([""] * n)
            c_base = self.get_learned_conditioning(captions)
        c = self.get_learned_conditioning(captions, concepts)
        x_T = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)).to(self.device)
        sampler = DDIMSampler(self)
        out = {}
        for key, cond in (("samples", c), ("samples_base", c_base)):
            z, _ = sampler.sample(ddim_steps, n, shape, conditioning=cond, unconditional_guidance_scale=scale,
                                  unconditional_conditioning=uc, eta=0.0, x_T=x_T, verbose=False)
            out[key] = self.decode_first_stage(z)
        return out


def _as_list(values):
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)
