"""The SD v1 CLIP tokenizer, built offline: OpenAI CLIP's byte-level BPE vocabulary, derived as CLIP derives it from
the merges file that ships inside `open_clip_torch`, handed to transformers' fast `CLIPTokenizer` in memory.

transformers 5.x takes `vocab=`/`merges=`; the 4.x spelling `vocab_file=` silently yields an empty vocabulary, which
is why the tests compare ids against open_clip's own `SimpleTokenizer`.
"""
import functools
import gzip
import importlib.util
import os

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408


def _byte_symbols():
    """OpenAI CLIP's stand-in for each of the 256 bytes, in the order of the first 256 ids: printable Latin-1 bytes
    stand for themselves, the others (control chars, space, ...) for code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def bpe_path():
    """open_clip's merges file, found without importing open_clip (that import takes seconds)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise ModuleNotFoundError("the CLIP vocabulary ships with open_clip_torch; pip install open_clip_torch")
    return os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges():
    """(vocab dict token->id, merges list of pairs) of the 49,408-entry CLIP vocabulary."""
    with gzip.open(bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is a version header; CLIP keeps the first 49152 - 256 - 2 merges (48,894) so that
    # 256 bytes + 256 word-final bytes + merges + 2 specials = 49,408 ids.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(max_length=77):
    """transformers `CLIPTokenizer` with SD v1 ids: BOS 49406, EOS 49407, padding with EOS (49407)."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)
