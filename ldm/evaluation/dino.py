"""DINO similarity as DreamBench and CustomConcept101 report it: the mean cosine between the class tokens of a
self-supervised ViT-S/16 over all (reference, generated) image pairs. DINO, unlike CLIP, was never trained to ignore
what separates two objects of one class, so it rewards the concept's own identity.
"""
import os

import torch
import torch.nn.functional as F
from torchvision import transforms
from transformers import ViTConfig, ViTModel

from ldm.weights import read_tensors

# ViT-S/16 as DINO trained it (its LayerNorms use eps 1e-6, not ViTConfig's default 1e-12).
VIT_S16 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=16,
               image_size=224, layer_norm_eps=1e-6, qkv_bias=True)
# The published figures' preprocessing; a Hugging Face image processor's default (a direct 224x224 resize) differs.
PREPROCESS = transforms.Compose([
    transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
    transforms.CenterCrop(224),
    transforms.ToTensor(),
    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])


def keys_from_dino(state_dict):
    """The DINO project's ViT state dict (timm's names: `blocks.i.attn.qkv`, ...) with transformers' ViTModel names."""
    out = {"embeddings.cls_token": state_dict["cls_token"], "embeddings.position_embeddings": state_dict["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": state_dict["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state_dict["patch_embed.proj.bias"],
           "layernorm.weight": state_dict["norm.weight"], "layernorm.bias": state_dict["norm.bias"]}
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    blocks = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")})
    for i in blocks:
        for kind in ("weight", "bias"):
            for theirs, ours in names.items():
                out[f"layers.{i}.{ours}.{kind}"] = state_dict[f"blocks.{i}.{theirs}.{kind}"]
            for name, part in zip("qkv", state_dict[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)):
                out[f"layers.{i}.attention.{name}_proj.{kind}"] = part
    return out


def load_dino(path, device="cpu"):
    """DINO ViT-S/16 in eval mode from a local transformers folder or the DINO project's .pth/.safetensors file."""
    if not os.path.exists(path):
        raise ValueError(f"DINO weights not found: {path}; pass --dino_weights with a local facebook/dino-vits16 "
                         "folder or dino_deitsmall16_pretrain.pth (downloaded on a machine with internet)")
    if os.path.isdir(path):
        model = ViTModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True)
    else:
        state_dict = read_tensors(path, fix="pass DINO's dino_deitsmall16_pretrain.pth or a transformers folder")
        if "cls_token" not in state_dict:
            raise ValueError(f"{path} is not a DINO ViT state dict (no cls_token); pass dino_deitsmall16_pretrain.pth")
        model = ViTModel(ViTConfig(**VIT_S16), add_pooling_layer=False)
        try:
            model.load_state_dict(keys_from_dino(state_dict), strict=True)
        except (KeyError, RuntimeError) as err:
            raise ValueError(f"{path} does not fit DINO ViT-S/16 ({str(err).splitlines()[0]}); pass the ViT-S/16 "
                             "file dino_deitsmall16_pretrain.pth") from None
    return model.to(device).eval()


@torch.no_grad()
def features(model, images, batch_size=32):
    """L2-normalised class tokens (n, width) of PIL images."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        pixels = torch.stack([PREPROCESS(im.convert("RGB")) for im in images[i:i + batch_size]]).to(device)
        out.append(model(pixel_values=pixels).last_hidden_state[:, 0].float())
    return F.normalize(torch.cat(out), dim=-1)


def dino_scores(model, reference_images, generated_images):
    """Per generated image, the mean cosine of its DINO class token to the references' (a tensor)."""
    return (features(model, generated_images) @ features(model, reference_images).T).mean(dim=1)
