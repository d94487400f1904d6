"""ldm/evaluation/dino.py against a ViT-S/16 written out in the test from the DINO project's own state-dict layout."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from ldm.evaluation.dino import dino_scores, features, load_dino

WIDTH, HEADS, BLOCKS, MLP = 384, 6, 12, 1536


def _dino_state_dict(seed=0):
    """Random weights in the DINO project's names and shapes (vision_transformer.py's `vit_small`, patch 16)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=0.05: torch.randn(*shape, generator=g) * s  # noqa: E731
    sd = {"cls_token": r(1, 1, WIDTH, s=0.02), "pos_embed": r(1, 197, WIDTH, s=0.02),
          "patch_embed.proj.weight": r(WIDTH, 3, 16, 16), "patch_embed.proj.bias": r(WIDTH),
          "norm.weight": 1 + r(WIDTH), "norm.bias": r(WIDTH)}
    for i in range(BLOCKS):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(WIDTH), b + "norm1.bias": r(WIDTH),
                   b + "attn.qkv.weight": r(3 * WIDTH, WIDTH), b + "attn.qkv.bias": r(3 * WIDTH),
                   b + "attn.proj.weight": r(WIDTH, WIDTH), b + "attn.proj.bias": r(WIDTH),
                   b + "norm2.weight": 1 + r(WIDTH), b + "norm2.bias": r(WIDTH),
                   b + "mlp.fc1.weight": r(MLP, WIDTH), b + "mlp.fc1.bias": r(MLP),
                   b + "mlp.fc2.weight": r(WIDTH, MLP), b + "mlp.fc2.bias": r(WIDTH)})
    return sd


def _class_token(sd, pixels):
    """DINO's VisionTransformer.forward, written out: patches + class token + positions, pre-norm blocks, final norm."""
    ln = lambda x, name: F.layer_norm(x, (WIDTH,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)  # noqa: E731
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x], 1) + sd["pos_embed"]
    for i in range(BLOCKS):
        b = f"blocks.{i}."
        q, k, v = F.linear(ln(x, b + "norm1"), sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(
            len(x), -1, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2) / math.sqrt(WIDTH // HEADS)).softmax(-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(len(x), -1, WIDTH), sd[b + "attn.proj.weight"],
                         sd[b + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, b + "norm2"), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    return ln(x, "norm")[:, 0]


def _preprocess(image):
    """DreamBench's transform, step by step: short side to 256 (bicubic), centre 224, ImageNet mean and std."""
    image = TF.center_crop(TF.resize(image, 256, interpolation=TF.InterpolationMode.BICUBIC), 224)
    return TF.normalize(TF.to_tensor(image), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _images(n, seed, size=(300, 260)):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(n)]


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
    sd = _dino_state_dict()
    path = tmp_path_factory.mktemp("dino") / "dino_deitsmall16_pretrain.pth"
    torch.save(sd, path)
    return sd, path


def test_dino_score_equals_the_written_out_vit_on_the_dino_file(dino_file):
    sd, path = dino_file
    refs, gens = _images(3, seed=1), _images(2, seed=2, size=(256, 384))
    model = load_dino(str(path))
    with torch.no_grad():
        ref = F.normalize(_class_token(sd, torch.stack([_preprocess(im) for im in refs])), dim=-1)
        gen = F.normalize(_class_token(sd, torch.stack([_preprocess(im) for im in gens])), dim=-1)
    expected = torch.tensor([sum(float(g @ r) for r in ref) / len(ref) for g in gen])
    # measured 0.0; a q/k swap moves it 0.05, a 224x224 resize 0.10
    assert (dino_scores(model, refs, gens) - expected).abs().max() <= 1e-6
    assert expected.abs().max() < 0.95  # 0.84: random images are not alike: the check above is not trivially 1 == 1


def test_identical_images_score_one_and_sets_average_over_all_pairs(dino_file):
    model = load_dino(str(dino_file[1]))
    a, b = _images(2, seed=3)
    assert dino_scores(model, [a], [a.copy(), a.copy()]).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    cos = float(features(model, [a]) @ features(model, [b]).T)
    assert dino_scores(model, [a, b], [a, b]).tolist() == pytest.approx([(1 + cos) / 2] * 2, abs=1e-6)


def test_a_transformers_folder_gives_the_same_features_as_the_dino_file(dino_file, tmp_path):
    model = load_dino(str(dino_file[1]))
    model.save_pretrained(tmp_path / "dino-vits16")
    images = _images(2, seed=4)
    assert torch.allclose(features(load_dino(str(tmp_path / "dino-vits16")), images), features(model, images), atol=1e-6)


def test_missing_or_foreign_weights_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="DINO weights not found.*--dino_weights"):
        load_dino(str(tmp_path / "nope.pth"))
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a DINO ViT state dict"):
        load_dino(str(tmp_path / "other.pth"))
    sd = _dino_state_dict()
    sd["blocks.3.attn.qkv.weight"] = sd["blocks.3.attn.qkv.weight"][:-6]
    torch.save(sd, tmp_path / "cut.pth")
    with pytest.raises(ValueError, match="does not fit DINO ViT-S/16"):
        load_dino(str(tmp_path / "cut.pth"))
