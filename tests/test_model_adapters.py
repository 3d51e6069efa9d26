"""Encoder adapters: official keys kept, exact SAM equivalence at init, early-feature tap."""

from __future__ import annotations

import copy

import torch

from napari_amasam.config import ModelConfig
from napari_amasam.model.adapters import (
    AdaptedBlock,
    MLPAdapter,
    encode_with_early_features,
    first_global_block,
    insert_adapters,
)
from napari_amasam.model.backbone import (
    SAM_VARIANTS,
    build_sam_parts,
    load_sam_weights,
    sam_official_state_dict,
    variant_spec,
)


def tiny_encoder(image_size: int = 128):
    cfg = ModelConfig(backbone="tiny", image_size=image_size, tiny_embed_dim=64, tiny_depth=3,
                      tiny_heads=2, tiny_global_attn=(1,), tiny_window_size=7)
    sam = build_sam_parts(variant_spec(cfg), image_size, seed=3)
    # SAM initialises the relative position tables to zero: randomise them so they matter
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0, 0.2)
    return sam


def test_adapter_parameter_count_matches_method():
    # method.md 1.3 A: 295,872 parameters per ViT-B block, 3.55 M for 12 blocks
    assert sum(p.numel() for p in MLPAdapter(768, 0.25).parameters()) == 295872


def test_adapted_encoder_keeps_official_keys_and_loads_them():
    sam = tiny_encoder()
    plain_keys = set(sam.state_dict())
    insert_adapters(sam.image_encoder, 0.25, 0.5)
    adapted_keys = set(sam.state_dict())
    assert plain_keys <= adapted_keys
    assert all(".adapter." in k for k in adapted_keys - plain_keys)
    assert set(sam_official_state_dict(sam)) == plain_keys
    assert all(isinstance(b, AdaptedBlock) for b in sam.image_encoder.blocks)
    # official weights load strictly into the adapted model
    fresh = tiny_encoder()
    load_sam_weights(sam, fresh.state_dict(), "fresh")
    assert torch.equal(sam.image_encoder.blocks[0].attn.qkv.weight,
                       fresh.image_encoder.blocks[0].attn.qkv.weight)


def test_zero_initialised_adapters_reproduce_plain_sam_encoder():
    sam = tiny_encoder()
    plain = copy.deepcopy(sam.image_encoder).eval()
    insert_adapters(sam.image_encoder, 0.25, 0.5)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = plain(x)
        adapted = sam.image_encoder(x)
        tapped, early = encode_with_early_features(sam.image_encoder, x)
    assert torch.allclose(adapted, expected, rtol=0, atol=1e-6)
    assert torch.allclose(tapped, expected, rtol=0, atol=1e-6)
    assert early.shape == (2, 64, 8, 8)


def test_adapter_changes_the_output_once_trained():
    sam = tiny_encoder()
    plain = copy.deepcopy(sam.image_encoder).eval()
    adapters = insert_adapters(sam.image_encoder, 0.25, 0.5)
    with torch.no_grad():
        adapters[0].up.weight.normal_(0, 0.1)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert not torch.allclose(sam.image_encoder(x), plain(x), atol=1e-4)


def test_early_tap_is_first_global_block_output():
    sam = tiny_encoder()
    insert_adapters(sam.image_encoder, 0.25, 0.5)
    assert first_global_block(sam.image_encoder) == 1
    assert first_global_block(build_sam_parts(SAM_VARIANTS["vit_b"], 64).image_encoder) == 2
    seen = {}
    sam.image_encoder.blocks[1].register_forward_hook(lambda m, i, o: seen.setdefault("o", o))
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        _, early = encode_with_early_features(sam.image_encoder, x)
    assert torch.equal(early, seen["o"].permute(0, 3, 1, 2))
