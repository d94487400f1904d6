"""Classifier-free guidance as an epsilon function for the samplers in ddim.py / plms.py."""
import torch


def guided_eps_fn(model, cond, uncond=None, scale=1.0):
    """Build `eps_fn(x, t) -> eps` from a model exposing `apply_model(x, t, cond)`.

    With `scale != 1` the unconditional and conditional predictions come from ONE batched call on
    `cat([uncond, cond])` (unconditional half first, as LDM does) and are combined as
    `uc_eps + scale * (c_eps - uc_eps)`. With `scale == 1` that formula is just `c_eps`, so the
    unconditional half is not evaluated at all. An `uncond` of batch 1 (e.g. the reference's
    pre-computed `uc.pt`) is broadcast to the batch of `cond`.
    """
    if scale == 1.0:
        return lambda x, t: model.apply_model(x, t, cond)
    if uncond is None:
        raise ValueError(f"guidance scale {scale} needs an unconditional conditioning "
                         "(e.g. the empty prompt's embedding); pass it or use scale 1")
    if uncond.shape[0] == 1 and cond.shape[0] > 1:
        uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
    if uncond.shape != cond.shape:
        raise ValueError(f"unconditional conditioning has shape {tuple(uncond.shape)} but conditioning has "
                         f"{tuple(cond.shape)}; encode both with the same text encoder")
    both = torch.cat([uncond, cond])

    def eps_fn(x, t):
        eps_uncond, eps_cond = model.apply_model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return eps_uncond + scale * (eps_cond - eps_uncond)

    return eps_fn
