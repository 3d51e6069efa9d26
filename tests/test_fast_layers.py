"""The fast convolutional side (model.fast_layers, the HR-Decoder's fast full-resolution
stage) reproduces the reference forward to float32 rounding, in inference and training,
on a tiny AMA-SAM; and it really is the path taken."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d

from napari_amasam.model import build_amasam
from napari_amasam.model.adapters import MLPAdapter
from napari_amasam.model.fast_attention import reference_attention
from napari_amasam.model.fast_layers import (
    FastLayerNorm2d,
    FastMLPAdapter,
    conv2d_gelu,
    disable_fast_layers,
    enable_fast_layers,
)
from napari_amasam.model.hr_decoder import pixel_ensemble

from .helpers import tiny_model_config


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= rel * max(scale, 1e-6), f"max abs diff {diff:.3e} vs output scale {scale:.3e}"


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Zero-initialised parts (adapter outputs, refine's last conv, rel-pos tables, biases)
    would hide a wrong fast path: give them small random values (the rest keeps its init,
    so the network stays well conditioned)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def test_fast_layer_norm_matches_reference_and_is_channels_last():
    torch.manual_seed(0)
    norm = LayerNorm2d(12)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 12, 9, 7) * 3 + 1
    expected = norm(x)
    assert enable_fast_layers(norm) == 1 and type(norm) is FastLayerNorm2d
    actual = norm(x)
    _assert_close(actual, expected, 1e-5)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    with reference_attention():
        assert torch.equal(norm(x), expected)
    assert disable_fast_layers(norm) == 1 and type(norm) is LayerNorm2d


@pytest.mark.parametrize("grad", [False, True])
def test_conv2d_gelu_matches_separate_ops(grad):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 4, 3, padding=1)
    x = torch.randn(1, 5, 16, 12).contiguous(memory_format=torch.channels_last)
    expected = F.gelu(conv(x))
    with torch.set_grad_enabled(grad):
        actual = conv2d_gelu(conv, x)
    _assert_close(actual, expected, 1e-5)
    assert actual.requires_grad == grad


def test_channels_last_pixel_ensemble_is_the_same_map():
    slices = torch.randn(2, 48, 5, 6)
    plain = pixel_ensemble(slices)
    fast = pixel_ensemble(slices, channels_last=True)
    assert torch.equal(plain, fast) and fast.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, F.pixel_shuffle(slices, 4))


def _tiny_model():
    torch.manual_seed(0)
    model = build_amasam(tiny_model_config(num_domains=2))
    _randomise(model)
    return model


def test_fast_path_is_enabled_and_keeps_state_dict_keys():
    model = _tiny_model()
    types = [type(m) for m in model.modules()]
    assert LayerNorm2d not in types and MLPAdapter not in types
    assert FastLayerNorm2d in types and FastMLPAdapter in types
    assert model.hr_decoder.fast_fusion
    reference = build_amasam(tiny_model_config(num_domains=2, fast_attention=False))
    assert not reference.hr_decoder.fast_fusion
    assert LayerNorm2d in [type(m) for m in reference.modules()]
    assert sorted(model.state_dict()) == sorted(reference.state_dict())


def test_whole_tiny_model_inference_matches_reference():
    model = _tiny_model().eval()
    images = torch.rand(2, 3, 128, 128) * 255
    with torch.inference_mode():
        fast = model(images)
        with reference_attention():
            reference = model(images)
    for name in ("fine_logits", "coarse_logits", "distance_logits"):
        _assert_close(getattr(fast, name), getattr(reference, name))
    assert fast.distance_logits.is_contiguous()


def test_whole_tiny_model_training_step_matches_reference():
    """With gradients the fast path falls back to differentiable ops (channels-last,
    F.layer_norm); outputs and parameter gradients equal the reference's."""
    model = _tiny_model().train()
    images = torch.rand(2, 3, 128, 128) * 255
    domain = torch.tensor([0, 1])
    results = []
    for reference in (False, True):
        model.zero_grad()
        torch.manual_seed(1)  # the discriminator's dropout draws the same masks
        context = reference_attention() if reference else torch.enable_grad()
        with context:
            out = model(images, domain=domain, lam=0.5)
            loss = (
                out.fine_logits.square().mean()
                + out.distance_logits.sin().mean()
                + out.coarse_logits.mean()
                + out.domain_logits.sum()
            )
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (fast, fast_grads), (ref, ref_grads) = results
    _assert_close(fast.fine_logits, ref.fine_logits)
    _assert_close(fast.domain_logits, ref.domain_logits)
    assert sorted(fast_grads) == sorted(ref_grads) and len(fast_grads) > 10
    for name in ref_grads:
        _assert_close(fast_grads[name], ref_grads[name], 1e-3)
