"""CatVersion's learned keys and values, concatenated to the CLIP text encoder's self-attention.

For each covered layer, `num_tokens` extra key and value vectors, already in head space (they never pass through
`k_proj`/`v_proj`), are *prepended* to the layer's keys and values. All 77 queries see them (the causal mask only
restricts the ordinary tokens), and their logits get `logit_bias` added: the reference concatenated a tensor of ones
to its additive causal mask, so its released adapters were trained with +1.0 (0.0 gives the "clean" variant).

All numbers live in ONE flat parameter `control_trans` in the reference layout, read as
`view(batch, num_tokens, n_layers * 2, heads, head_dim).permute(2, 0, 3, 1, 4).split(2)`: index 2*i along the
`n_layers * 2` axis holds the keys of the i-th covered layer, 2*i+1 its values. With `concepts` = n > 1 it holds n
such blocks (one concept each, trained together); `kv(layer, batch, concept)` gives each row its own concept's K/V.

Strength s (inference): log(s) is added to the extra logits, as if the concept token appeared s times. s = 1 is the
adapter as trained; s = 0 bypasses it, so the text encoder is bit for bit the base model.

`concat_kv_attention` is the transformers attention implementation "catversion". It finds the extra K/V of the module
it serves in the `catversion_kv` keyword (attention module -> [(keys, values, logit offset)], one per active adapter),
which `CLIPTextModel.forward(**kwargs)` hands down to every attention call. transformers builds no mask for an
implementation without a mask function, so the layers get attention_mask=None and is_causal=True, exactly as with
"sdpa" (SD v1 conditioning never passes a padding mask).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

ATTN_IMPLEMENTATION = "catversion"


class ConcatKV(nn.Module):
    def __init__(self, width, heads, layers=(9, 10, 11), num_tokens=1, init="randn", logit_bias=1.0, strength=1.0,
                 concepts=1):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads; check the text encoder config")
        if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
            raise ValueError(f"concat_kv layers must be distinct non-negative layer indices, got {list(layers)}")
        if num_tokens < 1:
            raise ValueError(f"concat_kv num_tokens must be >= 1, got {num_tokens}")
        if init not in ("randn", "zeros"):
            raise ValueError(f"concat_kv init must be 'randn' (as the reference) or 'zeros', got {init!r}")
        if concepts < 1:
            raise ValueError(f"concat_kv concepts must be >= 1, got {concepts}")
        self.width, self.heads = int(width), int(heads)
        self.layers, self.num_tokens = [int(i) for i in layers], int(num_tokens)
        self.logit_bias = float(logit_bias)
        self.strength, self.concepts = strength, int(concepts)
        numel = self.concepts * self.num_tokens * len(self.layers) * 2 * self.width
        # Standard normal with no scaling, as the reference (concept 0 starts as a one-concept adapter would).
        self.control_trans = nn.Parameter(torch.randn(numel) if init == "randn" else torch.zeros(numel))

    @property
    def strength(self):
        return self._strength

    @strength.setter
    def strength(self, s):
        if not s >= 0 or math.isinf(s):
            raise ValueError(f"adapter strength must be a finite number >= 0 (0 = base model, 1 = as trained), got {s}")
        self._strength = float(s)

    @property
    def logit_offset(self):
        """What is added to the extra columns' logits: the trained bias plus log(strength)."""
        return self.logit_bias + math.log(self.strength)

    def concept(self, c):
        """Concept c's numbers: what a one-concept adapter's `control_trans` holds."""
        return self.control_trans.view(self.concepts, -1)[c]

    def kv(self, layer, batch, concept=None):
        """(extra_k, extra_v) of `layer` (a layer index), each (batch, heads, num_tokens, head_dim); with several
        concepts, row r gets concept `concept[r]`'s (a LongTensor of `batch` indices)."""
        if concept is None and self.concepts > 1:
            raise ValueError(f"this adapter holds {self.concepts} concepts; pass each batch row's concept index")
        i = self.layers.index(layer)
        per_layer = self.control_trans.view(self.concepts, self.num_tokens, len(self.layers) * 2, self.heads, -1)
        k, v = per_layer.permute(2, 0, 3, 1, 4)[2 * i:2 * i + 2]
        if self.concepts == 1:
            return k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
        return k[concept], v[concept]


def concat_kv_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, catversion_kv=None, **kwargs):
    """transformers attention function: SDPA over [extra K/V of all active adapters, then the layer's own K/V]."""
    extra = (catversion_kv or {}).get(module)
    if not extra:
        # Plain layer: exactly what the stock "sdpa" implementation computes (causal via is_causal).
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if attention_mask is not None:
        raise ValueError("CatVersion's extra K/V do not support an attention_mask; SD v1 conditioning passes none")
    n = query.shape[2]
    # Explicit mask, never is_causal: torch aligns is_causal to the top-left corner, which would hide
    # ordinary keys once the extra keys are prepended.
    causal = torch.full((n, n), float("-inf"), dtype=query.dtype, device=query.device).triu(1)
    columns = [torch.full((n, k.shape[2]), offset, dtype=query.dtype, device=query.device) for k, _, offset in extra]
    mask = torch.cat(columns + [causal], dim=1)
    keys = torch.cat([k.to(key.dtype) for k, _, _ in extra] + [key], dim=2)
    values = torch.cat([v.to(value.dtype) for _, v, _ in extra] + [value], dim=2)
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, concat_kv_attention)
