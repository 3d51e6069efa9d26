"""SAM-DA test-time adaptation: only the decoder adapter changes; the result is a model folder."""

from __future__ import annotations

import json

import pytest
import torch

from napari_amasam import cli
from napari_amasam.config import TrainConfig
from napari_amasam.errors import CheckpointError, DataError
from napari_amasam.inference.predictor import Predictor
from napari_amasam.training.adapt import AdaptConfig, dihedral, dihedral_inverse, run_adapt
from napari_amasam.training.trainer import run_training

from .helpers import aux_folder, primary_folder, tiny_model_config


def _train(tmp_path, kind: str, **overrides):
    primary = primary_folder(tmp_path, 2)
    cfg = TrainConfig(primary=str(primary), out=str(tmp_path / kind), epochs=1, steps_per_epoch=1,
                      batch_size=2, device="cpu", seed=0, amp=False, val_fraction=0.0,
                      tune_thresholds=False)
    out, _ = run_training(cfg, tiny_model_config(kind=kind, **overrides))
    return out


def test_adaptation_changes_only_the_decoder_adapter(tmp_path, capsys):
    model = _train(tmp_path, "sam-da", trainable_backbone=False)
    images = aux_folder(tmp_path, 2) / "images"
    code = cli.main(["adapt", "--model", str(model), "--images", str(images),
                     "--out", str(tmp_path / "adapted"), "--steps", "3", "--lr", "1e-2",
                     "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    adapted = tmp_path / "adapted"
    before = torch.load(model / "weights.pt", weights_only=True)
    after = torch.load(adapted / "weights.pt", weights_only=True)
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("decoder.decoder_adapter.") for k in changed)
    assert not any(torch.equal(before[k], after[k]) for k in before if ".up." in k)  # zero-init halves moved
    sam_before = torch.load(model / "base_sam.pt", weights_only=True)
    sam_after = torch.load(adapted / "base_sam.pt", weights_only=True)
    assert all(torch.equal(sam_before[k], sam_after[k]) for k in sam_before)
    doc = json.loads((adapted / "adaptation.json").read_text())
    assert doc["steps_done"] == 3 and all(n.startswith("decoder.decoder_adapter.")
                                          for n in doc["adapted_parameters"])
    assert json.loads((adapted / "config.json").read_text())["model"]["kind"] == "sam-da"
    predictor = Predictor.from_folder(adapted, device="cpu")
    labels = predictor.segment(torch.randint(0, 255, (96, 96, 3), dtype=torch.uint8).numpy())
    assert labels.shape == (96, 96)


def test_adaptation_needs_a_decoder_adapter_and_images(tmp_path, capsys):
    model = _train(tmp_path, "amasam")
    with pytest.raises(CheckpointError, match="no decoder adapter"):
        run_adapt(model, tmp_path, tmp_path / "out", AdaptConfig(steps=1, device="cpu"))
    da = _train(tmp_path, "sam-da", trainable_backbone=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no readable images"):
        run_adapt(da, empty, tmp_path / "out", AdaptConfig(steps=1, device="cpu"))
    code = cli.main(["adapt", "--model", str(model), "--images", str(empty), "--out",
                     str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_ERROR and "no decoder adapter" in err and len(err.strip().splitlines()) == 1


def test_dihedral_views_invert():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    views = [dihedral(x, k) for k in range(8)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert all(torch.equal(dihedral_inverse(dihedral(x, k), k), x) for k in range(8))
