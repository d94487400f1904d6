#!/usr/bin/env python
"""Pretrain the toy world's text-to-image model: the tiny VAE, then the tiny UNet, on captioned scenes.

The scenes (ldm/data/toy_scenes.py) are drawn on the fly from the seed; the CLIP text encoder stays random and frozen
(as SD's stays frozen; see `shape_text_encoder`) and is rounded to fp16 first, so the shipped fp16 file is exactly
the model that was trained.
Writes `--out` in the SD checkpoint format, `<out>.png` (loss curves) and `<out>.json` (command, seed, losses, time).
The shipped models/toy/toy-sd.ckpt was made by the defaults with the VAE of the first toy model (14 minutes on two CPU
cores): `git show 5d938ba:models/toy/toy-sd.ckpt > vae.ckpt && python scripts/train_toy_base.py --vae_from vae.ckpt`.
"""
import argparse
import inspect
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ldm.checkpoint import save_checkpoint  # noqa: E402
from ldm.data.toy_scenes import scene_batch  # noqa: E402
from ldm.models.diffusion.ddpm import q_sample  # noqa: E402
from ldm.util import atomic_write, instantiate_from_config, load_model_from_config  # noqa: E402


@torch.no_grad()
def shape_text_encoder(text_encoder, token_scale=30.0, position_scale=3.0, qk_scale=3.0, value_scale=2.0,
                       confidence=8.0, start_scale=10.0, end_scale=10.0, word_queries=(9, 10, 11), seed=0):
    """Give the random CLIP traits of a trained one, then round it to fp16 (as it is shipped).

    CatVersion's learned key is read by every token whose query points its way: in a trained CLIP the concept's word,
    in a random one nearly every token, so the concept spills into every prompt. The defaults (which made the shipped
    model; README, "The toy world", experiments 1-15) give the encoder the traits that prevent this:
    - `token_scale`, `position_scale`: at transformers' init (0.02 per element) twelve random layers wash the words
      out (`red` and `blue` come out with cosine 0.98); the token embeddings are scaled to CLIP ViT-L's
      residual-stream size, the positions less, so that words rather than positions make the queries.
    - `qk_scale` spreads the logits (q and k each times it); `value_scale` multiplies `v_proj` and divides `out_proj`
      (the model's output is unchanged, its values reach order one).
    - `confidence`: per head, queries and keys share a component along one random direction (their own components
      along it removed), which adds the same `confidence` to every logit of the model's own keys (so its attention
      pattern does not depend on it) but not to a key from outside the model.
    - `start_scale`, `end_scale`: a massive start / end token (the end token also fills the padding), as in trained
      transformers, so that attention barely moves these tokens, which every prompt shares.
    - `word_queries`: in these layers the query projection is refitted (`separate_word_queries`) so that a word's
      query agrees across contexts and overlaps other words' less (random 32-wide queries overlap by cosine 0.4-0.8,
      so a key that `circle` reads, `square` reads too).
    """
    embeddings = text_encoder.transformer.embeddings
    embeddings.token_embedding.weight.mul_(token_scale)
    embeddings.position_embedding.weight.mul_(position_scale)
    config = text_encoder.transformer.config
    embeddings.token_embedding.weight[config.bos_token_id].mul_(start_scale)
    embeddings.token_embedding.weight[config.eos_token_id].mul_(end_scale)  # the end token, which also pads
    g = torch.Generator().manual_seed(seed)
    if word_queries:
        separate_word_queries(text_encoder, word_queries, seed)
    for layer in text_encoder.transformer.encoder.layers:
        attn = layer.self_attn
        for proj, scale in ((attn.q_proj, qk_scale), (attn.k_proj, qk_scale), (attn.v_proj, value_scale)):
            proj.weight.mul_(scale)
            proj.bias.mul_(scale)
        attn.out_proj.weight.div_(value_scale)
        if confidence:
            heads, head_dim = attn.num_heads, attn.head_dim
            u = torch.nn.functional.normalize(torch.randn(heads, head_dim, generator=g), dim=-1)
            query_share = 0.25 / attn.scale  # an extra key gains only 0.25 logit per unit of norm along u
            for proj, share in ((attn.q_proj, query_share), (attn.k_proj, confidence / (query_share * attn.scale))):
                weight, bias = proj.weight.view(heads, head_dim, -1), proj.bias.view(heads, head_dim)
                weight.sub_(u[..., None] * torch.einsum("hd,hdi->hi", u, weight)[:, None])
                bias.sub_(u * (u * bias).sum(-1, keepdim=True)).add_(share * u)
    round_to_fp16(text_encoder)


@torch.no_grad()
def separate_word_queries(text_encoder, layers, seed):
    """In `layers`, refit each query projection (least squares over the world's captions, keeping the queries' mean
    size) so that every token of the world's language gets its own query, orthogonal to the others' at the fit.

    It runs before the logits are spread and the shared component is added, which move these layers' inputs a little:
    on the finished encoder a word's queries agree across contexts (cosine 0.9) and overlap other words' by at most
    about 0.3 instead of 0.5 (the test). Needs one head (a query per head of 8 cannot separate 21 tokens).
    """
    config = text_encoder.transformer.config
    tokens = text_encoder.tokenize(scene_batch(f"{seed}-queries", 1024)[1])
    ends = tokens == config.eos_token_id
    first_end = ends.cumsum(1) - ends.int() == 0  # no end token before: the start token, the words, the first end token
    ids = tokens[first_end]
    vocabulary = ids.unique()
    if len(vocabulary) > config.hidden_size:
        raise ValueError(f"{len(vocabulary)} tokens cannot have orthogonal queries in {config.hidden_size} dimensions")
    g = torch.Generator().manual_seed(seed)
    for index in layers:
        attn = text_encoder.transformer.encoder.layers[index].self_attn
        targets = torch.linalg.qr(torch.randn(attn.head_dim * attn.num_heads, len(vocabulary), generator=g))[0].T
        inputs = []
        hook = attn.q_proj.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
        with text_encoder.adapter_disabled():  # the model's own queries, whether or not an adapter is attached
            text_encoder.encode_tokens(tokens)
        hook.remove()
        x = inputs[0][first_end]
        norm = attn.q_proj(x).norm(dim=-1).mean()
        wanted = norm * targets[torch.searchsorted(vocabulary, ids)]
        solution = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], 1), wanted).solution
        attn.q_proj.weight.copy_(solution[:-1].T)
        attn.q_proj.bias.copy_(solution[-1])


@torch.no_grad()
def round_to_fp16(module):
    """The model ships in fp16: rounding a finished part now makes the rest train against exactly what is shipped."""
    for param in module.parameters():
        param.copy_(param.half().float())


def warmup_cosine(step, total, warmup):
    return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / total))


def train_vae(vae, steps, batch_size, lr, seed, stripe_p, kl_weight=1e-6):
    """L1 reconstruction plus LDM's small KL term (both summed per image, as in LDM's loss); fresh scenes every step."""
    vae.train().requires_grad_(True)
    opt = torch.optim.Adam(vae.parameters(), lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, 50))
    losses = []
    for step in (bar := tqdm(range(steps), desc="VAE", dynamic_ncols=True)):
        x = torch.from_numpy(scene_batch(f"{seed}-vae-{step}", batch_size, stripe_p=stripe_p)[0])
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
def encode_scenes(model, n, seed, stripe_p, batch_size=256):
    """Posterior means and standard deviations of `n` scenes, and each scene's index into the sorted distinct captions."""
    means, stds, captions = [], [], []
    for i in tqdm(range(0, n, batch_size), desc="encode", dynamic_ncols=True):
        x, text = scene_batch(f"{seed}-unet-{i}", min(batch_size, n - i), stripe_p=stripe_p)
        posterior = model.first_stage_model.encode(torch.from_numpy(x))
        means.append(posterior.mean)
        stds.append(posterior.std)
        captions += text
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    return torch.cat(means), torch.cat(stds), torch.tensor([index[c] for c in captions]), unique


def train_unet(model, n_scenes, steps, batch_size, lr, seed, stripe_p, text_lr=0.0, ema_decay=0.999, offset_noise=0.3,
               noisy_share=0.5):
    """The LDM objective (predict the noise), on latents sampled from cached posteriors, with two changes that make a
    short training listen to its captions.

    On 8x8 latents an image's mean colour shows through the noise even at the last timestep (averaging 64 pixels), so a
    UNet can denoise well while ignoring the text, and then it draws colours from the starting noise instead of the
    prompt. `offset_noise` adds a per-image, per-channel constant of that standard deviation to the noise (the
    "offset noise" of SD fine-tunes), which hides the mean colour; `noisy_share` of every batch draws its timestep
    from the noisiest 30%, where the caption decides the colours, instead of uniformly. With `text_lr` the text
    encoder trains along (an experiment: SD's stays frozen, the original LDM text-to-image model trained its own).
    """
    means, stds, caption_ids, captions = encode_scenes(model, n_scenes, seed, stripe_p)
    text_encoder = model.cond_stage_model
    tokens = text_encoder.tokenize(captions)
    trained = torch.nn.ModuleDict({"unet": model.model})
    groups = [{"params": model.model.parameters(), "lr": lr}]
    if text_lr:
        trained["text"] = text_encoder.transformer
        groups.append({"params": text_encoder.transformer.parameters(), "lr": text_lr})
    else:
        with torch.no_grad():
            cond = torch.cat([text_encoder.encode_tokens(tokens[i:i + 256]) for i in range(0, len(tokens), 256)])
    trained.train().requires_grad_(True)
    ema = torch.optim.swa_utils.AveragedModel(trained, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay))
    opt = torch.optim.AdamW(groups, lr, weight_decay=0.0)
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
        context = text_encoder.encode_tokens(tokens[caption_ids[i]]) if text_lr else cond[caption_ids[i]]
        eps = model.model(q_sample(z, t, noise, model.alphas_cumprod), t, context)
        loss = torch.nn.functional.mse_loss(eps, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update_parameters(trained)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    trained.load_state_dict(ema.module.state_dict())
    trained.eval().requires_grad_(False)
    if text_lr:
        round_to_fp16(text_encoder)
    return losses, len(captions)


def plot_losses(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (title, values) in zip(axes[0], curves.items()):
        k = max(1, len(values) // 100)
        smooth = torch.tensor(values).unfold(0, k, k).mean(1) if len(values) >= k else torch.tensor(values)
        ax.plot(range(0, k * len(smooth), k), smooth.tolist())
        ax.set(title=title, xlabel="step", yscale="log")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="models/toy/toy-sd.ckpt", help="SD checkpoint to write (.ckpt or .safetensors)")
    p.add_argument("--config", default="configs/toy/v1-inference.yaml", help="model config")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the scenes and the noise")
    p.add_argument("--vae_steps", type=int, default=1000, help="VAE training steps")
    p.add_argument("--vae_batch_size", type=int, default=16, help="VAE batch size")
    p.add_argument("--vae_lr", type=float, default=1e-3, help="VAE peak learning rate")
    p.add_argument("--unet_steps", type=int, default=4500, help="UNet training steps")
    p.add_argument("--unet_batch_size", type=int, default=64, help="UNet batch size")
    p.add_argument("--unet_lr", type=float, default=1e-3, help="UNet peak learning rate")
    p.add_argument("--scenes", type=int, default=40000, help="scenes the UNet sees (encoded once)")
    p.add_argument("--stripe_p", type=float, default=0.25, help="share of scenes whose object is striped in two colours")
    # --text_<knob> are shape_text_encoder's knobs; its defaults (the shipped shaping) are the defaults here.
    shaping = {name: param.default for name, param in inspect.signature(shape_text_encoder).parameters.items()
               if name not in ("text_encoder", "seed")}
    p.add_argument("--text_token_scale", type=float, default=shaping["token_scale"],
                   help="factor on the random CLIP's token embeddings")
    p.add_argument("--text_position_scale", type=float, default=shaping["position_scale"],
                   help="factor on its position embeddings")
    p.add_argument("--text_qk_scale", type=float, default=shaping["qk_scale"], help="factor on its query and key projections")
    p.add_argument("--text_value_scale", type=float, default=shaping["value_scale"],
                   help="factor on its values (out_proj divided by it)")
    p.add_argument("--text_confidence", type=float, default=shaping["confidence"],
                   help="logit its own keys get over a key from outside the model (see shape_text_encoder)")
    p.add_argument("--text_start_scale", type=float, default=shaping["start_scale"],
                   help="extra factor on the start token's embedding")
    p.add_argument("--text_end_scale", type=float, default=shaping["end_scale"],
                   help="extra factor on the end token's embedding (which also pads the 77 positions)")
    p.add_argument("--text_word_queries", type=int, nargs="*", default=shaping["word_queries"],
                   help="layers whose queries are refitted to be orthogonal between the world's words")
    p.add_argument("--text_lr", type=float, default=0.0,
                   help="train the text encoder with the UNet at this peak learning rate (0: it stays as drawn)")
    p.add_argument("--vae_from", default=None,
                   help="take the (trained) VAE from this toy checkpoint instead of training one (text-encoder and UNet "
                        "experiments; the VAE depends only on the seed, --stripe_p, the --vae_* options and the concept the world "
                        "leaves out)")
    p.add_argument("--fp32", action="store_true", help="write fp32 weights (default fp16, as shipped)")
    opt = p.parse_args(argv)
    start = time.time()
    torch.manual_seed(opt.seed)
    config = OmegaConf.load(opt.config)
    model = instantiate_from_config(config.model)
    shape_text_encoder(model.cond_stage_model, **{name: getattr(opt, f"text_{name}") for name in shaping}, seed=opt.seed)
    if opt.vae_from:  # after the fresh model is drawn, so that its UNet and text encoder are those of a full run
        donor = load_model_from_config(config, opt.vae_from, verbose=False)
        model.first_stage_model.load_state_dict(donor.first_stage_model.state_dict())
    report = {"command": " ".join(["python", "scripts/train_toy_base.py", *(argv if argv is not None else sys.argv[1:])]),
              "seed": opt.seed, "options": vars(opt), "torch": torch.__version__, "threads": torch.get_num_threads()}

    curves = {}
    if not opt.vae_from:
        curves["VAE reconstruction (mean |error|, [-1, 1] pixels)"] = vae_losses = train_vae(
            model.first_stage_model, opt.vae_steps, opt.vae_batch_size, opt.vae_lr, opt.seed, opt.stripe_p)
        images = torch.from_numpy(scene_batch(f"{opt.seed}-rescale", 512, stripe_p=opt.stripe_p)[0])
        report["vae_rescale"] = rescale_latents(model.first_stage_model, images, model.scale_factor)
        report["vae_l1_last100"] = statistics.mean(vae_losses[-100:])
    unet_losses, report["distinct_captions"] = train_unet(model, opt.scenes, opt.unet_steps, opt.unet_batch_size,
                                                          opt.unet_lr, opt.seed, opt.stripe_p, opt.text_lr)
    curves["UNet noise-prediction loss"] = unet_losses
    report["unet_loss_last200"] = statistics.mean(unet_losses[-200:])
    report["minutes"] = (time.time() - start) / 60

    save_checkpoint(model, opt.out, dtype=None if opt.fp32 else torch.float16,
                    extra={"betas": model.betas, "alphas_cumprod": model.alphas_cumprod})
    stem = os.path.splitext(opt.out)[0]
    plot_losses(curves, stem + ".png")
    atomic_write(stem + ".json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1) + "\n"))
    print(f"Wrote {opt.out} ({os.path.getsize(opt.out) / 2**20:.1f} MiB), {stem}.png and {stem}.json "
          f"in {report['minutes']:.1f} min")


if __name__ == "__main__":
    main()
