"""The training fast path: caches and switches that leave the numbers as the reference path computes them."""
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.data.personalized import PersonalizedBase
from ldm.modules.encoders.modules import FrozenCLIPEmbedder

from .conftest import TINY_FINETUNE

# The reference-equivalent path: VAE encode and all text layers every step, nothing else changed either.
REFERENCE = {"cache_latents": False, "cache_text": False, "precision": "fp32", "gradient_checkpointing": False,
             "channels_last": False, "compile": False}
TINY_TEXT = OmegaConf.to_container(OmegaConf.load(TINY_FINETUNE).model.params.cond_stage_config.params.text_config)


def make_batch(dataset, picks, caption="circle"):
    """A batch as the DataLoader collates PersonalizedBase items, with chosen (index, flip) pairs."""
    return {
        "image": torch.from_numpy(np.stack([dataset.prepare(i, flip) for i, flip in picks])),
        "caption": [caption] * len(picks),
        "index": torch.tensor([i for i, _ in picks]),
        "flip": torch.tensor([flip for _, flip in picks]),
    }


def use(model, **options):
    model.fast = model.check_fast_options(options)
    return model.prepare_fast_path()


def train_step(model, batch, seed):
    """Loss and adapter gradient of one step; the seed fixes the posterior sample, the timesteps and the noise."""
    adapter = model.trainable_parameters()[0]
    adapter.grad = None
    torch.manual_seed(seed)
    loss = model.shared_step(batch)
    loss.backward()
    return loss.detach(), adapter.grad.clone()


class CallCounter:
    """How often each of some modules ran forward."""

    def __init__(self, modules):
        self.counts = dict.fromkeys(modules, 0)
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module, args, output):
        self.counts[module] += 1

    def __call__(self, module):
        return self.counts[module]

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture
def data(example_data):
    return PersonalizedBase(example_data, size=64, base_class_word="circle")


def test_split_text_encoder_equals_the_full_one():
    torch.manual_seed(0)
    emb = FrozenCLIPEmbedder(text_config=TINY_TEXT, concat_kv={"layers": [4, 10]})
    ids = emb.tokenize(["circle", "a photo of a circle on the beach"])
    with torch.no_grad():
        assert emb.first_adapted_layer == 4
        full = emb.encode_tokens(ids)
        split = emb.encode_from_hidden(emb.frozen_hidden_states(ids, 4), 4)
        assert torch.equal(split, full)
        lower = emb.encode_from_hidden(emb.frozen_hidden_states(ids, 2), 2)  # any cut at or below the first adapter
        assert (lower - full).abs().max() < 1e-6
        with emb.adapter_disabled():
            assert emb.first_adapted_layer == 12
            plain = emb.encode_tokens(ids)
            assert torch.equal(emb.encode_from_hidden(emb.frozen_hidden_states(ids, 12), 12), plain)
        assert (plain - full).abs().max() > 1e-2  # the adapter does act, so the equality above means something
    with pytest.raises(ValueError, match="cannot cache text layers below 5: layer 4 carries an adapter"):
        emb.frozen_hidden_states(ids, 5)


def test_cached_step_equals_the_reference_step(tiny_finetune_model, data):
    m = tiny_finetune_model.train()
    batch = make_batch(data, [(0, False), (3, True)])
    use(m, **REFERENCE)
    ref_loss, ref_grad = train_step(m, batch, seed=1)

    use(m, cache_latents=True, cache_text=True, precision="fp32")
    train_step(m, batch, seed=0)  # fills the caches
    text = m.cond_stage_model.transformer
    below, above = list(text.encoder.layers[:9]), list(text.encoder.layers[9:])
    calls = CallCounter([m.first_stage_model.encoder, text.embeddings, *below, *above])
    try:
        loss, grad = train_step(m, batch, seed=1)
    finally:
        calls.remove()
    assert abs(loss - ref_loss) <= 1e-5 and (grad - ref_grad).abs().max() <= 1e-5
    # The gradient is small (a random UNet listens little to its text), so also relative to its size:
    assert (grad - ref_grad).abs().max() <= 1e-3 * grad.abs().max()
    # The cache was hit: no VAE encoder and no frozen text layer ran; the adapted layers did.
    assert calls(m.first_stage_model.encoder) == 0 and calls(text.embeddings) == 0
    assert [calls(layer) for layer in below] == [0] * 9 and [calls(layer) for layer in above] == [1] * 3
    # Only the adapter got a gradient: the frozen networks were differentiated with respect to their inputs only.
    assert all(p.grad is None for p in m.parameters())

    # Another seed samples another latent from the cached posterior (it is not frozen to one draw)...
    assert abs(train_step(m, batch, seed=2)[0] - ref_loss) > 1e-4
    # ... and the flip is part of the key: the mirrored picture is encoded once, then served from the cache.
    mirrored = make_batch(data, [(0, True), (3, True)])
    calls = CallCounter([m.first_stage_model.encoder])
    use(m, **REFERENCE)
    expected = train_step(m, mirrored, seed=1)[0]
    use(m)
    assert abs(train_step(m, mirrored, seed=1)[0] - expected) <= 1e-5
    assert abs(train_step(m, mirrored, seed=1)[0] - expected) <= 1e-5
    assert calls(m.first_stage_model.encoder) == 2  # the reference step, and the one missing picture
    assert abs(expected - ref_loss) > 1e-4
    calls.remove()


def test_text_cache_with_mixed_captions(tiny_finetune_model):
    """Each distinct caption runs the adapted layers once; rows come back in the batch's order, gradients included."""
    m = tiny_finetune_model
    captions = ["circle", "a photo of a circle", "circle"]
    adapter = m.trainable_parameters()[0]
    results = []
    for options in (REFERENCE, {}):
        use(m, **options)
        adapter.grad = None
        cond = m.get_training_conditioning(captions)
        (cond * torch.linspace(-1, 1, cond.numel()).view_as(cond)).sum().backward()
        results.append((cond.detach(), adapter.grad.clone()))
    (ref, ref_grad), (ours, grad) = results
    assert (ours - ref).abs().max() < 1e-5 and (grad - ref_grad).abs().max() < 1e-5 * ref_grad.abs().max()
    assert torch.equal(ours[0], ours[2]) and (ours[0] - ours[1]).abs().max() > 1e-2
    assert sorted(m._text_cache) == [("a photo of a circle", 9), ("circle", 9)]
    # One caption over the batch comes as one row expanded: the UNet's cross-attention may project it once.
    assert m.get_training_conditioning(["circle"] * 2).stride(0) == 0


def test_checkpointing_and_channels_last_change_no_number(tiny_finetune_model, data):
    m = tiny_finetune_model.train()
    batch = make_batch(data, [(1, False), (2, False)])
    use(m, **REFERENCE)
    ref_loss, ref_grad = train_step(m, batch, seed=3)
    use(m, gradient_checkpointing=True, channels_last=True)
    resblock = m.model.diffusion_model.middle_block[0]
    assert resblock.use_checkpoint and m.model.diffusion_model.middle_block[1].transformer_blocks[0].use_checkpoint
    assert resblock.in_layers[2].weight.is_contiguous(memory_format=torch.channels_last)
    calls = CallCounter([resblock.in_layers])
    loss, grad = train_step(m, batch, seed=3)
    calls.remove()
    assert calls(resblock.in_layers) == 2  # recomputed in backward: its activations were not kept
    assert abs(loss - ref_loss) <= 1e-5 and (grad - ref_grad).abs().max() <= 1e-5
    use(m, gradient_checkpointing="auto", channels_last="auto")  # "auto" is off on a CPU
    assert not resblock.use_checkpoint and resblock.in_layers[2].weight.is_contiguous()


def test_bf16_autocasts_the_unet_and_keeps_the_adapter_fp32(tiny_finetune_model, data):
    m = tiny_finetune_model.train()
    batch = make_batch(data, [(0, False), (1, True)])
    use(m, **REFERENCE)
    ref_loss, ref_grad = train_step(m, batch, seed=4)
    use(m, precision="bf16")
    dtypes = []
    handle = m.model.diffusion_model.out[2].register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    loss, grad = train_step(m, batch, seed=4)
    handle.remove()
    assert dtypes == [torch.bfloat16] and loss.dtype == grad.dtype == torch.float32
    assert m.trainable_parameters()[0].dtype == torch.float32
    assert abs(loss - ref_loss) < 0.05 * ref_loss
    cosine = torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0)
    assert cosine > 0.9, cosine


def test_bf16_holds_unet_weights_in_bf16_with_the_same_numbers(tiny_finetune_model, data):
    """Holding the frozen UNet's conv/linear weights in bf16 computes bit for bit what autocast computes from fp32
    weights (it casts them at every use); the time embedding stays fp32 so that the text context's gradient is
    still summed in fp32."""
    import copy

    held = tiny_finetune_model.train()
    batch = make_batch(data, [(0, False), (1, True)])
    autocast_only = copy.deepcopy(held)
    autocast_only.fast = autocast_only.check_fast_options({"precision": "bf16"})  # no prepare_fast_path: fp32 weights
    use(held, precision="bf16")
    unet = held.model.diffusion_model
    assert unet.input_blocks[0][0].weight.dtype == unet.out[2].weight.dtype == torch.bfloat16
    assert unet.time_embed[0].weight.dtype == torch.float32 and unet.out[0].weight.dtype == torch.float32  # norm
    assert {p.dtype for p in autocast_only.model.parameters()} == {torch.float32}
    loss, grad = train_step(held, batch, seed=5)
    ref_loss, ref_grad = train_step(autocast_only, batch, seed=5)
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
    use(held, precision="fp32")  # back to fp32 weights (with their bf16 rounding)
    assert unet.input_blocks[0][0].weight.dtype == torch.float32


def test_bad_fast_options_are_refused(tiny_finetune_model):
    m = tiny_finetune_model
    with pytest.raises(ValueError, match=r"unknown fast option\(s\) \['cache_latent'\]; known: \['cache_latents'"):
        m.check_fast_options({"cache_latent": True})
    with pytest.raises(ValueError, match="fast.precision must be fp32, bf16 or auto, got 'fp16'; "
                                         ".*lightning.trainer.precision: 16-mixed"):
        m.check_fast_options({"precision": "fp16"})
    with pytest.raises(ValueError, match="fast.channels_last must be true, false or auto, got 'yes'"):
        m.check_fast_options({"channels_last": "yes"})
    config = OmegaConf.load(TINY_FINETUNE)
    assert set(config.model.params.fast) == set(m.check_fast_options({}))  # the config documents every option


def test_dataset_names_each_picture(data):
    random.seed(0)
    flips = set()
    for i in range(12):
        item = data[i]
        assert item["index"] == i % data.num_images
        assert np.array_equal(item["image"], data.prepare(item["index"], item["flip"]))
        flips.add(item["flip"])
    assert flips == {False, True}


def test_cache_keys_leave_the_gpu_alone(tiny_finetune_model, data):
    """Lightning moves batches to the device after this hook: the keys must be Python values by then."""
    batch = tiny_finetune_model.on_before_batch_transfer(make_batch(data, [(4, True), (0, False)]), 0)
    assert batch["index"] == [4, 0] and batch["flip"] == [True, False]
