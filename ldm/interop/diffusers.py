"""CatVersion concepts inside diffusers: `apply_catversion(pipe.text_encoder, adapter)` patches the transformers
`CLIPTextModel` of a `StableDiffusionPipeline` (README, "Using a concept in diffusers", has the example).

The text encoder then computes what our `FrozenCLIPEmbedder` computes, through the same code (the embedder's extra
keys/values, passed to every layer as `catversion_kv`, and `concat_kv_attention`); its parameters are untouched.
Pass the empty prompt encoded inside `patch.disabled()` as `negative_prompt_embeds`, as our sampler (like the
reference's `uc.pt`) encodes it without the adapter: else the concept acts on both halves of the guidance.
"""
import torch
from transformers import CLIPTextModel

from ldm.modules.encoders.concat_kv import ATTN_IMPLEMENTATION
from ldm.modules.encoders.modules import FrozenCLIPEmbedder

_PATCH_ATTRIBUTE = "_catversion_patch"


def apply_catversion(text_encoder, adapter_path, strength=1.0):
    """Make `text_encoder` (a transformers `CLIPTextModel`) render the concept of an adapter folder, `.safetensors` or
    the authors' `.bin` at `strength` (0 = base model, 1 = as trained); called again, it stacks a further concept."""
    patch = getattr(text_encoder, _PATCH_ATTRIBUTE, None) or CatVersionPatch(text_encoder)
    try:
        # stack=True also for the first: it loads the adapter frozen (nothing trains here) into the empty stack.
        patch.embedder.adapter_load(adapter_path, strength=strength, stack=True)
    except BaseException:
        if not patch.adapters:  # a patch made just now: the text encoder is left as it was
            patch.remove()
        raise
    return patch


class CatVersionPatch:
    """What `apply_catversion` did to one text encoder: `adapters`, `disabled()` and `remove()`. The adapters follow
    the device of the token ids, so moving or offloading the pipeline after patching works."""

    def __init__(self, text_encoder):
        if not isinstance(text_encoder, CLIPTextModel):
            raise ValueError(f"apply_catversion needs a transformers CLIPTextModel (pipe.text_encoder of an SD v1 "
                             f"pipeline), got {type(text_encoder).__name__}")
        self.text_encoder = text_encoder
        # The embedder is only the adapters' bookkeeping: built on the meta device (no memory), it then works on
        # the caller's text encoder. Its config must describe that encoder, so adapters are checked against it.
        config = text_encoder.config
        names = ("hidden_size", "num_attention_heads", "num_hidden_layers")
        with torch.device("meta"):
            self.embedder = FrozenCLIPEmbedder(text_config={k: getattr(config, k) for k in names},
                                               max_length=config.max_position_embeddings, freeze=False)
        self.embedder.transformer = text_encoder
        self._previous_attention = config._attn_implementation
        text_encoder.set_attn_implementation(ATTN_IMPLEMENTATION)
        self._hook = text_encoder.register_forward_pre_hook(self._add_extra_kv, with_kwargs=True)
        setattr(text_encoder, _PATCH_ATTRIBUTE, self)

    @property
    def adapters(self):
        """The `ConcatKV` of each concept; set `patch.adapters[i].strength` to change a concept's strength."""
        return self.embedder.adapters

    def disabled(self):
        """Context manager: within it the text encoder is the plain base model (for the unconditional embedding)."""
        return self.embedder.adapter_disabled()

    def remove(self):
        """Undo the patch: the text encoder computes exactly what it computed before."""
        self._hook.remove()
        self.text_encoder.set_attn_implementation(self._previous_attention)
        vars(self.text_encoder).pop(_PATCH_ATTRIBUTE, None)

    def _add_extra_kv(self, module, args, kwargs):
        input_ids = args[0] if args else kwargs.get("input_ids")
        if input_ids is None:
            return None  # CLIPTextModel itself raises its "You have to specify input_ids"
        for adapter in self.adapters:  # where the ids are is where the text encoder runs, also under offloading
            adapter.to(input_ids.device)  # a no-op unless the pipeline moved since the last call
        extra = self.embedder._extra_kv(input_ids.shape[0])
        return (args, {**kwargs, "catversion_kv": extra}) if extra else None
