"""The SD v1 denoising UNet in the CompVis layout (`model.diffusion_model.*` keys of SD checkpoints).

Only the variant SD v1 uses is built: 2-D, convolutional resampling, plain (not scale-shift) time conditioning,
a SpatialTransformer after the ResBlocks of the levels listed in `attention_resolutions`.
"""
import torch
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import GroupNorm32, Upsample, checkpoint, timestep_embedding, zero_module


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the projected time embedding added in between; 1x1 skip when widths differ."""

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_checkpoint=False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(32, out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self.use_checkpoint, self.training)

    def _forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands each child what it needs: the time embedding, the text context, or neither."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


# Options of the reference's UNet that SD v1 leaves at these values; anything else is refused.
SD_V1_ONLY = {"conv_resample": True, "dims": 2, "num_classes": None, "use_scale_shift_norm": False,
              "resblock_updown": False, "use_spatial_transformer": True, "n_embed": None, "num_head_channels": -1}


class UNetModel(nn.Module):
    """The SD v1 UNet from the CompVis `unet_config.params`, every key named (configs are checked against it).

    `image_size`, `legacy`, `num_heads_upsample`, `use_new_attention_order` and `use_fp16` have no effect: they only
    matter for head widths or attention blocks that SD v1 lacks, and the caller chooses the precision."""

    def __init__(self, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions, dropout=0,
                 channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, num_classes=None, use_checkpoint=False,
                 use_fp16=False, num_heads=-1, num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False,
                 resblock_updown=False, use_new_attention_order=False, use_spatial_transformer=False,
                 transformer_depth=1, context_dim=None, n_embed=None, legacy=True, image_size=None):
        super().__init__()
        given = locals()
        for name, expected in SD_V1_ONLY.items():
            if given[name] != expected:
                raise ValueError(f"UNetModel: {name}={given[name]!r} is not supported (only the SD v1 UNet is); "
                                 f"use {name}={expected!r}")
        if context_dim is None:
            raise ValueError("UNetModel: context_dim is required with a spatial transformer; SD v1 uses context_dim: 768")
        if num_heads < 1:
            raise ValueError(f"UNetModel: num_heads={num_heads} is invalid; SD v1 uses num_heads: 8")

        def attention(ch):
            # SD v1 fixes the number of heads; the head width follows from the level's width.
            return SpatialTransformer(ch, num_heads, ch // num_heads, transformer_depth, dropout, context_dim, use_checkpoint)

        def resblock(ch, out):
            return ResBlock(ch, time_embed_dim, dropout, out_channels=out, use_checkpoint=use_checkpoint)

        self.model_channels = model_channels
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels = [model_channels]  # widths of the activations the decoder half concatenates back
        ch, ds = model_channels, 1  # current width and downsampling factor
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), attention(ch), resblock(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def forward(self, x, timesteps, context=None):
        """Predicted noise for latents x (b, c, h, w) at `timesteps` (b,) or one shared timestep, given the text
        `context` (b, n, context_dim)."""
        if context is None:
            raise ValueError("UNetModel.forward: context is required; pass the text conditioning (b, 77, context_dim)")
        # Compute in the weights' precision, answer in the caller's.
        dtype = self.time_embed[0].weight.dtype
        timesteps = torch.as_tensor(timesteps, device=x.device).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        context = context.to(dtype)
        h = x.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h).to(x.dtype)
