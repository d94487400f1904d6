"""Which pixels each prompt token steers: the UNet's cross-attention maps, as in the reference's prompt-to-prompt
notebook (averaged over heads, layers and steps), and automatic concept masks made from them. SD v1 has five
cross-attention layers at each of 1, 2 and 4 times below the latent side and one at 8; 4 (16x16 at 512 px) is the
default, or the factor nearest to it that a model has (the toy model: 1 and 2).
"""
import math

import torch
import torch.nn.functional as F

from ldm.modules.attention import BasicTransformerBlock, SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import Downsample


class CrossAttentionRecorder:
    """`with CrossAttentionRecorder(unet, pixels, batch) as rec:` sample; then `rec.mean()` -> (batch, pixels, 77).

    While active, the cross-attention layers (`attn2`) with `pixels` (h * w) query positions hand their probabilities
    (batch, heads, pixels, 77) to it (see `CrossAttention.probs_hook`); it keeps the last `batch` rows (LDM puts the
    conditional half of a guidance batch second). `keep_raw=True` also keeps each call's as `(layer name, probs)`.
    """

    def __init__(self, unet, pixels, batch=1, keep_raw=False):
        self.layers = {block.attn2: name + ".attn2" for name, block in unet.named_modules()
                       if isinstance(block, BasicTransformerBlock)}
        if not self.layers:
            raise ValueError("no cross-attention layers found; pass the UNet (model.model.diffusion_model)")
        self.pixels, self.batch, self.keep_raw = int(pixels), int(batch), keep_raw
        self.total, self.calls, self.raw, self.seen = 0, 0, [], set()

    def __enter__(self):
        for module in self.layers:
            module.probs_hook = self._record
        return self

    def __exit__(self, *exc):
        for module in self.layers:
            del module.probs_hook  # back to the class default None: the fused SDPA path
        return False

    def _record(self, module, probs):
        self.seen.add(probs.shape[-2])
        if probs.shape[-2] != self.pixels:
            return
        probs = probs[-self.batch:].detach().float()
        if self.keep_raw:
            self.raw.append((self.layers[module], probs.cpu()))
        self.total = self.total + probs.mean(dim=1)
        self.calls += 1

    def mean(self):
        """Average over heads, layers and steps: (batch, pixels, tokens), on the CPU."""
        if not self.calls:
            raise ValueError(f"no cross-attention layer with {self.pixels} pixels ran; the layers seen have "
                             f"{sorted(self.seen, reverse=True)} pixels: pick another --attn_downsample")
        return (self.total / self.calls).cpu()


def attention_factors(unet):
    """The factors of the latent side at which `unet` has cross-attention layers, ascending ([1, 2, 4, 8] for SD v1),
    read from the encoder half and the middle block (the decoder mirrors the encoder)."""
    factors, ds = set(), 1
    for block in [*unet.input_blocks, unet.middle_block]:
        if any(isinstance(m, SpatialTransformer) for m in block.modules()):
            factors.add(ds)
        if any(isinstance(m, Downsample) for m in block.modules()):
            ds *= 2
    return sorted(factors)


def pick_downsample(factors, latent_h, latent_w, wanted=None):
    """`wanted` (a ValueError if the model has no cross-attention there or it does not divide the latent), or by
    default the factor nearest to 4 on a log scale (the coarser of two equally near) among those that divide it."""
    usable = [f for f in factors if latent_h % f == 0 and latent_w % f == 0]
    if wanted is not None and wanted not in factors:
        raise ValueError(f"--attn_downsample {wanted}: this model has no cross-attention layers {wanted} times smaller "
                         f"than the latent, only {', '.join(map(str, factors))}; pass one of those or omit the flag")
    if wanted is not None and wanted not in usable:
        raise ValueError(f"--attn_downsample {wanted} does not divide the latent {latent_h}x{latent_w} (image / 8); "
                         f"pick a smaller factor or an image side that is a multiple of {8 * wanted}")
    if not usable:
        raise ValueError(f"no cross-attention layer of this model fits the latent {latent_h}x{latent_w}: its layers "
                         f"are {', '.join(map(str, factors))} times smaller; pick an image side that is a multiple of "
                         f"{8 * max(factors)}")
    return wanted or min(usable, key=lambda f: (abs(math.log2(f) - 2), -f))


def prompt_positions(embedder, prompt, embedding_manager=None):
    """[(position, token id, text)] from BOS to the first EOS of `prompt`, as the text encoder sees its positions.

    With a Textual Inversion `embedding_manager`, a placeholder of n vectors fills n positions (see its `expand_ids`).
    """
    ids = embedder.tokenize([prompt])
    if embedding_manager is not None:
        ids = embedding_manager.expand_ids(ids)
    ids = ids[0].tolist()
    eos = embedder.tokenizer.eos_token_id
    end = ids.index(eos) if eos in ids else len(ids) - 1
    return [(i, t, embedder.tokenizer.decode([t]).strip()) for i, t in enumerate(ids[: end + 1])]


def word_positions(embedder, positions, word):
    """Positions of every occurrence of `word`'s token sequence among `positions` (from `prompt_positions`)."""
    word_ids = embedder.tokenizer(word, add_special_tokens=False).input_ids
    ids = [t for _, t, _ in positions]
    found = [p for i in range(len(ids) - len(word_ids) + 1) if ids[i:i + len(word_ids)] == word_ids
             for p in range(i, i + len(word_ids))]
    if not word_ids or not found:
        shown = " ".join(text for _, _, text in positions[1:-1])
        raise ValueError(f"--mask_token {word!r} is not in the prompt (its tokens: {shown}); pass a word of the "
                         "prompt, usually the concept's class word")
    return sorted(set(found))


def upsample_normalised(maps, size):
    """Maps (..., h, w) -> bilinear to `size` (H, W), then each min-max normalised to [0, 1] (constant -> ones)."""
    lead = maps.shape[:-2]
    up = F.interpolate(maps.reshape(-1, 1, *maps.shape[-2:]).float(), size=size, mode="bilinear", align_corners=False)
    lo = up.amin(dim=(-2, -1), keepdim=True)
    span = up.amax(dim=(-2, -1), keepdim=True) - lo
    out = torch.where(span > 0, (up - lo) / span.clamp_min(torch.finfo(up.dtype).tiny), torch.ones_like(up))
    return out.reshape(*lead, *size)


def concept_mask(maps, positions, size, threshold=0.5):
    """Boolean (H, W) mask from one image's maps (tokens, h, w): mean over `positions`, normalised, >= threshold."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"--mask_threshold {threshold} must lie strictly between 0 and 1 (0.5 is a usual choice)")
    return upsample_normalised(maps[positions].mean(dim=0), size) >= threshold


def heat_overlay(image, heat, alpha=0.5):
    """uint8 (H, W, 3) image blended with a normalised heat map (H, W) in matplotlib's 'jet' colours."""
    from matplotlib import colormaps

    colours = torch.from_numpy(colormaps["jet"](heat.numpy())[..., :3]).float() * 255.0
    return ((1 - alpha) * image.float() + alpha * colours).round().clamp(0, 255).to(torch.uint8)
