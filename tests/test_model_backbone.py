"""SAM registry and checkpoint loader: official key layout, round trips, one-line errors."""

from __future__ import annotations

import logging
import pickle
import re

import pytest
import torch

from napari_amasam.config import ModelConfig
from napari_amasam.errors import CheckpointError
from napari_amasam.model import MODEL_REGISTRY, SAM_VARIANTS, build_amasam, load_sam_checkpoint
from napari_amasam.model.backbone import (
    build_sam_from_config,
    build_sam_parts,
    load_sam_weights,
    sam_official_state_dict,
    variant_spec,
)


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(backbone="tiny", image_size=128, tiny_embed_dim=64, tiny_depth=2,
                tiny_heads=2, tiny_global_attn=(1,), tiny_window_size=7)
    base.update(kw)
    return ModelConfig(**base)


def _family(key: str) -> str:
    return re.sub(r"blocks\.\d+\.", "blocks.N.", key)


def assert_one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


def test_registry_names():
    assert set(MODEL_REGISTRY) == {"tiny", "tiny_conv", "vit_b", "vit_l", "vit_h"}
    assert set(SAM_VARIANTS) == {"vit_b", "vit_l", "vit_h"}


def test_vit_b_sizes_match_official_table():
    sam = MODEL_REGISTRY["vit_b"](ModelConfig(backbone="vit_b"))
    sd = sam.state_dict()
    assert len(sd) == 314
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(sam.prompt_encoder) == 6220
    assert count(sam.mask_decoder) == 4058340
    assert abs(count(sam) / 1e6 - 93.74) < 0.005
    assert sd["image_encoder.pos_embed"].shape == (1, 64, 64, 768)
    assert sd["image_encoder.blocks.0.attn.rel_pos_h"].shape == (27, 64)  # windowed
    assert sd["image_encoder.blocks.2.attn.rel_pos_h"].shape == (127, 64)  # global
    assert "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in sd


def test_tiny_has_the_official_key_families():
    tiny = MODEL_REGISTRY["tiny"](tiny_cfg()).state_dict()
    official = build_sam_parts(SAM_VARIANTS["vit_b"], 128).state_dict()
    assert {_family(k) for k in tiny} == {_family(k) for k in official}
    assert tiny["image_encoder.pos_embed"].shape == (1, 8, 8, 64)


def test_tiny_random_weights_are_reproducible_and_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_sam_from_config(tiny_cfg()).state_dict()
    after = torch.rand(1)
    b = build_sam_from_config(tiny_cfg()).state_dict()
    assert torch.equal(before, after)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_config_errors_are_reported():
    from napari_amasam.config import ConfigError

    with pytest.raises(ConfigError, match="tiny_global_attn"):
        variant_spec(tiny_cfg(tiny_global_attn=(5,)))
    with pytest.raises(ConfigError, match="divisible"):
        variant_spec(tiny_cfg(tiny_heads=3))


def test_checkpoint_round_trip(tmp_path):
    source = build_sam_parts(variant_spec(tiny_cfg()), 128, seed=1)
    path = tmp_path / "tiny_sam.pth"
    torch.save(source.state_dict(), path)
    sd = load_sam_checkpoint(path, "tiny")
    target = build_sam_parts(variant_spec(tiny_cfg()), 128, seed=2)
    load_sam_weights(target, sd, str(path))
    got = target.state_dict()
    assert all(torch.equal(got[k], v) for k, v in source.state_dict().items())
    # and through build_amasam: the adapted model exposes the same official weights
    model = build_amasam(tiny_cfg(), checkpoint=path)
    assert all(torch.equal(model.sam_state_dict()[k], v) for k, v in source.state_dict().items())


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_wrapped_checkpoint_is_unwrapped(tmp_path, wrapper):
    source = build_sam_parts(variant_spec(tiny_cfg()), 128, seed=1)
    path = tmp_path / "wrapped.pth"
    torch.save({wrapper: source.state_dict(), "epoch": torch.tensor(3)}, path)
    sd = load_sam_checkpoint(path, "tiny")
    assert set(sd) == set(source.state_dict())


def test_weights_for_another_image_size_are_resized(tmp_path):
    source = build_sam_parts(variant_spec(tiny_cfg()), 128, seed=1)  # embedding 8x8
    target = build_sam_parts(variant_spec(tiny_cfg(image_size=256)), 256, seed=2)  # 16x16
    load_sam_weights(target, source.state_dict(), "tiny128")
    sd = target.state_dict()
    assert sd["image_encoder.pos_embed"].shape == (1, 16, 16, 64)
    assert sd["image_encoder.blocks.1.attn.rel_pos_h"].shape == (31, 32)  # global block
    assert torch.equal(sd["image_encoder.blocks.0.attn.qkv.weight"],
                       source.state_dict()["image_encoder.blocks.0.attn.qkv.weight"])


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as exc:
        load_sam_checkpoint(tmp_path / "nope.pth", "vit_b")
    assert "nope.pth" in assert_one_line(exc) and "not found" in str(exc.value)


@pytest.mark.parametrize(
    "content",
    [{"weight": torch.zeros(2)}, [torch.zeros(2)], {"a": 1}],
    ids=["dict-without-encoder", "list", "no-tensors"],
)
def test_not_a_sam_checkpoint(tmp_path, content):
    path = tmp_path / "other.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError) as exc:
        load_sam_checkpoint(path, "vit_b")
    assert "other.pth" in assert_one_line(exc) and "not a SAM checkpoint" in str(exc.value)


def test_python_object_pickle_is_not_sam(tmp_path):
    path = tmp_path / "objects.pth"
    path.write_bytes(pickle.dumps(logging.getLogger("x"), protocol=2))
    with pytest.raises(CheckpointError) as exc:
        load_sam_checkpoint(path, "vit_b")
    assert "not a SAM checkpoint" in assert_one_line(exc)


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_truncated_or_corrupt_file(tmp_path, kind):
    path = tmp_path / "broken.pth"
    good = tmp_path / "good.pth"
    torch.save(build_sam_parts(variant_spec(tiny_cfg()), 128).state_dict(), good)
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"\x00junk" * 50)
    with pytest.raises(CheckpointError) as exc:
        load_sam_checkpoint(path, "tiny")
    message = assert_one_line(exc)
    assert "broken.pth" in message and "truncated, corrupt" in message


def _fake_state_dict(embed_dim: int, depth: int) -> dict[str, torch.Tensor]:
    # only what the variant check reads: the embed dim and the block count
    sd = {"image_encoder.pos_embed": torch.zeros(1, 1, 1, embed_dim)}
    for i in range(depth):
        sd[f"image_encoder.blocks.{i}.norm1.weight"] = torch.ones(1)
    return sd


@pytest.mark.parametrize(
    "looks_like,requested",
    [("vit_l", "vit_b"), ("vit_h", "vit_l"), ("vit_b", "vit_h"), ("vit_b", "tiny")],
)
def test_wrong_variant_names_what_it_looks_like(tmp_path, looks_like, requested):
    spec = SAM_VARIANTS[looks_like]
    path = tmp_path / f"sam_{looks_like}.pth"
    torch.save(_fake_state_dict(spec.embed_dim, spec.depth), path)
    with pytest.raises(CheckpointError) as exc:
        load_sam_checkpoint(path, requested)
    assert assert_one_line(exc) == (
        f"sam_{looks_like}.pth looks like a {looks_like} checkpoint, not {requested}"
    )


def test_custom_shape_is_not_an_official_variant(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save(_fake_state_dict(768, 5), path)
    with pytest.raises(CheckpointError, match=r"custom \(embed 768, depth 5\) checkpoint, not vit_b"):
        load_sam_checkpoint(path, "vit_b")


def test_incomplete_or_misfitting_weights_fail_strictly():
    sam = build_sam_parts(variant_spec(tiny_cfg()), 128)
    sd = sam_official_state_dict(sam)
    partial = {k: v for k, v in sd.items() if not k.startswith("mask_decoder.")}
    with pytest.raises(CheckpointError, match="SAM weight.s. missing, e.g. mask_decoder"):
        load_sam_weights(sam, partial, "partial.pth")
    extra = dict(sd, **{"image_encoder.blocks.9.norm1.weight": torch.ones(64)})
    with pytest.raises(CheckpointError, match="1 unexpected"):
        load_sam_weights(sam, extra, "extra.pth")
    wrong = dict(sd, **{"image_encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="qkv.weight has shape"):
        load_sam_weights(sam, wrong, "wrong.pth")


def test_vit_without_checkpoint_warns(caplog):
    with caplog.at_level(logging.WARNING):
        sam = build_sam_from_config(ModelConfig(backbone="vit_b", image_size=256))
    assert "random SAM weights" in caplog.text
    assert sam.image_encoder.pos_embed.shape == (1, 16, 16, 768)


@pytest.mark.slow
def test_full_size_vit_b_checkpoint_round_trip(tmp_path):
    source = build_sam_parts(SAM_VARIANTS["vit_b"], 1024, seed=5)
    path = tmp_path / "sam_vit_b_test.pth"
    torch.save(source.state_dict(), path)
    assert path.stat().st_size > 370e6
    model = build_amasam(ModelConfig(backbone="vit_b"), checkpoint=path)
    got = model.sam_state_dict()
    expected = source.state_dict()
    assert set(got) == set(expected) and len(got) == 314
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    with pytest.raises(CheckpointError) as exc:
        load_sam_checkpoint(path, "vit_l")
    assert str(exc.value) == "sam_vit_b_test.pth looks like a vit_b checkpoint, not vit_l"
