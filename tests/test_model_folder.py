"""Model folders: atomic writes, self-description, base-checkpoint checks, clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from napari_amasam import model_folder as mf
from napari_amasam.config import ModelConfig, PostprocessConfig, TrainConfig
from napari_amasam.device import resolve_device
from napari_amasam.errors import CheckpointError, DeviceError


def _vit_folder(tmp_path, checkpoint):
    folder = tmp_path / "model"
    record = {"name": checkpoint.name, "sha256": mf.sha256_file(checkpoint), "path": str(checkpoint)}
    mf.write_config(folder, ModelConfig(backbone="vit_b"), TrainConfig(primary="p", out=str(folder)),
                    record, mpp=0.25)
    mf.write_thresholds(folder, PostprocessConfig(min_size=33))
    return folder


def test_config_round_trip_is_self_describing(tmp_path):
    ckpt = tmp_path / "sam_vit_b_01ec64.pth"
    ckpt.write_bytes(b"pretend weights")
    folder = mf.read_model_folder(_vit_folder(tmp_path, ckpt))
    assert folder.model.backbone == "vit_b" and folder.mpp == 0.25
    assert folder.thresholds.min_size == 33
    assert folder.base_checkpoint["name"] == "sam_vit_b_01ec64.pth"
    doc = json.loads((folder.path / "config.json").read_text())
    assert doc["normalisation"]["pixel_mean"] == [123.675, 116.28, 103.53]
    assert doc["package_version"] and doc["seed"] == 0


@pytest.mark.parametrize("mpp", ["NaN", "Infinity", "-Infinity", "0"])
def test_config_mpp_must_be_positive_and_finite(tmp_path, mpp):
    """json reads NaN and Infinity as floats; an mpp that is not a positive finite number is
    a one-line error naming it."""
    ckpt = tmp_path / "sam_vit_b_01ec64.pth"
    ckpt.write_bytes(b"pretend weights")
    folder = _vit_folder(tmp_path, ckpt)
    text = (folder / "config.json").read_text()
    assert '"mpp": 0.25' in text
    (folder / "config.json").write_text(text.replace('"mpp": 0.25', f'"mpp": {mpp}'))
    with pytest.raises(CheckpointError) as info:
        mf.read_model_folder(folder)
    shown = {"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf", "0": "0"}[mpp]
    assert f"mpp must be a positive finite number or null, not {shown}" in str(info.value)
    assert "\n" not in str(info.value)


def test_base_checkpoint_found_by_path_and_hash(tmp_path):
    ckpt = tmp_path / "sam_vit_b_01ec64.pth"
    ckpt.write_bytes(b"pretend weights")
    folder = mf.read_model_folder(_vit_folder(tmp_path, ckpt))
    assert mf.resolve_base_checkpoint(folder, None) == ckpt
    other = tmp_path / "other.pth"
    other.write_bytes(b"different weights")
    with pytest.raises(CheckpointError, match="does not match"):
        mf.resolve_base_checkpoint(folder, other)
    ckpt.unlink()
    with pytest.raises(CheckpointError, match="--checkpoint"):
        mf.resolve_base_checkpoint(folder, None)


@pytest.mark.parametrize("problem, fragment", [
    ("missing", "model folder not found"),
    ("no_config", "no config.json"),
    ("bad_json", "cannot be read as JSON"),
    ("unknown_field", "unknown field"),
    ("bad_thresholds", "invalid thresholds"),
])
def test_bad_model_folders_give_one_line_errors(tmp_path, problem, fragment):
    folder = tmp_path / "model"
    if problem != "missing":
        folder.mkdir()
    if problem == "bad_json":
        (folder / "config.json").write_text("{not json")
    if problem in ("unknown_field", "bad_thresholds"):
        mf.write_config(folder, ModelConfig(backbone="tiny", image_size=128), None, {}, None)
    if problem == "unknown_field":
        doc = json.loads((folder / "config.json").read_text())
        doc["model"]["adaptor_ratio"] = 0.5  # a typo in a hand-edited file
        (folder / "config.json").write_text(json.dumps(doc))
    if problem == "bad_thresholds":
        (folder / "thresholds.json").write_text(json.dumps({"method": "magic"}))
    with pytest.raises(CheckpointError) as info:
        mf.read_model_folder(folder)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_atomic_save_keeps_the_previous_state_when_a_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    mf.atomic_torch_save({"step": 1}, target)

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        mf.atomic_torch_save({"step": 2}, target)
    assert torch.load(target, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left


def test_corrupt_weights_file_is_reported(tmp_path):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="weights.pt"):
        mf.torch_load(bad, "model weights")


def test_history_grows_and_truncates(tmp_path):
    for epoch in (1, 2, 3):
        mf.append_history(tmp_path, {"epoch": epoch, "step": 10 * epoch, "loss": 1.0 / epoch})
    mf.append_history(tmp_path, {"epoch": 4, "step": 40, "loss": 0.2, "val_dice": 0.7})
    rows = mf.read_history(tmp_path)
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"] and rows[3]["val_dice"] == "0.7"
    mf.truncate_history(tmp_path, 20)  # resumed from step 20
    assert [r["epoch"] for r in mf.read_history(tmp_path)] == ["1", "2"]


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device("cuda")
