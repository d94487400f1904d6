"""The weight names of a Stable Diffusion v1 diffusers folder (`unet/`, `vae/`) mapped to our CompVis names: our own
inverse of diffusers' LDM converters (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`), so diffusers is
not needed at run time. A key we cannot place keeps its name under `<component>/`, and the loader reports it as
unexpected.
"""
import re


def _mapped(state, prefix, component, key_fn):
    return {(prefix + new if (new := key_fn(k)) else f"{component}/{k}"): v for k, v in state.items()}


def _levels(state, pattern):
    """Indices captured by `pattern` over the keys (e.g. the resnets of a level)."""
    return {int(m[1]) for k in state if (m := re.match(pattern, k))}


_UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_UNET_BLOCK = re.compile(r"(?:down_blocks\.(?P<down>\d+)|mid_block|up_blocks\.(?P<up>\d+))"
                         r"\.(?P<kind>resnets|attentions)\.(?P<j>\d+)\.(?P<rest>.+)")
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_to_ldm(state):
    """diffusers `UNet2DConditionModel` keys -> `model.diffusion_model.*` (our `UNetModel`).

    LDM numbers its blocks flat: `input_blocks.0` is conv_in, then each level has `per_level` blocks (resnet `.0`,
    attention `.1` where there is cross-attention) and, but on the last level, a downsampler block (`.0.op`). Going
    up, each level has `per_level + 1` blocks, the upsampler last in its last block: `.1.conv` after a plain resnet,
    `.2.conv` after resnet and attention. The transformer blocks inside attentions are spelled alike in both.
    """
    per_level = len(_levels(state, r"down_blocks\.0\.resnets\.(\d+)\."))
    n = per_level + 1
    up_with_attention = _levels(state, r"up_blocks\.(\d+)\.attentions\.")

    def key_fn(key):
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP:
            return f"{_UNET_TOP[module]}.{param}"
        if m := _UNET_BLOCK.fullmatch(key):
            j, attention = int(m["j"]), m["kind"] == "attentions"
            if m["down"] is not None:
                block = f"input_blocks.{1 + int(m['down']) * n + j}.{int(attention)}"
            elif m["up"] is not None:
                block = f"output_blocks.{int(m['up']) * n + j}.{int(attention)}"
            else:  # the mid block alternates resnet j (2j) and attention j (2j + 1)
                block = f"middle_block.{2 * j + int(attention)}"
            if attention:
                return f"{block}.{m['rest']}"
            name, _, param = m["rest"].rpartition(".")
            return f"{block}.{_UNET_RESNET[name]}.{param}" if name in _UNET_RESNET else None
        if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            return f"input_blocks.{(int(m[1]) + 1) * n}.0.op.{param}"
        if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            level = int(m[1])
            return f"output_blocks.{level * n + per_level}.{2 if level in up_with_attention else 1}.conv.{param}"
        return None

    return _mapped(state, "model.diffusion_model.", "unet", key_fn)


_VAE_RESNET_KEY = re.compile(r"(?P<part>encoder|decoder)\.(?:down_blocks\.(?P<down>\d+)|up_blocks\.(?P<up>\d+)"
                             r"|mid_block)\.resnets\.(?P<j>\d+)\.(?P<name>\w+)")
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                  # the names of diffusers before 0.15, still in many folders on the hub
                  "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def vae_to_ldm(state):
    """diffusers `AutoencoderKL` keys -> `first_stage_model.*`. The decoder's levels run the other way (diffusers'
    `up_blocks.0` is the lowest resolution, LDM's `up.0` the highest); the mid-block attention is Linear in diffusers
    and 1x1 Conv2d in LDM, so its weights become `[out, in, 1, 1]`."""
    n_up = len(_levels(state, r"decoder\.up_blocks\.(\d+)\."))

    def key_fn(key):
        module, _, param = key.rpartition(".")
        if module in ("quant_conv", "post_quant_conv"):
            return key
        if m := re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)", module):
            return f"{m[1]}.{'norm_out' if m[2] == 'conv_norm_out' else m[2]}.{param}"
        if m := _VAE_RESNET_KEY.fullmatch(module):
            if m["down"] is not None:
                block = f"{m['part']}.down.{m['down']}.block.{m['j']}"
            elif m["up"] is not None:
                block = f"{m['part']}.up.{n_up - 1 - int(m['up'])}.block.{m['j']}"
            else:
                block = f"{m['part']}.mid.block_{int(m['j']) + 1}"
            return f"{block}.{_VAE_RESNET[m['name']]}.{param}" if m["name"] in _VAE_RESNET else None
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            return f"encoder.down.{m[1]}.downsample.conv.{param}"
        if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{param}"
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", module):
            return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{param}" if m[2] in _VAE_ATTENTION else None
        return None

    out = _mapped(state, "first_stage_model.", "vae", key_fn)
    for k, v in out.items():
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", k) and v.ndim == 2:
            out[k] = v[:, :, None, None]
    return out
