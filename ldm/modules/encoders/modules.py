"""SD v1 text conditioning: the frozen CLIP ViT-L/14 text encoder, plus CatVersion's concatenated K/V adapters."""
import contextlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.files import atomic_write
from ldm.modules.encoders.concat_kv import ATTN_IMPLEMENTATION, ConcatKV
from ldm.modules.encoders.tokenizer import build_clip_tokenizer
from ldm.weights import load, read_metadata

# The text tower of openai/clip-vit-large-patch14 as used by SD v1, with the real special-token ids.
VIT_L_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)

# File names of an adapter directory: the authors' pair, and ours (safetensors with metadata).
AUTHORS_CONFIG, AUTHORS_WEIGHTS, OUR_WEIGHTS = "adapter_config.json", "pytorch_adapter.bin", "catversion.safetensors"
# The authors' .bin holds the same tensor under one key per covered layer and one for the pool.
_AUTHORS_TAIL = "prefix_tunings.prefix_tuning1.clip_text_model_self_prefix.control_trans"
_AUTHORS_LAYER_KEY = "text_model.encoder.layers.{}.self_attn.prefix_tuning.pool." + _AUTHORS_TAIL
_AUTHORS_POOL_KEY = "prefix_tuning." + _AUTHORS_TAIL
_ANOTHER_MODEL = "was it trained for another base model?"
_CONCAT_KV_KNOBS = ("layers", "num_tokens", "init", "logit_bias", "strength", "concepts")


class FrozenCLIPEmbedder(nn.Module):
    """Prompts -> CLIP `last_hidden_state` (b, 77, width), frozen; optional CatVersion adapters.

    Adapters stay out of `state_dict()` (base checkpoints stay clean) and `parameters()` (train them through
    `adapter_parameters()`), but follow `.to()`. The first is the trainable one (from `concat_kv`, or loaded with
    `stack=False`); `stack=True` adds further concepts, frozen, active together with it. With an adapter of several
    concepts (`concat_kv.concepts`) the encoding methods take `concepts`, each batch row's concept index.
    """

    def __init__(self, text_config=None, max_length=77, concat_kv=None, freeze=True, **ignored):
        super().__init__()  # `ignored` swallows reference kwargs such as version= and device=
        config = CLIPTextConfig(**{**VIT_L_TEXT, **dict(text_config or {})})
        self.transformer = CLIPTextModel._from_config(config, attn_implementation=ATTN_IMPLEMENTATION)
        self.tokenizer = build_clip_tokenizer(max_length)
        self.max_length = max_length
        self.width, self.heads = config.hidden_size, config.num_attention_heads
        self.num_layers = config.num_hidden_layers
        self.frozen = freeze
        if freeze:
            self.transformer.eval().requires_grad_(False)
        self._adapters = []  # a plain list, not a ModuleList: see the class docstring
        self._adapters_enabled = True
        if concat_kv is not None:
            unknown = set(concat_kv) - set(_CONCAT_KV_KNOBS)
            if unknown:
                raise ValueError(f"unknown concat_kv option(s) {sorted(unknown)}; known: {list(_CONCAT_KV_KNOBS)}")
            self._attach(ConcatKV(config.hidden_size, config.num_attention_heads, **concat_kv), trainable=True, source="concat_kv")

    def train(self, mode=True):
        super().train(mode)
        if self.frozen:
            self.transformer.eval()
        return self

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.half() all go through _apply; carry the unregistered adapters along.
        super()._apply(fn, recurse)
        for adapter in self._adapters:
            adapter._apply(fn, recurse)
        return self

    # --- text -> conditioning ----------------------------------------------------------------------
    def tokenize(self, text):
        """list[str] -> LongTensor (b, max_length): BOS, tokens, EOS, padded with EOS; warns once if any prompt was cut."""
        text = [text] if isinstance(text, str) else list(text)
        batch = self.tokenizer(text, truncation=True, max_length=self.max_length, padding="max_length", return_tensors="pt")
        cut = [t for t, enc in zip(text, batch.encodings) if enc.overflowing]
        if cut:
            warnings.warn(f"{len(cut)} prompt(s) longer than {self.max_length} CLIP tokens were truncated, e.g. {cut[0][:80]!r}...", stacklevel=2)
        return batch.input_ids

    def encode_tokens(self, tokens, concepts=None):
        """Token ids (b, max_length) -> last_hidden_state (b, max_length, width), with the active adapters."""
        tokens = tokens.to(self.transformer.device)
        return self.transformer(input_ids=tokens, catversion_kv=self._extra_kv(len(tokens), concepts)).last_hidden_state

    def forward(self, text, concepts=None):
        return self.encode_tokens(self.tokenize(text), concepts)

    def encode(self, text, concepts=None):
        return self(text, concepts)

    # --- the same conditioning in two parts (training fast path) ---------------------------------------
    # Layers below the first one that carries extra K/V are plain frozen CLIP, so for a given caption their output
    # never changes: a trainer computes it once (`frozen_hidden_states`) and runs only the rest each step
    # (`encode_from_hidden`). Together they compute exactly what `encode_tokens` computes.
    @property
    def first_adapted_layer(self):
        """Index of the lowest layer with active extra K/V; `num_layers` when no adapter is active."""
        layers = [layer for adapter in self._active_adapters() for layer in adapter.layers]
        return min(layers, default=self.num_layers)

    @torch.no_grad()
    def frozen_hidden_states(self, tokens, upto):
        """Hidden states entering layer `upto` (b, max_length, width): token embeddings and layers 0..upto-1.

        Refuses a cut above the first adapted layer: those layers' output depends on the adapters' numbers."""
        if not 0 <= upto <= self.first_adapted_layer:
            raise ValueError(f"cannot cache text layers below {upto}: layer {self.first_adapted_layer} carries an adapter; "
                             "pass upto <= first_adapted_layer")
        tokens = tokens.to(self.transformer.device)
        hidden = self.transformer.embeddings(input_ids=tokens)
        for layer in self.transformer.encoder.layers[:upto]:
            hidden = layer(hidden, None, is_causal=True)
        return hidden

    def encode_from_hidden(self, hidden, start, concepts=None):
        """Layers `start`.. (with the active adapters) and the final layer norm, from `frozen_hidden_states(tokens, start)`."""
        extra = self._extra_kv(len(hidden), concepts)
        for layer in self.transformer.encoder.layers[start:]:
            # CLIPTextModel.forward hands its layers no mask and is_causal=True (see concat_kv); so do we.
            hidden = layer(hidden, None, is_causal=True, catversion_kv=extra)
        return self.transformer.final_layer_norm(hidden)

    def _active_adapters(self):
        if not self._adapters_enabled:
            return []
        return [a for a in self._adapters if a.strength != 0]  # s = 0 is the base model, bit for bit

    def _extra_kv(self, batch, concepts=None):
        """{attention module: [(extra_k, extra_v, logit offset), ...]} over the active adapters; `concepts`: each
        row's concept index for an adapter of several concepts."""
        extra = {}
        if concepts is not None:
            concepts = torch.as_tensor(concepts, device=self.transformer.device)
        for adapter in self._active_adapters():
            index = concepts if adapter.concepts > 1 else None
            for layer in adapter.layers:
                attn = self.transformer.encoder.layers[layer].self_attn
                extra.setdefault(attn, []).append((*adapter.kv(layer, batch, index), adapter.logit_offset))
        return extra

    # --- adapters ----------------------------------------------------------------------------------
    @property
    def adapters(self):
        return tuple(self._adapters)

    def adapter_parameters(self):
        return [p for a in self._adapters for p in a.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def adapter_disabled(self):
        """Within this block the conditioning is the plain CLIP text encoder's (e.g. the unconditional embedding)."""
        before, self._adapters_enabled = self._adapters_enabled, False
        try:
            yield self
        finally:
            self._adapters_enabled = before

    def _attach(self, adapter, trainable, source):
        if adapter.width != self.width or adapter.heads != self.heads:
            raise ValueError(f"adapter {source} was made for a text encoder of width {adapter.width} with "
                             f"{adapter.heads} heads, this one has width {self.width} with {self.heads} heads; "
                             f"{_ANOTHER_MODEL}")
        if max(adapter.layers) >= self.num_layers:
            raise ValueError(f"adapter {source} covers layers {adapter.layers}, but this text encoder has layers "
                             f"0-{self.num_layers - 1}; {_ANOTHER_MODEL}")
        adapter.to(next(self.transformer.parameters()))  # its device and dtype
        adapter.control_trans.requires_grad_(trainable)
        self._adapters = [adapter] if trainable else [*self._adapters, adapter]

    def adapter_save(self, directory, metadata=None, concept=0):
        """Write the trainable adapter (its concept `concept`) to `directory` in the authors' format and as
        catversion.safetensors."""
        if not self._adapters:
            raise ValueError("no adapter to save; build the embedder with concat_kv={...} or call adapter_load first")
        a = self._adapters[0]
        flat = a.concept(concept).detach().to("cpu", torch.float32).contiguous()
        n = len(a.layers)
        # The reference fixed its layers in code and wrote leave_out []; only other layer sets need leave_out.
        deepest = list(range(self.num_layers - n, self.num_layers))
        leave_out = [] if sorted(a.layers) == deepest else [i for i in range(self.num_layers) if i not in a.layers]
        config = {
            "config": {"architecture": "prefix_tuning", "bottleneck_size": 512, "cross_prefix": True, "dropout": 0.0,
                       "encoder_prefix": True, "flat": True, "leave_out": leave_out, "non_linearity": "tanh",
                       "prefix_length": a.num_tokens, "shared_gating": True, "use_gating": False},
            "hidden_size": a.width, "model_class": "CLIPTextModel", "model_name": None, "model_type": "clip_text_model",
            "name": "prefix_tuning1", "version": "3.2.1",
        }
        authors = {**{_AUTHORS_LAYER_KEY.format(i): flat for i in a.layers}, _AUTHORS_POOL_KEY: flat}
        ours = {"layers": json.dumps(a.layers), "num_tokens": str(a.num_tokens), "logit_bias": repr(a.logit_bias),
                "width": str(a.width), "heads": str(a.heads), **{str(k): str(v) for k, v in (metadata or {}).items()}}
        os.makedirs(directory, exist_ok=True)
        atomic_write(os.path.join(directory, AUTHORS_CONFIG),
                     lambda p: Path(p).write_text(json.dumps(config, indent=2), encoding="utf-8"))
        atomic_write(os.path.join(directory, AUTHORS_WEIGHTS), lambda p: torch.save(authors, p))
        atomic_write(os.path.join(directory, OUR_WEIGHTS), lambda p: save_file({"control_trans": flat}, p, metadata=ours))

    def adapter_load(self, path, strength=1.0, stack=False):
        """Load an adapter (directory, .safetensors or the authors' .bin); stack=True adds it as another concept."""
        path = os.fspath(path)
        if os.path.isdir(path):
            ours, authors = os.path.join(path, OUR_WEIGHTS), os.path.join(path, AUTHORS_WEIGHTS)
            path = ours if os.path.isfile(ours) else authors
        if not os.path.isfile(path):
            raise ValueError(f"adapter not found: {path}; pass an adapter directory, a .safetensors or a pytorch_adapter.bin")
        flat, knobs = _read_safetensors(path) if path.endswith(".safetensors") else _read_authors_bin(path)
        if "layers" not in knobs:
            knobs["layers"] = self._authors_layers(path, flat.numel(), knobs)
        n_expected = knobs["num_tokens"] * len(knobs["layers"]) * 2 * knobs.get("width", self.width)
        if flat.numel() != n_expected:
            raise ValueError(f"adapter {path} has {flat.numel()} numbers, its metadata implies {n_expected}; the file is corrupt")
        adapter = ConcatKV(knobs.get("width", self.width), knobs.get("heads", self.heads), knobs["layers"],
                           knobs["num_tokens"], init="zeros", logit_bias=knobs["logit_bias"], strength=strength)
        with torch.no_grad():
            adapter.control_trans.copy_(flat)
        self._attach(adapter, trainable=not stack, source=path)
        return adapter

    def _authors_layers(self, path, numel, knobs):
        """Layer set of a file without our metadata: from the number of floats, the deepest layers (or leave_out)."""
        tokens = knobs["num_tokens"]
        per_layer = 2 * self.width * tokens
        if numel % per_layer:
            raise ValueError(f"adapter {path} has {numel} numbers, which is not a multiple of 2*{self.width}*{tokens} "
                             f"for this text encoder (width {self.width}, {tokens} token(s)); {_ANOTHER_MODEL}")
        n = numel // per_layer
        if n > self.num_layers:
            raise ValueError(f"adapter {path} has {numel} numbers = {n} layers x 2 x width {self.width} x {tokens} "
                             f"token(s), but this text encoder has {self.num_layers} layers; {_ANOTHER_MODEL}")
        leave_out = knobs.get("leave_out")
        layers = [i for i in range(self.num_layers) if i not in leave_out] if leave_out else list(range(self.num_layers - n, self.num_layers))
        if len(layers) != n:
            raise ValueError(f"adapter {path} has {n} layers of numbers but its adapter_config.json leave_out keeps "
                             f"{len(layers)}; the files do not belong together")
        return layers


def _read_safetensors(path):
    state, meta = load(path), read_metadata(path)
    if list(state) != ["control_trans"]:
        raise ValueError(f"adapter {path} should hold exactly one tensor 'control_trans', found {list(state)[:4]}; "
                         "is it a CatVersion adapter?")
    flat = state["control_trans"]
    knobs = {"num_tokens": int(meta.get("num_tokens", 1)), "logit_bias": float(meta.get("logit_bias", 1.0))}
    if "layers" in meta:
        knobs["layers"] = [int(i) for i in json.loads(meta["layers"])]
    knobs.update({k: int(meta[k]) for k in ("width", "heads") if k in meta})
    return flat.float().flatten(), knobs


def _read_authors_bin(path):
    """The authors' pytorch_adapter.bin (same tensor under four keys), plus prefix_length/leave_out from adapter_config.json."""
    state = load(path)
    tensors = [v for k, v in state.items() if k.endswith("control_trans")] if isinstance(state, dict) else []
    if not tensors or not all(isinstance(t, torch.Tensor) and torch.equal(t, tensors[0]) for t in tensors):
        raise ValueError(f"adapter {path} has no single `...control_trans` tensor; is it a CatVersion prefix-tuning adapter?")
    knobs = {"num_tokens": 1, "logit_bias": 1.0}  # the reference's fixed +1 logit quirk
    config_path = os.path.join(os.path.dirname(path), AUTHORS_CONFIG)
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f).get("config", {})
        knobs["num_tokens"] = int(config.get("prefix_length", 1))
        knobs["leave_out"] = [int(i) for i in config.get("leave_out", [])]
    return tensors[0].float().flatten(), knobs
