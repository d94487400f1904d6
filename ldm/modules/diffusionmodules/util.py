"""Small building blocks shared by the UNet and the diffusion wrapper (CompVis `diffusionmodules/util.py` layout)."""
import math

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


def make_beta_schedule(schedule, n_timestep, linear_start=1e-4, linear_end=2e-2):
    """Noise variances beta_1..beta_T as a float64 numpy array.

    SD v1 uses "linear", which (despite the name) is linear in sqrt(beta): linspace(sqrt(start), sqrt(end), T) ** 2.
    """
    if schedule != "linear":
        raise ValueError(f"unsupported beta schedule {schedule!r}; SD v1 uses beta_schedule: linear")
    return np.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=np.float64) ** 2


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (N,) -> (N, dim), cosines first as in SD."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module):
    """Zero a module's parameters: a freshly built residual branch then starts as the identity."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution (the UNet's and the VAE's, same keys)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class GroupNorm32(nn.GroupNorm):
    # Normalises in float32 even in a half-precision model, as the reference does, to avoid overflow.
    def forward(self, x):
        weight, bias = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def checkpoint(func, inputs, enabled, training=False):
    """func(*inputs), recomputing its activations during backward instead of storing them when `enabled` and autograd
    records a graph through this block: grad mode on and the module trains or an input needs a gradient (CatVersion:
    the frozen UNet back-propagates into the text conditioning)."""
    needs_graph = training or any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs)
    if enabled and torch.is_grad_enabled() and needs_graph:
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
