"""Segment widget with the model kinds: routed task shown, Fine-tune as a new CA-SAM task,
SAM-DA adaptation to the current image."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_amasam._sample_data import load_sample  # noqa: E402

from .helpers import primary_folder, tiny_model_config  # noqa: E402

pytestmark = pytest.mark.gui


def _train(primary: Path, out: Path, kind: str) -> Path:
    from napari_amasam.config import TrainConfig
    from napari_amasam.training.trainer import run_training

    folder, _ = run_training(
        TrainConfig(primary=str(primary), out=str(out), epochs=1, steps_per_epoch=1, batch_size=2,
                    device="cpu", val_fraction=0.0, tune_thresholds=False, amp=False),
        tiny_model_config(kind=kind, trainable_backbone=False))
    return Path(folder)


@pytest.fixture(autouse=True)
def no_worker_left_running():
    yield
    from qtpy.QtCore import QThreadPool
    from superqt.utils._qthreading import WorkerBase

    QThreadPool.globalInstance().waitForDone(5000)
    assert not WorkerBase._worker_set


def test_new_task_fine_tune_routed_task_and_adaptation(make_napari_viewer, tmp_path):
    from napari_amasam.task_list import read_tasks

    data = primary_folder(tmp_path, 2)
    ca_sam = _train(data, tmp_path / "models" / "ca", "ca-sam")
    sam_da = _train(data, tmp_path / "models" / "da", "sam-da")

    viewer = make_napari_viewer()
    image, _ = load_sample("monuseg_breast")
    viewer.add_image(image[:160, :160], name="breast", rgb=True)
    _, segment = viewer.window.add_plugin_dock_widget("napari-amasam", "Segment nuclei")
    segment.device.setCurrentText("cpu")

    segment.model.setCurrentText(str(ca_sam))
    segment.run()
    assert segment.last_error is None, segment.status.text()
    assert "routed to task 0" in segment.status.text() or "base path" in segment.status.text()

    # "add as a new task" on a ca-sam model: a new folder with one task more
    folder = tmp_path / "corrected"
    shutil.copytree(data, folder)
    segment.training_data.folder.setText(str(folder))
    segment.training_data.finetune_mode.setCurrentIndex(1)
    assert "new task" in segment.training_data.finetune_mode.currentText()
    segment.training_data.fine_tune(epochs=1)
    assert segment.last_error is None, segment.status.text()
    new = ca_sam.with_name("ca_task")
    assert [t["task"] for t in read_tasks(new)] == [0, 1]
    assert json.loads((new / "config.json").read_text())["train"]["continue_from"] == str(ca_sam)
    assert segment.model_name() == str(new)

    # ... refused for a model of another kind, with the reason
    segment.model.setCurrentText(str(sam_da))
    assert segment.training_data.fine_tune(epochs=1) is None
    assert "needs a ca-sam model" in str(segment.last_error)

    # SAM-DA: adapt to the current image, only the adapter changes
    segment.training_data.adapt_to_image(steps=2)
    assert segment.last_error is None, segment.status.text()
    adapted = sam_da.with_name("da_adapted")
    doc = json.loads((adapted / "adaptation.json").read_text())
    assert doc["steps_done"] == 2 and doc["n_images"] == 1
    assert segment.model_name() == str(adapted)
    assert np.all([n.startswith("decoder.decoder_adapter.") for n in doc["adapted_parameters"]])
