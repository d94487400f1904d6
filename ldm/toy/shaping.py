"""Shape the toy model's random, frozen CLIP text encoder like a trained one; SHIPPED is the shaping it ships with."""
from collections import namedtuple

import torch

from ldm.toy.scenes import scene_batch

Shaping = namedtuple("Shaping", "token_scale position_scale qk_scale value_scale confidence start_scale end_scale "
                                "word_queries")
# What made models/toy/toy-sd.ckpt (toy-sd.json records it as text_*; git history has the flags that varied it).
SHIPPED = Shaping(token_scale=30.0, position_scale=3.0, qk_scale=3.0, value_scale=2.0, confidence=8.0, start_scale=10.0,
                  end_scale=10.0, word_queries=tuple(range(12)))


@torch.no_grad()
def shape_text_encoder(text_encoder, shaping=SHIPPED, seed=0):
    """Give a freshly drawn toy text encoder the traits of a trained CLIP, then round it to fp16: the model ships in
    fp16, and rounding before the UNet trains makes the UNet train against exactly the encoder that is shipped.

    CatVersion's learned key is read by every token whose query points its way: in a trained CLIP the concept's word,
    in a random one nearly every token, so the concept spills into every prompt. SHIPPED (README, "The toy world",
    experiments 1-15) gives the encoder the traits that prevent this:
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
    - `word_queries`: in these layers (all twelve, so that no layer is favoured) the query projection is refitted
      (`separate_word_queries`) so that a word's query agrees across contexts and overlaps other words' less (random
      32-wide queries overlap by cosine 0.4-0.8, so a key that `circle` reads, `square` reads too), and the start
      token's query is zero.
    """
    embeddings = text_encoder.transformer.embeddings
    embeddings.token_embedding.weight.mul_(shaping.token_scale)
    embeddings.position_embedding.weight.mul_(shaping.position_scale)
    config = text_encoder.transformer.config
    embeddings.token_embedding.weight[config.bos_token_id].mul_(shaping.start_scale)
    embeddings.token_embedding.weight[config.eos_token_id].mul_(shaping.end_scale)  # the end token, which also pads
    g = torch.Generator().manual_seed(seed)
    if shaping.word_queries:
        separate_word_queries(text_encoder, shaping.word_queries, seed)
    for layer in text_encoder.transformer.encoder.layers:
        attn = layer.self_attn
        for proj, scale in ((attn.q_proj, shaping.qk_scale), (attn.k_proj, shaping.qk_scale),
                            (attn.v_proj, shaping.value_scale)):
            proj.weight.mul_(scale)
            proj.bias.mul_(scale)
        attn.out_proj.weight.div_(shaping.value_scale)
        if shaping.confidence:
            heads, head_dim = attn.num_heads, attn.head_dim
            u = torch.nn.functional.normalize(torch.randn(heads, head_dim, generator=g), dim=-1)
            query_share = 0.25 / attn.scale  # an extra key gains only 0.25 logit per unit of norm along u
            key_share = shaping.confidence / (query_share * attn.scale)
            for proj, share in ((attn.q_proj, query_share), (attn.k_proj, key_share)):
                weight, bias = proj.weight.view(heads, head_dim, -1), proj.bias.view(heads, head_dim)
                weight.sub_(u[..., None] * torch.einsum("hd,hdi->hi", u, weight)[:, None])
                bias.sub_(u * (u * bias).sum(-1, keepdim=True)).add_(share * u)
    for param in text_encoder.parameters():
        param.copy_(param.half().float())


@torch.no_grad()
def separate_word_queries(text_encoder, layers, seed):
    """In `layers`, refit each query projection (least squares over the world's captions, keeping the queries' mean
    size) so that every token of the world's language gets its own query, orthogonal to the others' at the fit, except
    the start token, whose query is fitted to zero.

    The start token attends only to itself, so its query changes nothing in the model, but a learned key can reach
    it, and it is in every prompt: with a query of its own, the demo's adapter learned to rewrite the start token
    (98% of its attention in layers 10-11) and changed every prompt (pixel change 0.09 on `square`). With a zero query
    (after `confidence` only the share every query has), a learned key can reach it only by reaching every token.

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
        targets[vocabulary == config.bos_token_id] = 0
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
