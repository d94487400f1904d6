"""Textual Inversion (Gal et al., arXiv 2208.01618), the word-embedding baseline CatVersion is compared against.

A placeholder string (the reference's `*`) names the concept; its token's input embedding is replaced by learned
vectors while everything else stays frozen. Train with `configs/*/v1-finetune-textual-inversion.yaml` through the
same `main.py`; prompts then use the placeholder: `a photo of * on the beach`.

How the vectors get in: `attach(embedder)` registers a forward hook on the CLIP text encoder's token embedding
(`transformer.embeddings.token_embedding`). The hook sees the token ids and the looked-up embeddings and puts the
learned vectors in place of every placeholder token, before the position embeddings are added, exactly where
the reference's `EmbeddingManager` works. The placeholder and initializer strings must each be ONE CLIP token
(`*`, `sks`, `circle` are; `teddybear` is two).

Several vectors per placeholder (`num_vectors_per_token: n`) work as in the reference: the placeholder's single
position becomes n consecutive positions holding the n vectors, the tokens after it move n - 1 places to the
right, and the sequence is cut back to its length (77), so the last padding tokens fall off. `expand_ids` gives
the token ids as the text encoder then sees them position by position (the placeholder id repeated n times).

The vectors are kept out of `state_dict()` and `parameters()`, like CatVersion's adapters (so SD checkpoints load
strictly and stay clean, and LatentDiffusion's freezing of its parameters leaves them trainable); train them
through `embedding_parameters()`. They follow `.to()`/`.half()`/`.cuda()` of the module that holds the manager.
Each vector starts as the initializer word's embedding; a placeholder without initializer word starts as
`torch.rand`, as in the reference. Reference quirk, kept by default (`init_with_position_embedding: true`): the
reference computed the start value by running the initializer token alone through CLIP's embedding layer, so it is
the token embedding PLUS the position embedding of position 0; the vector then replaces a token embedding, to which
each position's embedding is added again. `false` starts from the token embedding alone. Since a LatentDiffusion
attaches the manager before the SD weights are loaded, vectors still at their initial value are re-initialised
whenever the text encoder's embedding layer is (re)loaded, so they start from the real word embedding.

File format (`save`/`load`, the reference's `embeddings.pt`): `torch.save` of
`{"string_to_token": {string: 0-dim int64 tensor}, "string_to_param": {string: float32 tensor (n, width)}}`.
It is always read with `weights_only=True`; the reference stored `string_to_param` as an `nn.ParameterDict`,
which is accepted by allowing exactly that class to the weights-only unpickler.

From txt2img: `load_embeddings_into(model.cond_stage_model, "embeddings.pt")` makes a model built from the plain
inference config understand the placeholder(s) of that file.
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
        self.num_vectors = {s: int(num_vectors_per_token) for s in placeholder_strings}
        self.string_to_token = {}
        # Unregistered on purpose (see the module docstring); `_apply` carries them along.
        self.__dict__["_vectors"] = nn.ParameterDict()
        # string -> the value (on the CPU) a vector was initialised to, None before the first initialisation;
        # no entry for vectors loaded from a file, which are never re-initialised.
        self._initial = {}
        self._init_tokens = {}
        self.__dict__["_embedder"] = None  # not a submodule: the text encoder belongs to the LatentDiffusion
        self._hooks = []

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._vectors._apply(fn, recurse)
        return self

    # --- wiring into a FrozenCLIPEmbedder ------------------------------------------------------------
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
                self._vectors[s] = nn.Parameter(torch.rand(self.num_vectors[s], embedding.embedding_dim))
                self._initial[s] = None
        self._reinitialise()
        p = embedding.weight
        self._vectors.to(device=p.device, dtype=p.dtype)
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
        for s, token in self._init_tokens.items():
            if s not in self._initial:  # loaded from a file
                continue
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

    # --- the hook --------------------------------------------------------------------------------------
    def expand_ids(self, ids):
        """Token ids (b, L) as the encoder sees them position by position: each placeholder repeated n times, cut to L."""
        return self._expand(ids, ids, lambda token, n: torch.full((n,), token, dtype=ids.dtype, device=ids.device))

    def _replace(self, module, inputs, output):
        vectors = {self.string_to_token[s]: v.to(device=output.device, dtype=output.dtype) for s, v in self._vectors.items()}
        return self._expand(inputs[0], output, lambda token, n: vectors[token])

    def _expand(self, ids, rows, piece):
        """Each row of `rows` with every placeholder position replaced by `piece(token, n)` (n rows), cut to L."""
        n_of = {self.string_to_token[s]: self.num_vectors_of(s) for s in self.placeholder_strings}
        hits = torch.isin(ids, torch.tensor(list(n_of), device=ids.device))
        if not hits.any():
            return rows
        out = []
        for row_ids, row, row_hits in zip(ids, rows, hits):
            parts, start = [], 0
            for col in row_hits.nonzero().flatten().tolist():
                token = int(row_ids[col])
                parts += [row[start:col], piece(token, n_of[token])]
                start = col + 1
            out.append(torch.cat(parts + [row[start:]])[: ids.shape[1]])
        return torch.stack(out)

    def num_vectors_of(self, string):
        return self._vectors[string].shape[0] if string in self._vectors else self.num_vectors[string]

    # --- files -----------------------------------------------------------------------------------------
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
        self.placeholder_strings = list(params)
        self.string_to_token = tokens
        self.num_vectors = {s: v.shape[0] for s, v in params.items()}
        self.initializer_words, self._initial = {}, {}
        self.__dict__["_vectors"] = nn.ParameterDict({s: nn.Parameter(v) for s, v in params.items()})
        if self._embedder is not None:
            self.attach(self._embedder)
        return self

    def extra_repr(self):
        return ", ".join(f"{s!r}: {self.num_vectors_of(s)} vector(s)" for s in self.placeholder_strings)


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
    """Make `embedder` (a FrozenCLIPEmbedder) understand the placeholder(s) of an `embeddings.pt`; returns the manager.

    For txt2img with `--embedding_path .../embeddings.pt`: the manager's hook stays on the embedder for its lifetime
    (call `.detach()` on the returned manager to undo). Prompts must then contain the placeholder (e.g. `*`).
    """
    manager = EmbeddingManager(placeholder_strings=["*"]).load(path)
    return manager.attach(embedder)
