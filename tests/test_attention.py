"""SpatialTransformer keeps its input's memory layout; one context repeated over the batch is projected once."""
import torch

from ldm.modules.attention import CrossAttention, SpatialTransformer


def test_spatial_transformer_answers_in_its_inputs_memory_layout():
    torch.manual_seed(0)
    block = SpatialTransformer(32, 4, 8, context_dim=16).eval()
    x, context = torch.randn(2, 32, 8, 8), torch.randn(2, 77, 16)
    with torch.no_grad():
        out = block(x, context)
        nhwc = block(x.contiguous(memory_format=torch.channels_last), context)
    # A layout mismatch makes every later convolution convert it (the UNet ran 1.6x slower on a CPU).
    assert out.is_contiguous()
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    assert (out - nhwc).abs().max() < 1e-5


def test_one_context_over_the_batch_is_projected_once():
    torch.manual_seed(0)
    attn = CrossAttention(32, 16, heads=4, dim_head=8)
    x, one = torch.randn(3, 10, 32), torch.randn(1, 77, 16, requires_grad=True)
    rows = []
    attn.to_k.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    out = attn(x, one.expand(3, -1, -1))
    grad, = torch.autograd.grad(out.square().sum(), one)
    repeated = one.detach().repeat(3, 1, 1).requires_grad_(True)
    expected = attn(x, repeated)
    expected_grad = torch.autograd.grad(expected.square().sum(), repeated)[0].sum(0, keepdim=True)
    assert rows == [1, 3]  # projected once for the expanded context, per image for the repeated one
    assert (out - expected).abs().max() < 1e-6 and (grad - expected_grad).abs().max() < 1e-5
