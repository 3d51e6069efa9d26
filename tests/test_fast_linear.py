"""``fast_linear`` runs oneDNN's linear where that is allowed and gives what the module
gives: float32 without gradients, and under CPU bf16 autocast with cached bf16 weights that
follow every change of the parameters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from napari_amasam.model import fast_linear as fl
from napari_amasam.model.fast_linear import fast_linear, onednn_linear_dtype


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = expected.abs().max().item()
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= rel * max(scale, 1e-6), f"max abs diff {diff:.3e} vs output scale {scale:.3e}"


def _bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.skipif(not fl._HAS_ONEDNN_LINEAR, reason="this torch build has no oneDNN linear")
def test_onednn_linear_used_only_without_gradient(monkeypatch):
    calls = []
    original = fl.onednn_linear_dtype
    monkeypatch.setattr(fl, "onednn_linear_dtype",
                        lambda x, layer: calls.append(original(x, layer)) or calls[-1])
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(3, 16)
    with torch.no_grad():
        _assert_close(fast_linear(layer, x), layer(x), 1e-5)
    assert calls == [torch.float32]
    y = fast_linear(layer, x)  # weights require grad: must stay differentiable
    assert y.requires_grad and calls[-1] is None
    layer.register_forward_hook(lambda module, args, out: out * 0)
    with torch.no_grad():
        assert torch.equal(fast_linear(layer, x), torch.zeros(3, 8))  # hooks are honoured
    assert calls[-1] is None


@pytest.mark.skipif(not fl._HAS_ONEDNN_BF16_LINEAR, reason="no oneDNN bf16 linear in this build")
@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh", "relu"])
def test_bf16_autocast_linear_matches_autocast_module(activation):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 40)
    x = torch.randn(2, 9, 48)
    act = {"none": lambda y: y, "relu": F.relu, "gelu": F.gelu,
           "gelu_tanh": lambda y: F.gelu(y, approximate="tanh")}[activation]
    with torch.no_grad(), _bf16_autocast():
        assert onednn_linear_dtype(x, layer) == torch.bfloat16
        expected = act(layer(x))  # what autocast computes: bf16 operands and output
        actual = fast_linear(layer, x, activation)
    assert actual.dtype == expected.dtype == torch.bfloat16 and actual.shape == (2, 9, 40)
    _assert_close(actual, expected, 2e-2)  # both round to bf16 (8 bits of mantissa)
    with torch.no_grad():
        exact = act(layer(x))
    _assert_close(actual, exact, 2e-2)


@pytest.mark.skipif(not fl._HAS_ONEDNN_BF16_LINEAR, reason="no oneDNN bf16 linear in this build")
def test_bf16_weights_are_converted_once_and_follow_parameter_changes():
    torch.manual_seed(1)
    layer = torch.nn.Linear(32, 16)
    x = torch.randn(5, 32)

    def run():
        with torch.no_grad(), _bf16_autocast():
            return fast_linear(layer, x)

    first = run()
    cached = fl._bf16_cache[layer][3]
    assert torch.equal(run(), first) and fl._bf16_cache[layer][3] is cached  # reused

    with torch.no_grad():
        layer.weight.mul_(-1.0)  # an optimiser step or load_state_dict: same tensor, new version
    flipped = run()
    assert fl._bf16_cache[layer][3] is not cached
    _assert_close(flipped - layer.bias.bfloat16(), -(first - layer.bias.bfloat16()), 2e-2)

    layer.weight.data = layer.weight.detach() * 2.0  # same Parameter and version, new storage
    with torch.no_grad():
        _assert_close(run(), x @ layer.weight.T + layer.bias, 2e-2)

    layer.bias = torch.nn.Parameter(torch.zeros(16))  # a new Parameter object, version 0 too
    with torch.no_grad():
        _assert_close(run(), x @ layer.weight.T, 2e-2)

    # A write PyTorch does not count (through .data) is not seen until the cache is cleared.
    before = run()
    with torch.no_grad():
        layer.weight.data.copy_(-layer.weight.data)
    assert torch.equal(run(), before)
    assert fl.clear_bf16_cache(layer) == 1 and layer not in fl._bf16_cache
    with torch.no_grad():
        _assert_close(run(), x @ layer.weight.T, 2e-2)

    # The cache lives beside the module: copies and state dicts never carry it.
    clone = copy.deepcopy(layer)
    assert clone not in fl._bf16_cache and set(layer.state_dict()) == {"weight", "bias"}


def test_bf16_autocast_with_gradient_keeps_the_module_forward():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    with _bf16_autocast():
        assert onednn_linear_dtype(x, layer) is None
        y = fast_linear(layer, x, "gelu")
    assert y.requires_grad
    y.float().sum().backward()
    assert layer.weight.grad is not None


@pytest.mark.skipif(not fl._HAS_ONEDNN_BF16_LINEAR, reason="no oneDNN bf16 linear in this build")
def test_bf16_fast_encoder_agrees_with_the_reference_under_autocast(monkeypatch):
    """A SAM-shaped encoder (padded windows, one global block, rel-pos) on the fast path under
    CPU bf16 autocast: bf16 oneDNN linears on 4-D tokens, the selector-built window bias and
    the projected padding token together agree with segment_anything's own forward."""
    from segment_anything.modeling.image_encoder import ImageEncoderViT

    from napari_amasam.model.fast_attention import (
        enable_fast_attention,
        enable_fast_mlp,
        reference_attention,
    )

    torch.manual_seed(3)
    encoder = ImageEncoderViT(img_size=128, patch_size=16, embed_dim=48, depth=2, num_heads=3,
                              use_rel_pos=True, window_size=5, global_attn_indexes=(1,),
                              out_chans=32).eval()
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                param.normal_(0.0, 0.5)
    enable_fast_attention(encoder)
    enable_fast_mlp(encoder)
    seen = []
    original = fl.onednn_linear_dtype
    monkeypatch.setattr(fl, "onednn_linear_dtype",
                        lambda x, layer: seen.append(original(x, layer)) or seen[-1])
    image = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        exact = encoder(image)
        with _bf16_autocast():
            fast = encoder(image)
            with reference_attention():
                reference = encoder(image)
    assert seen and all(dtype == torch.bfloat16 for dtype in seen[len(seen) // 2:])
    _assert_close(fast, reference, 3e-2)
    _assert_close(fast, exact, 3e-2)
