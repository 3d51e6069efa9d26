"""Nothing a user does loses data (issue #9, point 2): output collisions, existing model
folders, atomic history, one folder convention, temporary files after a kill."""

from __future__ import annotations

import json
import os

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch

from napari_amasam import model_folder as mf
from napari_amasam.cli import main
from napari_amasam.config import TrainConfig
from napari_amasam.model_folder import load_model, read_history, read_model_folder
from napari_amasam.training.trainer import run_training

from .helpers import DEMO_DATA, primary_folder, run_cli, tiny_model_config


def _cfg(tmp_path, **kw):
    base = dict(primary=str(primary_folder(tmp_path)), out=str(tmp_path / "model"), epochs=1,
                steps_per_epoch=2, batch_size=2, lr=1e-3, device="cpu", seed=0, augment=False,
                val_fraction=0.0)
    base.update(kw)
    return TrainConfig(**base)


def _demo_image(i=0) -> np.ndarray:
    path = sorted((DEMO_DATA / "monuseg_heldout" / "images").iterdir())[i]
    return iio.imread(path)[:96, :96, :3]


# ----------------------------------------------------------------------------- segment outputs
def test_segment_refuses_inputs_that_would_write_the_same_outputs(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    iio.imwrite(images / "a.png", _demo_image(0))
    tifffile.imwrite(images / "a.tif", _demo_image(1))
    iio.imwrite(images / "b.png", _demo_image(2))
    out = tmp_path / "out"
    result = run_cli("segment", images, "--model", "classical", "--out", out)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "a.png" in result.stderr and "a.tif" in result.stderr and "a_labels.tif" in result.stderr
    assert not out.exists()  # refused before anything ran


def test_segment_never_overwrites_without_overwrite(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    iio.imwrite(images / "a.png", _demo_image(0))
    out = tmp_path / "out"
    assert main(["segment", str(images), "--model", "classical", "--out", str(out)]) == 0
    before = (out / "a_labels.tif").read_bytes()
    iio.imwrite(images / "a.png", _demo_image(1))  # another image, same name
    # A second run that would replace a result (or add a CSV beside labels of another run).
    result = run_cli("segment", images, "--model", "classical", "--out", out, "--csv")
    assert result.returncode == 2 and "a_labels.tif" in result.stderr
    assert "--overwrite" in result.stderr and "Traceback" not in result.stderr
    assert (out / "a_labels.tif").read_bytes() == before and not (out / "a.csv").exists()
    stale = out / ".a_labels.tif.k3j4h5.tmp"  # what a killed run leaves
    stale.write_bytes(b"half a file")
    assert main(["segment", str(images), "--model", "classical", "--out", str(out), "--csv",
                 "--overwrite"]) == 0
    assert (out / "a_labels.tif").read_bytes() != before and (out / "a.csv").is_file()
    assert not stale.exists()


# ----------------------------------------------------------------------------- model folders
def test_train_refuses_an_existing_model_folder(tmp_path):
    from napari_amasam.errors import OutputError

    out, _ = run_training(_cfg(tmp_path), tiny_model_config())
    weights = (out / "weights.pt").read_bytes()
    history = read_history(out)
    with pytest.raises(OutputError, match="existing model folder"):
        run_training(_cfg(tmp_path, seed=1), tiny_model_config())
    assert (out / "weights.pt").read_bytes() == weights and read_history(out) == history
    # Through the CLI: one line, and the folder untouched.
    result = run_cli("train", "--primary", tmp_path / "primary", "--out", out, "--backbone",
                     "tiny", "--image-size", "128", "--epochs", "1", "--steps-per-epoch", "1",
                     "--device", "cpu")
    assert result.returncode == 2 and "existing model folder" in result.stderr
    assert "Traceback" not in result.stderr and (out / "weights.pt").read_bytes() == weights
    # --overwrite replaces it with a complete new model (new seed, new weights, one history row).
    run_training(_cfg(tmp_path, seed=1), tiny_model_config(), overwrite=True)
    assert read_model_folder(out).train.seed == 1
    assert (out / "weights.pt").read_bytes() != weights and len(read_history(out)) == 1
    load_model(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.")]


def test_a_new_model_is_staged_and_renamed_into_place(tmp_path):
    out = tmp_path / "model"
    seen_before_first_save = []
    from napari_amasam.training.trainer import train

    for record in train(_cfg(tmp_path), tiny_model_config()):
        if record["stage"] == "train" and record["step"] == 1:
            # Config written, no weights yet: nothing under the model's name.
            seen_before_first_save.append(out.exists())
            staged = [p for p in tmp_path.iterdir() if p.name.startswith(".model.partial-")]
            assert len(staged) == 1 and (staged[0] / "config.json").is_file()
    assert seen_before_first_save == [False]
    assert (out / "weights.pt").is_file() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_stale_staging_and_temp_files_of_a_killed_run_are_removed(tmp_path):
    out, _ = run_training(_cfg(tmp_path, epochs=2, steps_per_epoch=1), tiny_model_config())
    # What kill -9 leaves: a staging folder of a dead process and a half-written checkpoint.
    stale = tmp_path / ".other.partial-999999999-abcd1234"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    leftover = out / ".last.pt.x1y2z3w4.tmp"
    leftover.write_bytes(os.urandom(1000))
    run_training(_cfg(tmp_path, out=str(tmp_path / "other"), steps_per_epoch=1),
                 tiny_model_config())
    assert not stale.exists()
    mf.truncate_history(out, 1)  # resume from step 1 of 2
    state = torch.load(out / "last.pt", weights_only=True)
    state["step"] = 1
    mf.atomic_torch_save(state, out / "last.pt")
    run_training(mf.read_model_folder(out).train, tiny_model_config(), resume=True)
    assert not leftover.exists()
    assert [p for p in out.iterdir() if p.name.endswith(".tmp")] == []


# ----------------------------------------------------------------------------- history.csv
def test_truncate_history_keeps_the_last_partial_epoch_and_is_atomic(tmp_path, monkeypatch):
    rows = [{"epoch": 1, "step": 30, "loss": 1.0}, {"epoch": 2, "step": 60, "loss": 0.9},
            {"epoch": 3, "step": 90, "loss": 0.8}, {"epoch": 4, "step": 100, "loss": 0.7}]
    for row in rows:
        mf.append_history(tmp_path, row)
    # Resuming a finished 100-step run (steps_per_epoch 30) keeps all four rows.
    mf.truncate_history(tmp_path, 100)
    assert [r["step"] for r in read_history(tmp_path)] == ["30", "60", "90", "100"]
    before = (tmp_path / "history.csv").read_bytes()

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        mf.truncate_history(tmp_path, 60)
    monkeypatch.undo()
    assert (tmp_path / "history.csv").read_bytes() == before  # nothing lost
    assert [p.name for p in tmp_path.iterdir()] == ["history.csv"]  # no temp file left
    mf.truncate_history(tmp_path, 60)
    assert [r["step"] for r in read_history(tmp_path)] == ["30", "60"]


# ----------------------------------------------------------------------------- folder convention
def _masks_folder(root, n=2):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        iio.imwrite(root / "images" / f"img{i}.png", _demo_image(i))
        labels = np.zeros((96, 96), np.uint16)
        labels[10:20, 10:20] = 1
        tifffile.imwrite(root / "masks" / f"img{i}_masks.tif", labels)
    return root


def test_add_to_training_data_follows_a_masks_folder(tmp_path):
    from napari_amasam._widgets._training_data import save_training_pair
    from napari_amasam.data.folders import check_folder

    root = _masks_folder(tmp_path / "data")
    labels = np.zeros((96, 96), np.int32)
    labels[40:50, 40:50] = 1
    image_path, label_path = save_training_pair(root, "new", _demo_image(3), labels)
    assert label_path.parent == root / "masks" and not (root / "labels").exists()
    check = check_folder(root)
    assert not check.problems, check.problems
    assert sorted(p.stem for p in check.pairs) == ["img0", "img1", "new"]


def test_evaluate_gt_accepts_masks_folder_and_label_suffixes(tmp_path):
    gt = _masks_folder(tmp_path / "gt")
    pred = tmp_path / "pred"
    pred.mkdir()
    for i in range(2):
        tifffile.imwrite(pred / f"img{i}_labels.tif", tifffile.imread(gt / "masks" / f"img{i}_masks.tif"))
    report = tmp_path / "m.json"
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt), "--json", str(report)]) == 0
    doc = json.loads(report.read_text())
    assert set(doc["images"]) == {"img0", "img1"}
    assert doc["mean"]["aji"] == pytest.approx(1.0)

