"""ldm/toy/shaping.py: the shipped shaping rebuilds the shipped text encoder, and each trait does what it is for."""
import torch
from omegaconf import OmegaConf

from ldm.toy.shaping import SHIPPED, shape_text_encoder

from .conftest import TOY_CKPT, TOY_INFERENCE


def test_the_shipped_text_encoder_is_the_shipped_shaping_of_the_seed_0_init():
    """The toy model's text encoder is never trained: SHIPPED must rebuild the shipped one bit for bit."""
    from ldm.checkpoint import keys_from_sd
    from ldm.util import instantiate_from_config

    torch.manual_seed(0)  # as train_base_model does before drawing the model
    model = instantiate_from_config(OmegaConf.load(TOY_INFERENCE).model)
    shape_text_encoder(model.cond_stage_model)
    prefix = "cond_stage_model.transformer."
    shipped = keys_from_sd(torch.load(TOY_CKPT, weights_only=True)["state_dict"])
    shipped = {k[len(prefix):]: v for k, v in shipped.items() if k.startswith(prefix)}
    rebuilt = model.cond_stage_model.transformer.state_dict()
    assert len(shipped) > 100
    for k, v in shipped.items():
        assert torch.equal(v.float(), rebuilt[k]), k


# The first toy model's shaping (embedding sizes only), and experiment 1 on top of it (README, "The toy world").
PLAIN = SHIPPED._replace(position_scale=30.0, qk_scale=1.0, value_scale=1.0, confidence=0.0, start_scale=1.0,
                         end_scale=1.0, word_queries=())
EXPERIMENT = PLAIN._replace(qk_scale=3.0, value_scale=4.0, confidence=4.0)


def _encoder(shaping):
    from ldm.util import instantiate_from_config

    torch.manual_seed(0)
    encoder = instantiate_from_config(OmegaConf.load("configs/toy/v1-finetune.yaml").model.params.cond_stage_config)
    shape_text_encoder(encoder, shaping)  # with concat_kv: an untrained randn adapter
    return encoder


def test_confident_attention_and_unit_values_keep_an_untrained_adapter_from_moving_the_encoder():
    """The randn extra key/value of an untrained CatVersion adapter repaint the plain toy encoder's prompts; with
    `confidence` and `value_scale` (as in a trained CLIP) they barely move them, and those two change nothing else."""
    prompts = ["square on a blue background", "a red circle on a green background"]

    def outputs(shaping):
        encoder = _encoder(shaping)
        with torch.no_grad():
            adapted = encoder(prompts)
            with encoder.adapter_disabled():
                plain = encoder(prompts)
        words = ((adapted - plain).norm(dim=-1) / plain.norm(dim=-1))[:, 1:7].mean().item()
        return plain, words

    _, plain_change = outputs(PLAIN)
    shaped, shaped_change = outputs(EXPERIMENT)
    assert plain_change > 0.3 and shaped_change < 0.05, (plain_change, shaped_change)
    # the same projected queries and keys with (almost) no shared component: the same outputs
    little_confidence, _ = outputs(EXPERIMENT._replace(confidence=1e-3))
    torch.testing.assert_close(shaped, little_confidence, atol=1e-4, rtol=1e-4)  # exact up to fp16 rounding
    no_value_scale, _ = outputs(EXPERIMENT._replace(value_scale=1.0))
    torch.testing.assert_close(shaped, no_value_scale, atol=1e-4, rtol=1e-4)
    no_qk_scale, _ = outputs(EXPERIMENT._replace(qk_scale=1.0))
    assert not torch.allclose(shaped, no_qk_scale, atol=1e-4, rtol=1e-4)


def _queries(shaping, prompts):
    """{layer: (prompts, tokens, width) queries} of the shaped encoder (its adapter off)."""
    encoder = _encoder(shaping)
    queries = {}
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda module, args, out, i=i: queries.__setitem__(i, out))
             for i, layer in enumerate(encoder.transformer.encoder.layers)]
    with torch.no_grad(), encoder.adapter_disabled():
        encoder(prompts)
    for hook in hooks:
        hook.remove()
    return queries


def test_word_queries_give_each_word_its_own_query_in_every_layer():
    """With the shipped shaping, `circle` has nearly the same query wherever it stands, and other words' queries
    overlap it less than without the refit (random queries overlap, which lets `square` read circle's key), in all
    twelve layers alike, so that no layer choice is favoured."""
    prompts = ["circle", "square on a blue background", "a red circle on a white background"]

    def overlaps(shaping):
        queries = {i: torch.nn.functional.normalize(q, dim=-1) for i, q in _queries(shaping, prompts).items()}
        same = min((q[0, 1] @ q[2, 3]).item() for q in queries.values())
        others = max((q[0, 1] @ q[1, j]).abs().item() for q in queries.values() for j in (1, 3, 4, 5))
        return same, others

    same, others = overlaps(SHIPPED)
    _, unfitted_others = overlaps(SHIPPED._replace(word_queries=()))
    assert SHIPPED.word_queries == tuple(range(12))
    assert same > 0.85 and others < 0.35, (same, others)  # measured: 0.91, 0.25
    assert unfitted_others > 0.45, unfitted_others  # measured: 0.52


def test_a_learned_key_reaches_the_start_token_only_by_reaching_every_token():
    """The start token is in every prompt: a learned key that only it reads changes every prompt. Its shipped query is
    the part every query shares, so a key aimed at it lifts every token's logit as much as the start token's."""
    prompt = "a red circle on a white background"
    n = 1 + len(prompt.split())  # the start token and the words

    def lift(shaping):
        """Per layer: each word's logit gain from a key along the start token's query, over the start token's own."""
        ratios = []
        for q in _queries(shaping, [prompt]).values():
            start, words = q[0, 0], q[0, 1:n]
            ratios.append((words @ start) / (start @ start))
        return torch.stack(ratios)

    shipped = lift(SHIPPED)
    assert shipped.min() > 0.9 and shipped.max() < 1.1, shipped  # measured: 0.975 to 1.016
    unfitted = lift(SHIPPED._replace(word_queries=()))
    assert (unfitted - 1).abs().max() > 0.5, unfitted  # measured: -0.67 to 0.39
