"""SAM-DA decoder adapter and CA-SAM alignment layer."""

from __future__ import annotations

import torch

from napari_amasam.config import ModelConfig
from napari_amasam.model.backbone import build_sam_parts, variant_spec
from napari_amasam.model.variants import AlignmentLayer, DecoderAdapter


def _transformer():
    cfg = ModelConfig(backbone="tiny", image_size=128, tiny_embed_dim=64, tiny_depth=2,
                      tiny_heads=2, tiny_global_attn=(1,))
    return build_sam_parts(variant_spec(cfg), 128, seed=0).mask_decoder.transformer


def _inputs():
    torch.manual_seed(0)
    return torch.randn(2, 256, 8, 8), torch.randn(2, 256, 8, 8), torch.randn(2, 7, 256)


def test_decoder_adapter_without_prompts_reproduces_sam_transformer():
    transformer = _transformer()
    src, pe, tokens = _inputs()
    adapter = DecoderAdapter(depth=2, num_prompts=0)
    with torch.no_grad():
        q_ref, k_ref = transformer(src, pe, tokens)
        q, k = adapter(transformer, src, pe, tokens)
    assert torch.allclose(q, q_ref, rtol=0, atol=1e-6)
    assert torch.allclose(k, k_ref, rtol=0, atol=1e-6)


def test_decoder_adapter_prompts_and_adapters_act():
    transformer = _transformer()
    src, pe, tokens = _inputs()
    adapter = DecoderAdapter(depth=2, num_prompts=8)
    # 70,784 parameters: 2x8x256 prompts + 4 adapters 256->32->256
    assert sum(p.numel() for p in adapter.parameters()) == 70784
    with torch.no_grad():
        q_ref, k_ref = transformer(src, pe, tokens)
        q, k = adapter(transformer, src, pe, tokens)
        assert q.shape == q_ref.shape == (2, 7, 256) and k.shape == k_ref.shape == (2, 64, 256)
        assert not torch.allclose(q, q_ref, atol=1e-4)  # the prompts join the attention
        no_prompt = DecoderAdapter(depth=2, num_prompts=0)
        no_prompt.image_adapters[1].up.weight.normal_()
        _, k2 = no_prompt(transformer, src, pe, tokens)
        assert not torch.allclose(k2, k_ref, atol=1e-4)  # the image-stream adapter acts


def test_alignment_layer_is_identity_at_init_then_learns():
    layer = AlignmentLayer(2)
    x = torch.randn(2, 256, 8, 8)
    with torch.no_grad():
        assert torch.equal(layer(x), x)
        layer[0].conv2.weight.normal_(0, 0.01)
        assert not torch.allclose(layer(x), x, atol=1e-5)
    per_block = sum(p.numel() for p in layer[0].parameters())
    assert 1.17e6 < per_block < 1.2e6  # method.md 3.2: about 1.2 M per block
