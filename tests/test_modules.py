"""FrozenCLIPEmbedder without adapters: the same conditioning as a stock transformers CLIPTextModel."""
import torch
from omegaconf import OmegaConf
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.util import instantiate_from_config

TINY_TEXT = OmegaConf.to_container(OmegaConf.load("configs/tiny/v1-inference.yaml").model.params.cond_stage_config.params.text_config)
PROMPTS = ["a teddybear on the beach", "", "colorful_teapot bicycle, 4k photo"]


def vanilla_copy(emb, attn_implementation):
    """A stock CLIPTextModel (fresh config, so nothing of ours leaks in) holding the embedder's weights."""
    config = CLIPTextConfig(**emb.transformer.config.to_dict())
    model = CLIPTextModel._from_config(config, attn_implementation=attn_implementation).eval()
    model.load_state_dict(emb.transformer.state_dict())
    assert model.config._attn_implementation == attn_implementation
    return model


def test_plain_conditioning_equals_vanilla_clip_text_model():
    emb = FrozenCLIPEmbedder(text_config=TINY_TEXT)
    ids = emb.tokenize(PROMPTS)
    with torch.no_grad():
        ours = emb(PROMPTS)
        eager = vanilla_copy(emb, "eager")(input_ids=ids).last_hidden_state
        sdpa = vanilla_copy(emb, "sdpa")(input_ids=ids).last_hidden_state
    assert ours.shape == (3, 77, 64)
    assert (ours - eager).abs().max() < 1e-5
    assert torch.equal(ours, sdpa)  # no adapter: the stock SDPA path, bit for bit
    assert torch.equal(emb.encode(PROMPTS), ours) and torch.equal(emb.encode_tokens(ids), ours)


def test_vit_l_defaults_and_reference_kwargs():
    emb = FrozenCLIPEmbedder(version="openai/clip-vit-large-patch14", device="cpu")
    c = emb.transformer.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (768, 12, 12, 3072)
    assert (c.hidden_act, c.max_position_embeddings, c.vocab_size, c.eos_token_id, c.pad_token_id) == ("quick_gelu", 77, 49408, 49407, 49407)
    # 123,060,480 parameters: the text tower of SD v1 (CLIP ViT-L/14).
    assert sum(p.numel() for p in emb.parameters()) == 123060480


def test_frozen_and_config_instantiation():
    cfg = OmegaConf.load("configs/tiny/v1-finetune.yaml").model.params.cond_stage_config
    emb = instantiate_from_config(cfg)
    emb.train()
    assert not emb.transformer.training
    assert not any(p.requires_grad for p in emb.transformer.parameters())
    assert [p.shape for p in emb.adapter_parameters()] == [(3 * 2 * 64,)]
    assert emb.adapters[0].layers == [9, 10, 11] and emb.adapters[0].logit_bias == 1.0


def test_adapter_stays_out_of_state_dict_but_moves_with_to():
    emb = FrozenCLIPEmbedder(text_config=TINY_TEXT, concat_kv={})
    plain = FrozenCLIPEmbedder(text_config=TINY_TEXT)
    assert emb.state_dict().keys() == plain.state_dict().keys()
    assert not any("control_trans" in k for k in emb.state_dict())
    plain.load_state_dict(emb.state_dict(), strict=True)
    param = emb.adapter_parameters()[0]
    emb.to(torch.float64)
    assert emb.adapter_parameters()[0] is param and param.dtype == torch.float64  # optimizers keep their reference
    with torch.no_grad():
        assert emb(["a cat"]).dtype == torch.float64
