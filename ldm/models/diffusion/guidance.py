"""Classifier-free guidance as an epsilon function for the samplers in ddim.py / plms.py."""
import torch


def guided_eps_fn(model, cond, uncond=None, scale=1.0):
    """`eps_fn(x, t) -> eps` from a model's `apply_model(x, t, cond)`: `uc_eps + scale * (c_eps - uc_eps)`, from ONE
    batched call on `cat([uncond, cond])` (unconditional half first, as LDM). With scale 1 that is just `c_eps`: the
    unconditional half is not evaluated. An `uncond` of batch 1 (the reference's `uc.pt`) is broadcast to `cond`'s."""
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
