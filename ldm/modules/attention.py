"""The SD v1 spatial transformer: self-attention, cross-attention to the text, GEGLU feed-forward.

Module and parameter names follow the CompVis code so that SD v1 checkpoints load as they are.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import checkpoint, zero_module


class CrossAttention(nn.Module):
    """Multi-head attention from `query_dim` tokens to `context_dim` tokens (to themselves when context is None)."""

    # A callable `probs_hook(module, probs)` set on an instance (by `ldm.analysis.attention_maps`) to record its
    # attention: the probabilities are then computed explicitly, softmax(QK^T / sqrt(d)), shape (b, heads, queries,
    # keys), handed to the hook and used for the output. None (the default) keeps the fused SDPA kernel.
    probs_hook = None

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None):
        context = x if context is None else context
        b = x.shape[0]
        if b > 1 and context.stride(0) == 0:
            # One context expand()ed over the batch (a training batch of one caption): its keys and values are the
            # same for every image, so project it once (forward and backward).
            k, v = (proj(context[:1]).expand(b, -1, -1) for proj in (self.to_k, self.to_v))
        else:
            k, v = self.to_k(context), self.to_v(context)
        # (b, n, heads * d) -> (b, heads, n, d); SDPA's default scale 1/sqrt(d) is the reference's.
        q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (self.to_q(x), k, v))
        if self.probs_hook is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            probs = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).float().softmax(dim=-1)
            self.probs_hook(self, probs)
            out = probs.to(v.dtype) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[3]))


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class BasicTransformerBlock(nn.Module):
    """Pre-norm residual block: self-attention (attn1), cross-attention to the context (attn2), feed-forward."""

    def __init__(self, dim, n_heads, d_head, dropout=0.0, context_dim=None, checkpoint=False):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = nn.Module()  # a namespace for the CompVis keys `ff.net.0.proj`, `ff.net.2`
        self.ff.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Dropout(dropout), nn.Linear(dim * 4, dim))
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = checkpoint

    def forward(self, x, context=None):
        return checkpoint(self._forward, (x, context), self.use_checkpoint, self.training)

    def _forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff.net(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map; 1x1 convolutions in and out (the SD v1 variant)."""

    def __init__(self, in_channels, n_heads, d_head, depth=1, dropout=0.0, context_dim=None, use_checkpoint=False):
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dim, checkpoint=use_checkpoint)
            for _ in range(depth)
        )
        self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))

    def forward(self, x, context=None):
        b, _, h, w = x.shape
        x_in = x
        x = self.proj_in(self.norm(x))
        x = x.flatten(2).transpose(1, 2)  # (b, h*w, c)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        # Back to (b, c, h, w) in the input's memory layout: the bare view is NHWC-strided, and every convolution and
        # norm after it would convert layouts (UNet forward+backward 1.6x slower on a CPU).
        nhwc = x_in.is_contiguous(memory_format=torch.channels_last) and not x_in.is_contiguous()
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        x = x.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        return self.proj_out(x) + x_in
