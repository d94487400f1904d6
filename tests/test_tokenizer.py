"""The offline SD v1 tokenizer against open_clip's own CLIP tokenizer (an independent implementation)."""
import warnings

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.modules.encoders.tokenizer import build_clip_tokenizer

TINY_TEXT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=12, num_attention_heads=4)

PROMPTS = [
    "", "a", "teddybear", "a photo of a teddybear", "teddybear on the beach", "colorful_teapot bicycle",
    "A PHOTO OF A CAT", "MiXeD CaSe WoRdS", "Tom's dog isn't here, they're gone; we'll see", "rock'n'roll",
    "hello, world! (really?) [yes] {no} <maybe>", "e-mail me at foo@bar.com #tag $5 50% off",
    "3.14159 is pi, 1,000,000 dollars, 2023-11-25", "1234567890 0987654321", "sks_dog v2.0",
    "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\nhere", "multiple     inner     spaces",
    "café au lait, naïve résumé", "Zürich, Ångström, Straße", "東京タワーの写真", "фото кота", "صورة قطة",
    "emoji 🙂🐻🎉 party", "α β γ δ λ", "a...b---c___d", "!!!???", "C++ & C# <html>", "x" * 300,
    "a photo of " + "very " * 80 + "large teddybear", " ".join(str(i) for i in range(100)),
    "upper UNICODE: ÉCOLE ÇA", "under_score and hyphen-ated words",
]


def open_clip_ids(prompts):
    ids = SimpleTokenizer()(prompts, context_length=77)
    ids[ids == 0] = 49407  # open_clip pads with 0, SD v1 with <|endoftext|>
    return ids


def test_ids_match_open_clip_simple_tokenizer():
    assert len(PROMPTS) >= 30
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some prompts are deliberately too long
        ours = FrozenCLIPEmbedder(text_config=TINY_TEXT).tokenize(PROMPTS)
    ref = open_clip_ids(PROMPTS)
    assert ours.dtype == torch.long and ours.shape == (len(PROMPTS), 77)
    mismatched = [p for p, a, b in zip(PROMPTS, ours, ref) if not torch.equal(a, b)]
    assert not mismatched
    assert ours[:, 0].eq(49406).all()
    assert ours[PROMPTS.index("")].tolist() == [49406] + [49407] * 76
    # A batch of short prompts alone is padded to 77 too (SD v1's UNet was trained on 77 context tokens).
    short = ["a", "a photo of a teddybear"]
    assert torch.equal(FrozenCLIPEmbedder(text_config=TINY_TEXT).tokenize(short), open_clip_ids(short))


def test_vocabulary_is_complete():
    tok = build_clip_tokenizer()
    assert len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.model_max_length) == (49406, 49407, 49407, 77)


def test_truncation_warns_once_per_call():
    emb = FrozenCLIPEmbedder(text_config=TINY_TEXT)
    long = "a photo of " + "very " * 100 + "big cat"
    with pytest.warns(UserWarning, match=r"2 prompt\(s\) longer than 77 CLIP tokens were truncated") as record:
        ids = emb.tokenize([long, "short", long])
    assert len(record) == 1
    assert ids[0, -1] == 49407 and ids[0, -2] != 49407  # cut to 75 tokens, then EOS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emb.tokenize(["short", "x " * 75])  # exactly 77 with BOS/EOS: no warning
