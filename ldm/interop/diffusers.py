"""CatVersion concepts inside diffusers: patch the transformers `CLIPTextModel` of a `StableDiffusionPipeline`.

    pipe = StableDiffusionPipeline.from_pretrained("models/sd-v1-5", safety_checker=None, requires_safety_checker=False)
    patch = apply_catversion(pipe.text_encoder, "logs/teddybear/checkpoints/adapter")
    with patch.disabled():  # the unconditional embedding WITHOUT the concept, as our sampler and the reference do
        negative = pipe.encode_prompt("", pipe.device, 1, False)[0]
    image = pipe("teddybear on the beach", negative_prompt_embeds=negative, guidance_scale=10).images[0]
    patch.remove()

The text encoder computes exactly what our `FrozenCLIPEmbedder` computes, through the same code: the adapter files
are read by `FrozenCLIPEmbedder.adapter_load`, the extra keys/values are built by the embedder and handed to every
layer in the `catversion_kv` keyword, and the attention function `concat_kv_attention` is switched on for the text
encoder. Nothing is copied into the text encoder's parameters or state dict.

Why `negative_prompt_embeds`: the pipeline encodes the negative (empty) prompt with the same, patched, text encoder,
so the concept would act on both halves of classifier-free guidance. Our sampler, like the reference's `uc.pt`,
encodes the empty prompt without the adapter; pass that embedding to get the same images.
"""
import contextlib

import torch
from transformers import CLIPTextModel

from ldm.modules.encoders.concat_kv import ATTN_IMPLEMENTATION
from ldm.modules.encoders.modules import FrozenCLIPEmbedder

_PATCH_ATTRIBUTE = "_catversion_patch"


def apply_catversion(text_encoder, adapter_path, strength=1.0):
    """Make `text_encoder` (a transformers `CLIPTextModel`, e.g. `pipe.text_encoder`) render a CatVersion concept.

    `adapter_path`: an adapter folder, a `catversion.safetensors` or the authors' `pytorch_adapter.bin`.
    `strength`: 0 = base model, 1 = as trained (see `ConcatKV`). Calling it again on a patched text encoder
    stacks a further concept, as several `--embedding_path` values do in txt2img. Returns the `CatVersionPatch`.
    """
    patch = getattr(text_encoder, _PATCH_ATTRIBUTE, None)
    if patch is not None:
        patch.embedder.adapter_load(adapter_path, strength=strength, stack=True)
        return patch
    patch = CatVersionPatch(text_encoder)
    try:
        # stack=True also for the first: it loads the adapter frozen (nothing trains here) into the empty stack.
        patch.embedder.adapter_load(adapter_path, strength=strength, stack=True)
    except BaseException:
        patch.remove()
        raise
    return patch


class CatVersionPatch:
    """What `apply_catversion` did to one text encoder: `adapters`, `disabled()` and `remove()`.

    The adapters follow the device of the token ids, so moving or offloading the pipeline after patching works.
    """

    def __init__(self, text_encoder):
        if not isinstance(text_encoder, CLIPTextModel):
            raise ValueError(f"apply_catversion needs a transformers CLIPTextModel (pipe.text_encoder of an SD v1 "
                             f"pipeline), got {type(text_encoder).__name__}")
        self.text_encoder = text_encoder
        # The embedder is only the adapters' bookkeeping: built on the meta device (no memory), it then works on
        # the caller's text encoder. Its config must describe that encoder, so adapters are checked against it.
        config = text_encoder.config
        with torch.device("meta"):
            self.embedder = FrozenCLIPEmbedder(
                text_config={k: getattr(config, k)
                             for k in ("hidden_size", "num_attention_heads", "num_hidden_layers")},
                max_length=config.max_position_embeddings, freeze=False,
            )
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
        with contextlib.suppress(AttributeError):
            delattr(self.text_encoder, _PATCH_ATTRIBUTE)

    def _add_extra_kv(self, module, args, kwargs):
        input_ids = args[0] if args else kwargs.get("input_ids")
        if input_ids is None:
            return None  # CLIPTextModel itself raises its "You have to specify input_ids"
        # The ids' device is where the text encoder runs, also when accelerate's offloading moves it only now.
        for adapter in self.adapters:
            adapter.to(input_ids.device)  # a no-op unless the pipeline moved since the last call
        extra = self.embedder._extra_kv(input_ids.shape[0])
        return (args, {**kwargs, "catversion_kv": extra}) if extra else None
