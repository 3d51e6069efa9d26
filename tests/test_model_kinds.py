"""Model kinds amasam / sam-da / ca-sam: what trains, parameter budgets, forward contract."""

from __future__ import annotations

import pytest
import torch

from napari_amasam.config import ConfigError, ModelConfig
from napari_amasam.model import build_amasam

from .helpers import tiny_model_config


def _meta_build(kind: str):
    """The real vit_b shapes, built on the meta device (no memory, no 1024-px forward)."""
    with torch.device("meta"):
        return build_amasam(ModelConfig(backbone="vit_b", kind=kind))


def _trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_vit_b_sam_da_trains_under_one_percent_and_only_the_decoder_adapter():
    model = _meta_build("sam-da")
    report = model.parameter_report()
    print(f"sam-da vit_b: {report['trainable']} of {report['total']} ({100 * report['share']:.3f} %)")
    assert report["share"] < 0.01
    assert report["trainable"] == 70784 + 6  # adapter + prompts (method.md 3.1) + output affine
    names = _trainable(model)
    assert names and all(n.startswith("decoder.") for n in names)
    assert not any(p.requires_grad for p in model.sam.parameters())  # encoder and decoder frozen
    assert not any(".adapter." in n for n, _ in model.sam.image_encoder.named_parameters())


def test_vit_b_ca_sam_trains_alignment_layer_and_heads_only():
    model = _meta_build("ca-sam")
    report = model.parameter_report()
    print(f"ca-sam vit_b: {report['trainable']} of {report['total']} ({100 * report['share']:.3f} %)")
    names = _trainable(model)
    assert {n.split(".")[0] for n in names} == {"alignment_layers", "coarse_head", "hr_decoder"}
    assert not any(p.requires_grad for p in model.sam.parameters())
    assert not any(".adapter." in n for n, _ in model.sam.image_encoder.named_parameters())
    assert not any(n.startswith("hr_decoder.early_up") for n, _ in model.named_parameters())
    # one 2-block alignment layer (~1.19 M per block, method.md 3.2) + the heads
    assert 2.3e6 < report["modules"]["alignment layers"] < 2.4e6
    amasam = _meta_build("amasam").parameter_report()
    assert report["share"] < amasam["share"]  # frozen encoder: no 3.55 M encoder adapters


def test_kind_config_validation_and_round_trip():
    with pytest.raises(ConfigError, match="model kind"):
        ModelConfig(kind="sam3")
    with pytest.raises(ConfigError, match="keeps SAM frozen"):
        ModelConfig(kind="sam-da", trainable_backbone=True)
    cfg = ModelConfig(kind="ca-sam", num_tasks=3)
    assert cfg.alignment_layer_blocks == 2
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_sam_da_forward_contract_and_gradients_reach_only_the_adapter():
    model = build_amasam(tiny_model_config(kind="sam-da", trainable_backbone=False))
    model.train()
    images = torch.rand(2, 3, 128, 128) * 255
    out = model(images)
    assert out.fine_logits.shape == (2, 1, 128, 128)
    assert out.distance_logits.shape == (2, 2, 128, 128)
    assert out.coarse_logits.shape == (2, 1, 32, 32)
    (out.fine_logits.mean() + out.distance_logits.mean()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(_trainable(model))
    assert all(n.startswith("decoder.") for n in with_grad)
    # trainable weights round-trip through the model folder's format
    state = model.trainable_state_dict()
    fresh = build_amasam(tiny_model_config(kind="sam-da", trainable_backbone=False))
    fresh.load_trainable_state_dict(state)
    assert all(torch.equal(fresh.trainable_state_dict()[k], v) for k, v in state.items())


def test_ca_sam_alignment_layer_is_the_only_path_of_encoder_features():
    model = build_amasam(tiny_model_config(kind="ca-sam", trainable_backbone=False, fuse_image=False))
    model.eval()
    model.active_task = 0
    a, b = torch.rand(1, 3, 128, 128) * 255, torch.rand(1, 3, 128, 128) * 255
    with torch.no_grad():
        assert not torch.equal(model(a).fine_logits, model(b).fine_logits)

        class Constant(torch.nn.Module):
            def forward(self, x):
                return torch.ones_like(x)

        model.alignment_layers[0] = Constant()  # the decoder now sees the same features for any image
        out_a, out_b = model(a), model(b)
    assert torch.equal(out_a.fine_logits, out_b.fine_logits)
    assert torch.equal(out_a.distance_logits, out_b.distance_logits)
    assert out_a.task.tolist() == [0]


def test_ca_sam_training_mode_uses_the_newest_task():
    model = build_amasam(tiny_model_config(kind="ca-sam", num_tasks=2, trainable_backbone=False))
    model.train()
    out = model(torch.rand(2, 3, 128, 128) * 255)
    assert out.task.tolist() == [1, 1]
    out.fine_logits.mean().backward()
    assert model.alignment_layers[1][0].conv1.weight.grad is not None
    assert model.alignment_layers[0][0].conv1.weight.grad is None
