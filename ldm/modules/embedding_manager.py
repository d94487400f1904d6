"""Textual Inversion (Gal et al., arXiv 2208.01618), the word-embedding baseline CatVersion is compared against.

A forward hook on CLIP's token embedding puts learned vectors in place of each placeholder token (the reference's
`*`), before the position embeddings are added, where the reference's `EmbeddingManager` works. Placeholder and
initializer must each be ONE CLIP token. With n vectors per placeholder its position becomes n positions, the rest
of the prompt moves right and is cut back to 77 tokens, as in the reference.

The vectors stay out of `state_dict()` and `parameters()` (SD checkpoints load strictly; LatentDiffusion's freezing
leaves them trainable) but follow `.to()`. Start value: the initializer word's embedding (`torch.rand` without one),
by default PLUS the position-0 embedding, the reference's quirk (it ran the word through the whole embedding layer).
Vectors still at their start value are re-initialised whenever the embedding layer is (re)loaded, since a
LatentDiffusion attaches the manager before the SD weights are loaded.

`embeddings.pt` is the reference's format: `{"string_to_token": {s: 0-dim int64}, "string_to_param": {s: (n, width)}}`,
read with `weights_only=True` (the reference's `nn.ParameterDict` is allowed by name).
"""
import os

import torch
from torch import nn

from ldm.files import atomic_write
from ldm.weights import load


class EmbeddingManager(nn.Module):
    def __init__(self, placeholder_strings=("*",), initializer_words=None, num_vectors_per_token=1,
                 init_with_position_embedding=True, per_image_tokens=False, progressive_words=False):
        super().__init__()
        if per_image_tokens or progressive_words:
            raise ValueError("per_image_tokens and progressive_words are not supported; set both to false")
        placeholder_strings = list(placeholder_strings or ())
        if not placeholder_strings or len(set(placeholder_strings)) != len(placeholder_strings):
            raise ValueError(f"placeholder_strings must be distinct and at least one, got {placeholder_strings}; e.g. ['*']")
        initializer_words = list(initializer_words or ())
        if len(initializer_words) > len(placeholder_strings):
            raise ValueError(f"{len(initializer_words)} initializer_words for {len(placeholder_strings)} placeholder_strings; "
                             "give at most one initializer word per placeholder")
        if int(num_vectors_per_token) < 1:
            raise ValueError(f"num_vectors_per_token must be >= 1, got {num_vectors_per_token}")
        self.placeholder_strings = placeholder_strings
        self.initializer_words = dict(zip(placeholder_strings, initializer_words))
        self.init_with_position_embedding = bool(init_with_position_embedding)
        self.num_vectors = int(num_vectors_per_token)
        self.string_to_token, self._init_tokens, self._hooks = {}, {}, []
        # Unregistered on purpose (see the module docstring); `_apply` carries them along.
        self.__dict__["_vectors"] = nn.ParameterDict()
        # string -> the value (on the CPU) a vector was initialised to, None before the first initialisation
        self._initial = {}
        self.__dict__["_embedder"] = None  # not a submodule: the text encoder belongs to the LatentDiffusion

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._vectors._apply(fn, recurse)
        return self

    def attach(self, embedder):
        """Hook into `embedder` (a FrozenCLIPEmbedder): its prompts' placeholders now get the learned vectors."""
        embedding = embedder.transformer.embeddings.token_embedding
        for hook in embedding._forward_hooks.values():
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, EmbeddingManager) and owner is not self:
                raise ValueError("this text encoder already has a Textual Inversion embedding manager; put all "
                                 "placeholders into one embeddings.pt (one manager per text encoder)")
        tokens = {s: single_token_id(embedder.tokenizer, s, "placeholder string") for s in self.placeholder_strings}
        init_tokens = {s: single_token_id(embedder.tokenizer, w, "initializer word") for s, w in self.initializer_words.items()}
        for s, token in tokens.items():
            if s in self.string_to_token and self.string_to_token[s] != token:
                raise ValueError(f"placeholder {s!r} was saved as token {self.string_to_token[s]} but this tokenizer "
                                 f"makes it {token}; the embeddings were made for another text encoder")
            if s in self._vectors and self._vectors[s].shape[1] != embedding.embedding_dim:
                raise ValueError(f"embedding of {s!r} has width {self._vectors[s].shape[1]}, this text encoder "
                                 f"{embedding.embedding_dim}; the embeddings were made for another base model")
        self.detach()
        self.string_to_token, self._init_tokens = tokens, init_tokens
        self.__dict__["_embedder"] = embedder
        for s in self.placeholder_strings:
            if s not in self._vectors:
                self._vectors[s] = nn.Parameter(torch.rand(self.num_vectors, embedding.embedding_dim))
                self._initial[s] = None
        self._reinitialise()
        self._vectors.to(embedding.weight)  # its device and dtype
        # The post hook sits on the whole embedding layer: it runs once token AND position embeddings are loaded.
        self._hooks = [embedding.register_forward_hook(self._replace),
                       embedder.transformer.embeddings.register_load_state_dict_post_hook(
                           lambda module, keys: self._reinitialise())]
        return self

    def detach(self):
        """Remove the hooks: the text encoder is the plain one again."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @torch.no_grad()
    def _reinitialise(self):
        """Vectors still at their initial value start (again) from the initializer word's current embedding."""
        layer = self._embedder.transformer.embeddings
        for s, token in self._init_tokens.items():  # none for vectors loaded from a file
            initial = self._initial[s]
            if initial is not None and not torch.equal(self._vectors[s].detach().to(initial), initial):  # trained
                continue
            start = layer.token_embedding.weight[token]
            if self.init_with_position_embedding:
                start = start + layer.position_embedding.weight[0]
            self._vectors[s].copy_(start.expand_as(self._vectors[s]))
            self._initial[s] = self._vectors[s].detach().to("cpu", copy=True)

    def embedding_parameters(self):
        """The trainable vectors, one (n, width) parameter per placeholder."""
        if self._embedder is None:
            raise ValueError("the embedding manager is not attached; call attach(text_encoder) first")
        return list(self._vectors.values())

    def expand_ids(self, ids):
        """Token ids (b, L) as the encoder sees them: each placeholder repeated n times, cut to L."""
        pieces = {t: ids.new_full((len(self._vectors[s]),), t) for s, t in self.string_to_token.items()}
        return self._expand(ids, ids, pieces)

    def _replace(self, module, inputs, output):
        pieces = {self.string_to_token[s]: v.to(output) for s, v in self._vectors.items()}
        return self._expand(inputs[0], output, pieces)

    def _expand(self, ids, rows, pieces):
        """Each row of `rows` with every placeholder position replaced by `pieces[token]` (n rows), cut to L."""
        hits = torch.isin(ids, torch.tensor(list(pieces), device=ids.device))
        if not hits.any():
            return rows
        out = []
        for row_ids, row, row_hits in zip(ids, rows, hits):
            parts, start = [], 0
            for col in row_hits.nonzero().flatten().tolist():
                parts += [row[start:col], pieces[int(row_ids[col])]]
                start = col + 1
            out.append(torch.cat(parts + [row[start:]])[: ids.shape[1]])
        return torch.stack(out)

    def save(self, path):
        """Write the reference's `embeddings.pt` (see the module docstring), atomically."""
        state = {
            "string_to_token": {s: torch.tensor(t, dtype=torch.int64) for s, t in self.string_to_token.items()},
            "string_to_param": {s: v.detach().to("cpu", torch.float32).clone() for s, v in self._vectors.items()},
        }
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    def load(self, path):
        """Replace placeholders and vectors by those of an `embeddings.pt` (ours or the reference's)."""
        tokens, params = read_embeddings(path)
        self.placeholder_strings, self.string_to_token = list(params), tokens
        self.initializer_words, self._initial = {}, {}
        self.__dict__["_vectors"] = nn.ParameterDict({s: nn.Parameter(v) for s, v in params.items()})
        if self._embedder is not None:
            self.attach(self._embedder)
        return self


def single_token_id(tokenizer, string, what):
    """The one CLIP token id `string` encodes to; a ValueError naming the string otherwise."""
    ids = tokenizer(string, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"{what} {string!r} is {len(ids)} CLIP tokens {pieces}, it must be exactly one; "
                         "pick a single-token string such as '*' or 'sks' (placeholder) or a one-token word")
    return ids[0]


def read_embeddings(path):
    """({string: token id}, {string: float32 tensor (n, width)}) from an `embeddings.pt`, read by `ldm.weights`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"embeddings file not found: {path}; pass the embeddings.pt of a Textual Inversion run "
                         "(logs/<run>/checkpoints/adapter/embeddings.pt)")
    # The reference saved `string_to_param` as an nn.ParameterDict; allow exactly that class, nothing else.
    state = load(path, allow=[nn.ParameterDict])
    if not isinstance(state, dict) or not {"string_to_token", "string_to_param"} <= set(state):
        raise ValueError(f"{path} has no 'string_to_token'/'string_to_param'; is it a Textual Inversion embeddings.pt?")
    params = state["string_to_param"]
    if isinstance(params, nn.ParameterDict):
        params = params._parameters  # present in ParameterDicts pickled by every torch version
    tokens = state["string_to_token"]
    if not params or set(params) != set(tokens):
        raise ValueError(f"{path}: 'string_to_token' and 'string_to_param' name different placeholders; the file is corrupt")
    out = {}
    for s, v in params.items():
        if not isinstance(v, torch.Tensor) or v.dim() not in (1, 2) or not v.is_floating_point():
            raise ValueError(f"{path}: the embedding of {s!r} is not a float tensor (n, width); the file is corrupt")
        out[s] = v.detach().reshape(-1, v.shape[-1]).float().clone()
    return {s: int(tokens[s]) for s in out}, out


def load_embeddings_into(embedder, path):
    """Make `embedder` (a FrozenCLIPEmbedder) understand the placeholder(s) of an `embeddings.pt` (txt2img's
    --embedding_path) until `.detach()` of the returned manager."""
    return EmbeddingManager().load(path).attach(embedder)
