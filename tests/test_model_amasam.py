"""AmaSam: output contract, frozen/trainable split, weight round trips, parameter report."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_amasam.config import ModelConfig
from napari_amasam.errors import CheckpointError
from napari_amasam.model import AmaSam, AmaSamOutput, build_amasam


def tiny_cfg(**kw) -> ModelConfig:
    # frozen encoder, as AMA-SAM keeps a pretrained SAM (random backbones train by default)
    base = dict(backbone="tiny", image_size=128, tiny_embed_dim=64, tiny_depth=2,
                tiny_heads=2, tiny_global_attn=(1,), tiny_window_size=7, num_domains=3,
                trainable_backbone=False)
    base.update(kw)
    return ModelConfig(**base)


def _images(batch, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 255


def _perturb_trainable(model, seed=0):
    # zero-initialised parts would make round-trip tests pass trivially
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in model._trainable_names:
            p = dict(model.named_parameters())[name]
            p.add_(0.01 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("size", [128, 256, 512, pytest.param(1024, marks=pytest.mark.slow)])
def test_output_shapes(size):
    model = build_amasam(tiny_cfg(image_size=size)).eval()
    with torch.no_grad():
        out = model(_images(1, size), domain=torch.tensor([1]), lam=0.5)
    assert isinstance(out, AmaSamOutput)
    assert out.fine_logits.shape == (1, 1, size, size)
    assert out.coarse_logits.shape == (1, 1, size // 4, size // 4)
    assert out.distance_logits.shape == (1, 2, size, size)
    assert out.domain_logits.shape == (1, 1)
    assert torch.isfinite(out.fine_logits).all()


@pytest.mark.parametrize(
    "kw,domain_given",
    [({}, False), ({"alignment": "none"}, True), ({"num_domains": 1}, True)],
)
def test_domain_logits_only_when_aligning(kw, domain_given):
    model = build_amasam(tiny_cfg(distance_heads=False, **kw)).eval()
    domain = torch.tensor([0, 1]) if domain_given else None
    with torch.no_grad():
        out = model(_images(2, 128), domain=domain, lam=1.0)
    assert out.domain_logits is None and out.distance_logits is None
    if kw:
        assert model.discriminator is None


def test_bad_inputs_raise():
    model = build_amasam(tiny_cfg())
    with pytest.raises(ValueError, match="images must be B,3,128,128"):
        model(_images(1, 256))
    with pytest.raises(ValueError, match="domain must have shape"):
        model(_images(2, 128), domain=torch.tensor([0, 1, 1]))


def test_frozen_sam_gets_no_gradient_trainable_parts_do():
    model = build_amasam(tiny_cfg()).train()
    out = model(_images(2, 128), domain=torch.tensor([0, 1]), lam=0.5)
    loss = (out.fine_logits.mean() + out.coarse_logits.mean() + out.distance_logits.mean()
            + F.binary_cross_entropy_with_logits(out.domain_logits, torch.tensor([[1.0], [0.0]])))
    loss.backward()
    trainable = set(model._trainable_names)
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # the frozen SAM weights are all of SAM except the adapters
    assert all(".adapter." in n for n in trainable if n.startswith("sam."))
    assert any(".adapter." in n for n in trainable)
    adapter = model.sam.image_encoder.blocks[0].adapter
    assert adapter.up.weight.grad.abs().sum() > 0


def test_trainable_backbone_trains_the_encoder():
    model = build_amasam(tiny_cfg(trainable_backbone=True, train_decoder_transformer=True))
    names = set(model.trainable_state_dict())
    assert "sam.image_encoder.blocks.0.attn.qkv.weight" in names
    assert not any(n.startswith("sam.mask_decoder.") for n in names)
    assert any(n.startswith("hr_decoder.transformer_copy.") for n in names)


@pytest.mark.parametrize("mode,expect_zero", [("cgrl", True), ("grl", False)])
def test_model_level_domain_gradient_routing(mode, expect_zero):
    # an all-primary batch: CGRL sends no domain gradient into the encoder, GRL does
    model = build_amasam(tiny_cfg(alignment=mode, distance_heads=False)).eval()
    out = model(_images(2, 128), domain=torch.tensor([0, 0]), lam=1.0)
    F.binary_cross_entropy_with_logits(out.domain_logits, torch.ones(2, 1)).backward()
    adapter_grad = model.sam.image_encoder.blocks[1].adapter.up.weight.grad
    assert bool(adapter_grad.abs().sum() == 0) is expect_zero
    assert model.discriminator.classifier[-1].weight.grad.abs().sum() > 0


def test_coarse_mask_becomes_the_dense_prompt():
    model = build_amasam(tiny_cfg())
    no_mask = model.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    sure = torch.full((2, 1, 32, 32), 10.0)  # sigmoid > 0.95 everywhere
    with torch.no_grad():
        dense = model.dense_prompt(sure)
        expected = model.sam.prompt_encoder.mask_downscaling(torch.ones(2, 1, 32, 32))
        assert dense.shape == (2, 256, 8, 8)
        assert torch.allclose(dense, expected)
        unsure = model.dense_prompt(torch.zeros(2, 1, 32, 32))  # 0.5 < threshold: empty mask
        assert torch.allclose(unsure, model.sam.prompt_encoder.mask_downscaling(torch.zeros(2, 1, 32, 32)))
        off = build_amasam(tiny_cfg(coarse_as_prompt=False)).dense_prompt(sure)
    assert off.shape == (2, 256, 8, 8) and torch.equal(off, no_mask.expand(2, -1, 8, 8))


def test_trainable_state_dict_round_trip(tmp_path):
    cfg = tiny_cfg(decoder_adapter=True, alignment_layer_blocks=1)
    first = build_amasam(cfg).eval()
    _perturb_trainable(first)
    sd = first.trainable_state_dict()
    assert not any(k.startswith("sam.") and ".adapter." not in k for k in sd)
    assert any(k.startswith("discriminator.") for k in sd)
    assert any(k.startswith("hr_decoder.decoder_adapter.") for k in sd)
    assert any(k.startswith("alignment_layer.") for k in sd)
    path = tmp_path / "trainable.pt"
    torch.save(sd, path)
    second = build_amasam(cfg).eval()
    images = _images(1, 128)
    with torch.no_grad():
        assert not torch.equal(second(images).fine_logits, first(images).fine_logits)
        second.load_trainable_state_dict(torch.load(path, weights_only=True))
        a, b = first(images), second(images)
    assert torch.equal(a.fine_logits, b.fine_logits)
    assert torch.equal(a.distance_logits, b.distance_logits)
    assert torch.equal(a.coarse_logits, b.coarse_logits)


def test_trainable_state_dict_mismatch_is_one_line_error():
    sd = build_amasam(tiny_cfg()).trainable_state_dict()
    other = build_amasam(tiny_cfg(distance_heads=False, num_domains=1))
    with pytest.raises(CheckpointError) as exc:
        other.load_trainable_state_dict(sd, source="model/weights.pt")
    message = str(exc.value)
    assert "\n" not in message and message.startswith("model/weights.pt: do not match")
    assert "unexpected, e.g. discriminator" in message
    bigger = build_amasam(tiny_cfg(adapter_ratio=0.5))
    with pytest.raises(CheckpointError, match="adapter.down.weight has shape"):
        bigger.load_trainable_state_dict(sd)


def test_sam_state_dict_is_official_layout():
    model = build_amasam(tiny_cfg())
    sam_sd = model.sam_state_dict()
    assert not any(".adapter." in k for k in sam_sd)
    assert set(k.split(".")[0] for k in sam_sd) == {"image_encoder", "prompt_encoder", "mask_decoder"}
    other = AmaSam(tiny_cfg())
    other.load_sam_state_dict(sam_sd)


def test_vit_b_parameter_report():
    report = build_amasam(ModelConfig(backbone="vit_b", num_domains=4)).parameter_report()
    assert abs(report["total"] / 1e6 - 98.36) < 0.05
    assert report["trainable"] == sum(report["modules"].values())
    assert report["modules"]["encoder adapters"] == 12 * 295872
    assert report["share"] == pytest.approx(report["trainable"] / report["total"])
    assert report["share"] <= 0.05
