"""The napari widgets, driven as a user would (under Xvfb, with napari's viewer fixture).

Long jobs run synchronously (``NAPARI_AMASAM_NOTHREADS=1``, set in conftest.py) except in
the one test that checks the threaded path. Models are the random-weight ``tiny`` backbone
trained for two steps on crops of the bundled MoNuSeg sample; the classical baseline is used
where a model's quality does not matter.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

import imageio.v3 as iio  # noqa: E402
import tifffile  # noqa: E402

from napari_amasam._sample_data import load_sample  # noqa: E402

pytestmark = pytest.mark.gui

PLUGIN = "napari-amasam"
TINY = dict(tiny_embed_dim=32, tiny_depth=2, tiny_heads=2, tiny_global_attn=(1,))


# --------------------------------------------------------------------------- fixtures
def _write_primary(root: Path) -> Path:
    """Four 256x256 image/label pairs cropped from the breast sample."""
    image, labels = load_sample("monuseg_breast")
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i, (y, x) in enumerate([(0, 0), (0, 256), (256, 0), (256, 256)]):
        iio.imwrite(root / "images" / f"crop{i}.png", image[y:y + 256, x:x + 256])
        tifffile.imwrite(root / "labels" / f"crop{i}.tif", labels[y:y + 256, x:x + 256])
    return root


@pytest.fixture(scope="session")
def primary_folder(tmp_path_factory) -> Path:
    return _write_primary(tmp_path_factory.mktemp("data") / "primary")


@pytest.fixture(scope="session")
def tiny_model(primary_folder, tmp_path_factory) -> Path:
    """A tiny AMA-SAM trained for two steps (through the engine, not a widget)."""
    from napari_amasam.config import ModelConfig, TrainConfig
    from napari_amasam.training.trainer import run_training

    out = tmp_path_factory.mktemp("models") / "tiny"
    folder, _ = run_training(
        TrainConfig(primary=str(primary_folder), out=str(out), epochs=1, steps_per_epoch=2,
                    batch_size=2, device="cpu", val_fraction=0.0),
        ModelConfig(backbone="tiny", image_size=128, **TINY),
    )
    return Path(folder)


@pytest.fixture
def tiny_train(make_napari_viewer, primary_folder, tmp_path):
    """``(viewer, Train widget, output folder)``: the form filled for a tiny CPU run on the primary
    folder (2 epochs of 2 steps, batch 2, 128 px) into ``tmp_path/model``."""
    viewer = make_napari_viewer()
    train = _dock(viewer, "Train")
    out = tmp_path / "model"
    train.primary.setText(str(primary_folder))
    train.backbone.setCurrentText("tiny")
    train.model_options = TINY
    train.image_size.setValue(128)
    train.epochs.setValue(2)
    train.steps_per_epoch.setValue(2)
    train.batch_size.setValue(2)
    train.device.setCurrentText("cpu")
    train.output.setText(str(out))
    return viewer, train, out


@pytest.fixture(autouse=True)
def isolated_plugin_settings(plugin_settings, npe2pm):
    """napari's plugin settings live in this test's tmp folder; the plugin is registered
    from its manifest (npe2pm blocks plugin discovery)."""
    from npe2 import PluginManifest

    import napari_amasam

    manifest = Path(napari_amasam.__file__).parent / "napari.yaml"
    npe2pm.register(PluginManifest.from_file(manifest))
    yield


@pytest.fixture(autouse=True)
def no_worker_left_running():
    """After every test: no napari worker and no pooled Qt thread is still running."""
    yield
    from qtpy.QtCore import QThreadPool
    from superqt.utils._qthreading import WorkerBase

    pool = QThreadPool.globalInstance()
    pool.waitForDone(5000)
    assert pool.activeThreadCount() == 0
    assert not WorkerBase._worker_set


def _dock(viewer, name):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def _add_sample(viewer, crop: int | None = None):
    """The breast sample (optionally its top-left ``crop`` pixels) as image + ground truth."""
    image, labels = load_sample("monuseg_breast")
    if crop:
        image, labels = image[:crop, :crop], labels[:crop, :crop]
    space = dict(scale=(0.25, 0.25), units="um")
    image_layer = viewer.add_image(image, name="breast", rgb=True, metadata={"mpp": 0.25}, **space)
    gt_layer = viewer.add_labels(labels, name="breast ground truth", **space)
    return image_layer, gt_layer


def _segment_with(viewer, model):
    """The Segment widget on the breast sample's top-left 256 px, with ``model`` on the CPU."""
    _add_sample(viewer, crop=256)
    segment = _dock(viewer, "Segment nuclei")
    segment.model.setCurrentText(str(model))
    segment.device.setCurrentText("cpu")
    return segment


@contextlib.contextmanager
def _notifications():
    """The napari notifications shown inside the block (a list, filled as they come)."""
    from napari.utils.notifications import notification_manager

    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        yield seen
    finally:
        notification_manager.notification_ready.disconnect(seen.append)


# ------------------------------------------------------------------------- manifest
def test_widgets_dock_from_manifest(make_napari_viewer):
    from napari_amasam._widgets import EvaluateWidget, SegmentWidget, TrainWidget

    viewer = make_napari_viewer()
    _add_sample(viewer)
    train = _dock(viewer, "Train")
    segment = _dock(viewer, "Segment nuclei")
    evaluate = _dock(viewer, "Evaluate")
    assert isinstance(train, TrainWidget)
    assert isinstance(segment, SegmentWidget)
    assert isinstance(evaluate, EvaluateWidget)
    # Pickers list the right layer kinds, and follow layers added later.
    assert segment.image_layer.currentText() == "breast"
    assert evaluate.ground_truth.currentText() == "breast ground truth"
    viewer.add_image(np.zeros((32, 32)), name="grey")
    assert segment.image_layer.findText("grey") >= 0
    # Devices this machine lacks are listed but cannot be picked.
    from napari_amasam.device import available_devices

    for combo in (train.device, segment.device):
        for i in range(combo.count()):
            name = combo.itemText(i)
            enabled = combo.model().item(i).isEnabled()
            assert enabled == (name == "auto" or name in available_devices()), name


# ----------------------------------------------------------------------------- train
def test_train_widget_checks_folders(make_napari_viewer, primary_folder, tmp_path):
    train = _dock(make_napari_viewer(), "Train")
    train.primary.setText(str(primary_folder))
    assert train.refresh_primary()
    assert "4 valid pairs" in train.primary_status.text()

    broken = tmp_path / "broken"
    (broken / "images").mkdir(parents=True)
    (broken / "labels").mkdir()
    image, labels = load_sample("monuseg_prostate")
    iio.imwrite(broken / "images" / "a.png", image[:64, :64])
    tifffile.imwrite(broken / "labels" / "a.tif", labels[:32, :32])  # wrong size
    iio.imwrite(broken / "images" / "b.png", image[64:128, :64])
    tifffile.imwrite(broken / "labels" / "b.tif", labels[64:128, :64])
    item = train.add_aux_folder(str(broken))
    assert "1 valid pair" in item.text() and "1 problem" in item.text()
    assert "does not match" in item.toolTip()
    assert train.aux_folders() == [str(broken)]
    train.aux_list.setCurrentRow(0)
    train.remove_selected_aux()
    assert train.aux_folders() == []


def test_train_widget_runs_and_cancel_saves_a_loadable_model(tiny_train):
    from napari_amasam.config import train_defaults
    from napari_amasam.inference.predictor import Predictor

    viewer, train, out = tiny_train
    segment = _dock(viewer, "Segment nuclei")
    train.steps_per_epoch.setValue(5)
    train.mpp.setValue(0.25)

    records = []

    def on_record(record):
        records.append(record)
        if record["stage"] == "train" and record["step"] == 2:
            train.cancel()

    train.record_received.connect(on_record)
    job = train.start()
    assert job is not None and train.last_error is None, train.status.text()
    stages = [r["stage"] for r in records]
    train_steps = [r["step"] for r in records if r["stage"] == "train"]
    assert train_steps == [1, 2]  # stopped at the next step after Cancel, not after 10
    assert records[-1]["stage"] == "done" and records[-1]["cancelled"] is True
    assert "save" in stages
    assert (out / "last.pt").is_file() and (out / "weights.pt").is_file()
    assert len(train.plot.loss.curves["loss"]) == 2
    assert "cancelled" in train.status.text()
    # The saved model loads and is offered in the Segment widget.
    predictor = Predictor.from_folder(out, device="cpu")
    assert predictor.model_config.image_size == 128
    # The pixel size entered in the form travels with the model, as the working scale of the
    # backbone's defaults when it has one (tiny: 0.5 µm/px, as the CLI trains it).
    assert predictor.mpp == (train_defaults("tiny")["model_mpp"] or 0.25)
    assert segment.model.findText(str(out)) >= 0
    assert segment.model_name() == str(out)
    assert train.start_button.isEnabled() and not train.cancel_button.isEnabled()


def test_train_widget_defaults_follow_the_backbone(make_napari_viewer):
    """The form shows config.train_defaults(backbone), the CLI's defaults, for every backbone
    (tiny_conv included) and switches them when the backbone changes; hidden settings too."""
    from napari_amasam.config import BACKBONES, RANDOM_BACKBONES, train_defaults

    train = _dock(make_napari_viewer(), "Train")
    offered = [train.backbone.itemText(i) for i in range(train.backbone.count())]
    assert offered == list(BACKBONES) and "tiny_conv" in offered
    train.primary.setText("p")
    train.output.setText("o")
    # Back and forth between a random CPU backbone and a SAM ViT, whose defaults differ.
    for backbone in ("vit_b", "tiny_conv", "vit_h", "tiny", "vit_l", "tiny_conv"):
        train.backbone.setCurrentText(backbone)
        defaults = train_defaults(backbone)
        shown = {"image_size": train.image_size.value(), "lr": train.lr.value(),
                 "epochs": train.epochs.value(), "batch_size": train.batch_size.value(),
                 "steps_per_epoch": train.steps_per_epoch.value()}
        assert shown == pytest.approx({k: defaults[k] for k in shown}), backbone
        assert train.train_encoder.isChecked() == (backbone in RANDOM_BACKBONES)
        assert train.checkpoint.isEnabled() == (backbone not in RANDOM_BACKBONES)
        train_cfg, model_cfg = train.configs()
        assert model_cfg.backbone == backbone
        assert model_cfg.image_size == defaults["image_size"]
        assert model_cfg.lambda_max == defaults["lambda_max"]
        assert model_cfg.alignment == defaults["alignment"], backbone
        for key in ("epochs", "steps_per_epoch", "batch_size", "lr", "lr_gamma",
                    "primary_share", "val_fraction"):
            assert getattr(train_cfg, key) == pytest.approx(defaults[key]), (backbone, key)
        assert train_cfg.model_mpp == defaults["model_mpp"], backbone
    # A value the user edits is used as given; a shortened tiny* schedule still anneals to
    # the default's final learning rate (~7 %), as the CLI does.
    train.epochs.setValue(3)
    assert train.configs()[0].epochs == 3
    train.epochs.setValue(10)
    train_cfg = train.configs()[0]
    assert train_cfg.lr_gamma == pytest.approx(0.766, abs=1e-3)
    assert train_cfg.lr_gamma ** 10 == pytest.approx(
        train_defaults("tiny_conv")["lr_gamma"] ** train_defaults("tiny_conv")["epochs"], rel=0.01)
    # Precision: auto keeps mixed precision where the device has it; fp32 turns it off.
    assert train_cfg.amp is True
    train.precision.setCurrentText("fp32")
    assert train.configs()[0].amp is False


def test_train_widget_cancel_during_validation_is_prompt_and_resumable(tiny_train):
    """Defect 8 (cancel waited for a whole step, validation and threshold search included):
    Cancel while validating stops after that batch of tiles, saves every step done, and the
    folder resumes to a finished model."""
    from napari_amasam.training.trainer import resume_config

    _, train, out = tiny_train
    records, cancelled_at = [], []

    def on_record(record):
        records.append(record)
        if record["stage"] == "progress" and not cancelled_at:
            assert record["task"] == "validation" and "validating" in train.status.text()
            train.cancel()
            cancelled_at.append(len(records))

    train.record_received.connect(on_record)
    assert train.start() is not None and train.last_error is None, train.status.text()
    assert cancelled_at and [r["stage"] for r in records[cancelled_at[0]:]] == ["save", "done"]
    assert records[-1]["cancelled"] and records[-1]["step"] == 2
    assert "cancelled at step 2" in train.status.text()
    assert train.start_button.isEnabled() and not train.cancel_button.isEnabled()
    # Resumed through the same worker path: the two remaining steps, then a finished model.
    records.clear()
    cancelled_at.append("no more cancels")
    train.run_training(resume_config(out), resume=True)
    assert [r["step"] for r in records if r["stage"] == "train"] == [3, 4]
    assert records[-1]["stage"] == "done" and not records[-1]["cancelled"]
    assert "finished at step 4" in train.status.text()


def test_train_widget_reports_bad_settings(make_napari_viewer, tmp_path):
    train = _dock(make_napari_viewer(), "Train")
    assert train.start() is None
    assert "primary" in str(train.last_error)
    train.primary.setText(str(tmp_path / "missing"))
    train.output.setText(str(tmp_path / "out"))
    train.backbone.setCurrentText("tiny")
    train.start()
    assert train.last_error is not None and "missing" in str(train.last_error)
    assert not (tmp_path / "out").exists()  # nothing is written before the data check passes


# --------------------------------------------------------------------------- segment
def test_segment_classical_writes_labels_with_features_and_exports(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    image_layer, _ = _add_sample(viewer)
    segment = _dock(viewer, "Segment nuclei")
    segment.image_layer.setCurrentText("breast")
    assert segment.model_name() == "classical"
    segment.run()
    assert segment.last_error is None, segment.status.text()
    layer = viewer.layers["breast nuclei"]
    labels = np.asarray(layer.data)
    ids = np.unique(labels[labels > 0])
    assert labels.shape == (512, 512) and len(ids) > 20
    features = layer.features
    assert np.array_equal(np.sort(features["label"].to_numpy()), ids)
    assert {"area", "centroid_x", "centroid_y", "mean_intensity"} <= set(features.columns)
    # Areas in the table are the real pixel counts of those ids.
    first = int(features["label"].iloc[0])
    assert int(features["area"].iloc[0]) == int((labels == first).sum())
    assert tuple(layer.scale) == tuple(image_layer.scale)
    assert tuple(layer.units) == tuple(image_layer.units)

    tif = segment.export(tmp_path / "out.tif")
    assert np.array_equal(tifffile.imread(tif).astype(np.int64), labels)
    geo = json.loads(segment.export(tmp_path / "out.geojson").read_text())
    assert len(geo["features"]) == len(ids)
    csv_lines = segment.export(tmp_path / "out.csv").read_text().strip().splitlines()
    assert len(csv_lines) == len(ids) + 1
    assert segment.export(tmp_path / "out.xyz") is None and ".xyz" in str(segment.last_error)

    # Labels in the smallest unsigned dtype that holds the ids (~100 nuclei: uint8).
    assert layer.data.dtype == (np.uint8 if ids.max() <= 255 else np.uint16)
    # The job's end (common.end_job): progress closed, Run back on, Cancel off.
    assert segment._progress is None
    assert segment.run_button.isEnabled() and not segment.cancel_button.isEnabled()
    # A second run updates the same layer instead of adding another one.
    n_layers = len(viewer.layers)
    segment.run()
    assert len(viewer.layers) == n_layers


def test_segment_in_a_thread_worker(make_napari_viewer, qtbot, monkeypatch):
    monkeypatch.setenv("NAPARI_AMASAM_NOTHREADS", "0")
    viewer = make_napari_viewer()
    _add_sample(viewer, crop=256)
    segment = _dock(viewer, "Segment nuclei")
    job = segment.run()
    assert job.worker is not None  # really threaded
    qtbot.waitUntil(lambda: not job.running, timeout=30000)
    assert segment.last_error is None, segment.status.text()
    assert "breast nuclei" in viewer.layers
    assert viewer.layers["breast nuclei"].data.max() > 0


def test_segment_tiny_model_rethreshold_skips_network(make_napari_viewer, tiny_model):
    viewer = make_napari_viewer()
    _add_sample(viewer, crop=256)
    segment = _dock(viewer, "Segment nuclei")
    segment.model.setCurrentText(str(tiny_model))
    thresholds = json.loads((tiny_model / "thresholds.json").read_text())
    assert segment.foreground.value() == pytest.approx(thresholds["foreground_threshold"])
    assert segment.min_size.value() == thresholds["min_size"]
    assert segment.foreground.isEnabled()
    segment.device.setCurrentText("cpu")
    segment.tile_size.setValue(128)
    segment.overlap.setValue(0)

    forward_calls = []
    predictor = segment.predictor()
    predictor.model.register_forward_hook(lambda *args: forward_calls.append(1))
    segment.run()
    assert segment.last_error is None, segment.status.text()
    assert len(forward_calls) == 1  # 4 tiles of 128 px in one batch of 4
    maps = segment._cache["maps"]
    assert maps is not None and maps.shape == (256, 256)
    layer = viewer.layers["breast nuclei"]
    assert layer.data.shape == (256, 256)

    # Only thresholds change: labels follow the new threshold, the network does not run.
    threshold = float(np.quantile(maps.foreground, 0.7))
    segment.foreground.setValue(round(threshold, 2))
    segment.min_size.setValue(0)
    segment.rethreshold()
    assert segment.last_error is None, segment.status.text()
    assert len(forward_calls) == 1 and segment.network_runs == 1
    from napari_amasam.inference.predictor import Predictor

    expected = predictor.postprocess(maps, segment.thresholds())
    assert np.array_equal(np.asarray(layer.data), expected)
    assert expected.max() > 0
    # Changing the tiling invalidates the cache: the network runs again.
    segment.overlap.setValue(16)
    segment.run()
    assert len(forward_calls) > 1 and segment.network_runs == 2
    assert isinstance(predictor, Predictor)


def test_segment_batch_over_a_folder(make_napari_viewer, primary_folder, tmp_path):
    segment = _dock(make_napari_viewer(), "Segment nuclei")
    segment.batch.geojson.setChecked(True)
    segment.batch.csv.setChecked(True)
    out = tmp_path / "batch"
    segment.batch.run(str(primary_folder / "images"), str(out))
    assert segment.last_error is None, segment.status.text()
    for i in range(4):
        labels = tifffile.imread(out / f"crop{i}_labels.tif")
        assert labels.shape == (256, 256) and labels.max() > 0
        assert (out / f"crop{i}.geojson").is_file() and (out / f"crop{i}.csv").is_file()
    assert segment.network_runs == 4


def test_add_to_training_data_and_fine_tune(make_napari_viewer, tiny_model, primary_folder,
                                            tmp_path):
    from napari_amasam.data.folders import find_pairs
    from napari_amasam.inference.predictor import Predictor

    viewer = make_napari_viewer()
    _add_sample(viewer, crop=256)
    segment = _dock(viewer, "Segment nuclei")
    segment.run()  # classical labels to "correct"
    corrected = np.asarray(viewer.layers["breast nuclei"].data).copy()
    corrected[:20, :20] = corrected.max() + 1  # a user's brush stroke: a new nucleus
    viewer.layers["breast nuclei"].data = corrected

    # Defect 4: the default destination is a new folder beside the model, never the model's
    # (possibly curated) primary folder, which stays untouched.
    segment.model.setCurrentText(str(tiny_model))
    segment._model_changed(str(tiny_model))
    default = Path(segment.training_data.training_folder())
    assert default == tiny_model.with_name(f"{tiny_model.name}_added_data")
    assert default != primary_folder and not default.exists()
    before = sorted(p.name for p in primary_folder.rglob("*"))
    written = segment.training_data.add(name="default_pair")
    assert written is not None and written[0].parent.parent == default
    assert sorted(p.name for p in primary_folder.rglob("*")) == before
    shutil.rmtree(default)

    folder = tmp_path / "mydata"
    shutil.copytree(primary_folder, folder)
    segment.training_data.folder.setText(str(folder))
    written = segment.training_data.add(name="corrected_1")
    assert written is not None, segment.status.text()
    image_path, label_path = written
    assert image_path == folder / "images" / "corrected_1.png"
    assert label_path == folder / "labels" / "corrected_1.tif"
    assert np.array_equal(iio.imread(image_path), np.asarray(viewer.layers["breast"].data))
    assert np.array_equal(tifffile.imread(label_path).astype(np.int64), corrected)
    assert "corrected_1" in [p.stem for p in find_pairs(folder)]

    # The same name again: refused with a message, nothing overwritten.
    before = label_path.read_bytes()
    viewer.layers["breast nuclei"].data = np.zeros_like(corrected)
    assert segment.training_data.add(name="corrected_1") is None
    assert "already exists" in str(segment.last_error)
    assert "corrected_1" in str(segment.last_error)
    assert label_path.read_bytes() == before

    # Fine-tune the current model with that folder: a new model folder next to it.
    segment.device.setCurrentText("cpu")
    segment.training_data.fine_tune(epochs=1)
    assert segment.last_error is None, segment.status.text()
    new = tiny_model.with_name(f"{tiny_model.name}_finetuned")
    assert (new / "weights.pt").is_file()
    config = json.loads((new / "config.json").read_text())
    assert config["train"]["init_from"] == str(tiny_model)
    assert config["train"]["primary"] == str(folder)
    assert config["data"]["primary"]["n_pairs"] == 5
    assert segment.model_name() == str(new)
    Predictor.from_folder(new, device="cpu")


def test_fine_tune_refuses_classical(make_napari_viewer):
    segment = _dock(make_napari_viewer(), "Segment nuclei")
    assert not segment.training_data.finetune_button.isEnabled()
    assert segment.training_data.fine_tune() is None
    assert "classical" in str(segment.last_error)


# -------------------------------------------------------------------------- evaluate
def test_evaluate_table_and_error_layer(make_napari_viewer):
    viewer = make_napari_viewer()
    _, gt_layer = _add_sample(viewer)
    evaluate = _dock(viewer, "Evaluate")

    # Ground truth against itself: perfect, no errors.
    viewer.add_labels(np.asarray(gt_layer.data).copy(), name="copy nuclei")
    evaluate.prediction.setCurrentText("copy nuclei")
    evaluate.ground_truth.setCurrentText("breast ground truth")
    metrics = evaluate.evaluate()
    assert metrics["dice"] == pytest.approx(1.0) and metrics["aji"] == pytest.approx(1.0)
    assert metrics["pq"] == pytest.approx(1.0)
    rows = {evaluate.table.item(i, 0).text(): evaluate.table.item(i, 1).text()
            for i in range(evaluate.table.rowCount())}
    assert rows["Dice"] == "1.0000" and rows["AJI+"] == "1.0000"
    assert rows["false positives"] == "0" and rows["false negatives"] == "0"
    assert viewer.layers["copy nuclei errors"].data.max() == 0

    # The classical baseline: imperfect, with both kinds of error marked.
    segment = _dock(viewer, "Segment nuclei")
    segment.image_layer.setCurrentText("breast")
    segment.run()
    evaluate.prediction.setCurrentText("breast nuclei")
    metrics = evaluate.evaluate()
    assert 0.3 < metrics["dice"] < 1.0 and metrics["aji"] < 1.0
    errors = np.asarray(viewer.layers["breast nuclei errors"].data)
    pred = np.asarray(viewer.layers["breast nuclei"].data)
    gt = np.asarray(gt_layer.data)
    assert set(np.unique(errors)) == {0, 1, 2}
    # Every FP pixel lies in a predicted nucleus; every FN-only pixel in a ground-truth one.
    assert np.all(pred[errors == 1] > 0) and np.all(gt[errors == 2] > 0)
    rows = {evaluate.table.item(i, 0).text(): evaluate.table.item(i, 1).text()
            for i in range(evaluate.table.rowCount())}
    assert int(rows["false positives"]) > 0 and int(rows["false negatives"]) > 0
    assert float(rows["Dice"]) == pytest.approx(metrics["dice"], abs=1e-4)


def test_match_nuclei_counts_errors():
    from napari_amasam._widgets._evaluate import error_map, match_nuclei

    gt = np.zeros((20, 20), int)
    gt[0:5, 0:5] = 1     # found exactly
    gt[10:15, 10:15] = 2  # missed
    pred = np.zeros((20, 20), int)
    pred[0:5, 0:5] = 7
    pred[0:3, 15:20] = 8  # false positive
    pred[10:12, 10:12] = 9  # overlaps gt 2 with IoU 4/25: not a match
    fp, fn = match_nuclei(gt, pred)
    assert sorted(fp) == [8, 9] and list(fn) == [2]
    errors, n_fp, n_fn = error_map(gt, pred)
    assert (n_fp, n_fn) == (2, 1)
    assert errors[1, 1] == 0 and errors[1, 17] == 1 and errors[14, 14] == 2 and errors[10, 10] == 2
    assert errors[0, 16] == 1


def test_save_training_pair_never_overwrites(tmp_path):
    from napari_amasam._widgets._training_data import save_training_pair

    image, labels = load_sample("monuseg_prostate")
    image, labels = image[:64, :64], labels[:64, :64]
    image_path, label_path = save_training_pair(tmp_path, "my slide #1", image, labels)
    assert image_path.name == "my_slide_1.png" and label_path.name == "my_slide_1.tif"
    # A label file of another type with the same stem would pair with the new image too.
    tifffile.imwrite(tmp_path / "labels" / "other_masks.tif", labels)
    with pytest.raises(FileExistsError, match="other_masks.tif"):
        save_training_pair(tmp_path, "other", image, labels)
    assert not (tmp_path / "images" / "other.png").exists()
    with pytest.raises(ValueError, match="do not match"):
        save_training_pair(tmp_path, "small", image, labels[:32])


@pytest.mark.parametrize("engine_watches_cancel", [False, True])
def test_job_cancel_stops_a_generator_at_its_next_record(engine_watches_cancel):
    import threading

    from napari_amasam._widgets._workers import Job

    closed, seen, returned = [], [], []
    event = threading.Event()

    def steps():
        try:
            for i in range(10):
                if engine_watches_cancel and event.is_set():
                    yield {"stage": "done", "cancelled": True}
                    return "saved"
                yield {"stage": "tile", "done": i + 1, "total": 10}
            return "finished"
        finally:
            closed.append(True)

    def on_record(record):
        seen.append(record)
        if len(seen) == 2:
            job.cancel()

    job = Job(steps(), cancel_event=event if engine_watches_cancel else None,
              on_yielded=on_record, on_returned=returned.append)
    job.start()
    assert not job.running and job.cancelled and closed == [True]
    if engine_watches_cancel:  # the trainer's way: it winds down and reports
        assert seen[-1] == {"stage": "done", "cancelled": True} and returned == ["saved"]
        assert len(seen) == 3
    else:  # inference: closed at the next record, nothing returned
        assert len(seen) == 2 and returned == [None]


# ------------------------------------------------------------- issue 15: as a pathologist
def _controls(widget):
    """Every input control inside a dock widget (not the parts of combos, spin boxes or
    tables)."""
    from qtpy.QtWidgets import (
        QAbstractButton,
        QAbstractItemView,
        QAbstractSpinBox,
        QComboBox,
        QLineEdit,
        QWidget,
    )

    def is_part(w):
        parent = w.parent()
        while parent is not None and parent is not widget:
            if isinstance(parent, (QComboBox, QAbstractSpinBox, QAbstractItemView)):
                return True
            parent = parent.parent()
        return False

    kinds = (QAbstractButton, QAbstractSpinBox, QComboBox, QLineEdit)
    return [w for w in widget.findChildren(QWidget) if isinstance(w, kinds) and not is_part(w)]


def test_edits_survive_rethresholding(make_napari_viewer, tiny_model):
    """Defect 1: a corrected nuclei layer is never overwritten; the new result is a new layer."""
    viewer = make_napari_viewer()
    segment = _segment_with(viewer, tiny_model)
    segment.run()
    assert segment.last_error is None, segment.status.text()
    layer = viewer.layers["breast nuclei"]
    # Re-thresholding an unedited result updates it in place.
    segment.foreground.setValue(0.3)
    segment.rethreshold()
    assert len([n for n in viewer.layers if n.name.startswith("breast nuclei")]) == 1
    # The user paints a nucleus (an undoable edit, as napari's brush makes).
    new_id = int(np.asarray(layer.data).max()) + 1
    rows, cols = np.mgrid[10:25, 10:25]
    layer.data_setitem((rows.ravel(), cols.ravel()), new_id)
    painted = np.asarray(layer.data).copy()
    assert (painted == new_id).sum() == 225
    # Any threshold change (or Run) must not destroy it.
    segment.foreground.setValue(0.6)
    segment.rethreshold()
    assert segment.last_error is None, segment.status.text()
    assert np.array_equal(np.asarray(layer.data), painted)
    new_layer = viewer.layers["breast nuclei (2)"]
    assert segment.labels_layer().name == new_layer.name
    assert "kept" in segment.status.text()
    # ...and the edit itself is still undoable.
    layer.undo()
    assert (np.asarray(layer.data) == new_id).sum() == 0
    # The new, unedited layer is the one later runs update.
    segment.foreground.setValue(0.5)
    segment.run()
    assert len([n for n in viewer.layers if n.name.startswith("breast nuclei")]) == 2


def test_three_docked_widgets_fit_a_1600x1000_window(make_napari_viewer, qtbot):
    """Defect 2: every control scrolls into reach; the window needs no more than 1000 px."""
    from napari_amasam._widgets._layout import DOCK_MIN_HEIGHT

    viewer = make_napari_viewer(show=True)
    _add_sample(viewer)
    docks = [_dock(viewer, name) for name in ("Train", "Segment nuclei", "Evaluate")]
    window = viewer.window._qt_window
    window.resize(1600, 1000)
    qtbot.wait(50)
    assert window.minimumSizeHint().height() <= 1000
    assert window.minimumSize().height() <= 1000
    assert window.height() <= 1000
    for dock in docks:
        assert dock.minimumSizeHint().height() <= DOCK_MIN_HEIGHT
        controls = _controls(dock)
        assert len(controls) >= 3
        # Each control sits in the dock's scroll area, so scrolling reaches it.
        assert all(dock.scroll.widget().isAncestorOf(c) for c in controls)
        dock.scroll.ensureWidgetVisible(controls[-1])


def test_16bit_rgb_segments_like_8bit(make_napari_viewer):
    """Defect 3: the same H&E at 16 bits (x257) gives the same nuclei."""
    viewer = make_napari_viewer()
    image, _ = load_sample("monuseg_breast")
    viewer.add_image(image, name="eight", rgb=True)
    viewer.add_image(image.astype(np.uint16) * 257, name="sixteen", rgb=True)
    segment = _dock(viewer, "Segment nuclei")
    results = {}
    for name in ("eight", "sixteen"):
        segment.image_layer.setCurrentText(name)
        segment.run()
        assert segment.last_error is None, segment.status.text()
        results[name] = np.asarray(viewer.layers[f"{name} nuclei"].data)
    assert results["eight"].max() > 20
    assert np.array_equal(results["eight"], results["sixteen"])


def test_evaluate_defaults_pick_two_layers_and_follow_new_nuclei(make_napari_viewer):
    """Defect 5: prediction != ground truth, a new nuclei layer becomes the prediction,
    the whole table is visible."""
    viewer = make_napari_viewer()
    _, gt_layer = _add_sample(viewer)
    evaluate = _dock(viewer, "Evaluate")
    assert evaluate.ground_truth.currentText() == "breast ground truth"
    assert evaluate.prediction.currentText() != "breast ground truth"
    segment = _dock(viewer, "Segment nuclei")
    segment.run()
    assert evaluate.prediction.currentText() == "breast nuclei"
    assert evaluate.ground_truth.currentText() == "breast ground truth"
    metrics = evaluate.evaluate()
    assert metrics["dice"] < 1.0
    table = evaluate.table
    rows = sum(table.rowHeight(i) for i in range(table.rowCount()))
    assert table.rowCount() == 10
    assert table.height() >= rows + table.horizontalHeader().height()
    # The same layer twice is refused, not scored 1.000.
    evaluate.prediction.setCurrentText("breast ground truth")
    assert evaluate.evaluate() is None and "same layer" in str(evaluate.last_error)


def test_measurements_built_in_the_worker_thread(make_napari_viewer, qtbot, monkeypatch):
    """Defect 6: the per-nucleus table is computed off the UI thread."""
    import threading

    from napari_amasam._widgets import _segment

    monkeypatch.setenv("NAPARI_AMASAM_NOTHREADS", "0")
    threads = []
    real = _segment.measure_nuclei

    def spy(*args, **kwargs):  # records the thread, then does the real work
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(_segment, "measure_nuclei", spy)
    viewer = make_napari_viewer()
    _add_sample(viewer, crop=256)
    segment = _dock(viewer, "Segment nuclei")
    job = segment.run()
    assert job.worker is not None
    qtbot.waitUntil(lambda: not job.running, timeout=60000)
    assert segment.last_error is None, segment.status.text()
    assert threads and threads[0] is not threading.main_thread()
    assert len(viewer.layers["breast nuclei"].features) > 0


def test_worker_error_reported_once(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    """Defect 7: one notification per error (not also napari's traceback notification)."""
    monkeypatch.setenv("NAPARI_AMASAM_NOTHREADS", "0")
    viewer = make_napari_viewer()
    _add_sample(viewer, crop=128)
    segment = _dock(viewer, "Segment nuclei")
    (tmp_path / "not_a_model").mkdir()
    segment.model.setCurrentText(str(tmp_path / "not_a_model"))
    with _notifications() as seen:
        job = segment.run()
        assert job.worker is not None
        qtbot.waitUntil(lambda: not job.running, timeout=30000)
        qtbot.wait(100)
    assert segment.last_error is not None and "not_a_model" in str(segment.last_error)
    errors = [n for n in seen if "not_a_model" in str(n.message)]
    assert len(errors) == 1, [str(n.message) for n in seen]
    assert "error" in segment.status.text()


def test_smaller_items(make_napari_viewer, tmp_path, monkeypatch):
    """Defect 8: path box, stale error, export extension, tooltips, pixel size, samples."""
    from qtpy.QtWidgets import QFileDialog

    viewer = make_napari_viewer()
    _add_sample(viewer, crop=128)
    train = _dock(viewer, "Train")
    segment = _dock(viewer, "Segment nuclei")
    evaluate = _dock(viewer, "Evaluate")
    # The model box is wide enough to read a path; an error goes away once the user types.
    assert segment.model.minimumSizeHint().width() >= 200
    segment.model.setEditText(str(tmp_path / "nope"))
    segment.model.lineEdit().editingFinished.emit()
    assert "nope" in segment.model_status.text()
    segment.model.setEditText(str(tmp_path / "nope2"))  # typing on
    assert segment.model_status.text() == ""
    # Export adds the extension of the chosen format.
    segment.model.setCurrentText("classical")
    segment.run()
    monkeypatch.setattr(QFileDialog, "getSaveFileName",
                        staticmethod(lambda *a, **k: (str(tmp_path / "nuclei"),
                                                      "QuPath GeoJSON (*.geojson)")))
    segment._export_dialog()
    assert (tmp_path / "nuclei.geojson").is_file()
    # Every control has a tooltip.
    for dock in (train, segment, evaluate):
        missing = [f"{type(c).__name__} {getattr(c, 'text', lambda: '')()}"
                   for c in _controls(dock) if not c.toolTip()]
        assert not missing, missing
    # The pixel size comes from the layer (metadata, or scale in µm) ...
    assert segment.pixel_size.value() == pytest.approx(0.25)
    image, _ = load_sample("monuseg_prostate")
    viewer.add_image(image[:64, :64], name="scaled", rgb=True, scale=(0.5, 0.5), units="um")
    segment.image_layer.setCurrentText("scaled")
    assert segment.pixel_size.value() == pytest.approx(0.5)
    # ... or from the file's resolution tags.
    path = tmp_path / "tagged.tif"
    tifffile.imwrite(path, image[:64, :64], resolution=(20000, 20000), resolutionunit="CENTIMETER")
    from napari.layers._source import layer_source

    with layer_source(path=str(path)):  # as napari's file readers do
        layer = viewer.add_image(tifffile.imread(path), name="tagged", rgb=True)
    segment.image_layer.setCurrentText(layer.name)
    assert segment.pixel_size.value() == pytest.approx(0.5)
    # Train defaults on a CPU without a checkpoint: the tiny_conv encoder, trained, as make demo.
    assert train.backbone.currentText() == "tiny_conv"
    assert train.train_encoder.isChecked() and train.image_size.value() == 256
    assert train.lr.value() == pytest.approx(1e-3)
    train_cfg, model_cfg = (train.primary.setText("p"), train.output.setText("o"),
                            train.configs())[-1]
    assert model_cfg.trainable_backbone and model_cfg.backbone == "tiny_conv"


def test_samples_open_side_by_side(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "monuseg_breast")
    viewer.open_sample(PLUGIN, "monuseg_prostate")
    breast, prostate = viewer.layers["monuseg_breast"], viewer.layers["monuseg_prostate"]
    (_, b1), (p0, _) = breast.extent.world[:, 1], prostate.extent.world[:, 1]
    assert p0 >= b1  # the prostate tile starts right of the breast tile


def test_settings_and_recent_models_persist(make_napari_viewer, tiny_model):
    """#14: the model picker remembers recent models; settings outlive the session."""
    from napari.settings import get_plugin_settings

    viewer = make_napari_viewer()
    segment = _dock(viewer, "Segment nuclei")
    segment.model.setEditText(str(tiny_model))
    segment.model.lineEdit().editingFinished.emit()
    segment.tile_size.setValue(96)
    segment.batch.csv.setChecked(True)
    settings = get_plugin_settings(PLUGIN)
    assert settings.segment.recent_models.splitlines()[0] == str(tiny_model)
    assert "recent_models" in settings.config_path.read_text()
    viewer.close()
    # A new session (the settings model re-read from its file).
    from napari import settings as napari_settings

    napari_settings._clear_plugin_settings_cache()
    again = _dock(make_napari_viewer(), "Segment nuclei")
    assert again.model.findText(str(tiny_model)) >= 0
    assert again.tile_size.value() == 96 and again.batch.csv.isChecked()


def test_prompt_segments_one_nucleus_undoably(make_napari_viewer, tiny_model):
    """SAM-style correction: a box and points re-segment one nucleus on a cached embedding."""
    viewer = make_napari_viewer()
    image_layer, _ = _add_sample(viewer, crop=256)
    segment = _dock(viewer, "Segment nuclei")
    segment.model.setCurrentText(str(tiny_model))
    segment.device.setCurrentText("cpu")
    segment.foreground.setValue(0.0)  # the 2-step tiny model is unsure everywhere
    segment.run()
    layer = viewer.layers["breast nuclei"]
    before = np.asarray(layer.data).copy()
    encoder_calls = []
    model = segment.predictor().model
    model.sam.image_encoder.patch_embed.register_forward_hook(
        lambda *a: encoder_calls.append(1))
    points, boxes = segment.prompts.add_prompt_layers()
    # A box (in the prompt layer's data coordinates, i.e. image pixels) -> one nucleus.
    boxes.add_rectangles(np.array([[40, 40], [70, 70]]))
    commit = segment.prompts.last_commit
    assert segment.last_error is None, segment.status.text()
    assert commit is not None, segment.status.text()
    new_id = commit["id"]
    assert new_id == before.max() + 1
    mask = np.asarray(layer.data) == new_id
    rows, cols = np.nonzero(mask)
    assert mask.sum() == commit["area"] > 0
    assert rows.min() >= 40 and rows.max() < 70 and cols.min() >= 40 and cols.max() < 70
    assert len(encoder_calls) == 1
    # A negative point in it re-segments the same nucleus without that point, with no
    # encoder run (cached embedding).
    r, c = rows[len(rows) // 2], cols[len(cols) // 2]
    segment.prompts.point_type.setCurrentText("negative")
    points.add(np.array([[r, c]]))
    second = segment.prompts.last_commit
    assert second["id"] != new_id and second["replaced"] == new_id
    after = np.asarray(layer.data)
    assert (after == new_id).sum() == 0 and after[r, c] != second["id"]
    assert len(encoder_calls) == 1 and second["encoder_runs"] == 1
    # Undo twice: the layer is back to the segmentation.
    layer.undo()
    layer.undo()
    assert np.array_equal(np.asarray(layer.data), before)
    # Prompts need a model: the classical baseline says so.
    segment.model.setCurrentText("classical")
    assert segment.prompts.segment_prompt() is None
    assert "trained model" in str(segment.last_error)


def test_nuclei_layers_use_the_smallest_dtype_that_holds_their_ids(make_napari_viewer):
    """uint8 up to 255 nuclei, uint16 up to 65,535, then uint32: never int32 for 100 nuclei,
    never a wrapped id."""
    import pandas as pd

    from napari_amasam._widgets._nuclei_layer import write_nuclei_layer

    viewer = make_napari_viewer()
    image_layer = viewer.add_image(np.zeros((300, 300, 3), np.uint8), name="img", rgb=True)
    no_features = pd.DataFrame({"index": np.zeros(0, int), "label": np.zeros(0, int)})
    for max_id, dtype in ((200, np.uint8), (300, np.uint16), (70000, np.uint32)):
        labels = (np.arange(300 * 300, dtype=np.int64).reshape(300, 300) % max_id) + 1
        layer, _ = write_nuclei_layer(viewer, image_layer, labels, no_features, "test")
        assert layer.data.dtype == dtype, max_id
        assert np.asarray(layer.data).max() == max_id  # nothing wrapped
        np.testing.assert_array_equal(np.asarray(layer.data), labels)
    # Painting a new nucleus (M) at 255 nuclei in a uint8 layer: napari alone refuses id
    # 256; the layer's own binding widens it.
    full = np.arange(300 * 300).reshape(300, 300) % 255 + 1
    layer, _ = write_nuclei_layer(viewer, image_layer, full, no_features, "test")
    assert layer.data.dtype == np.uint8
    (key_action,) = [action for key, action in layer.keymap.items() if str(key) == "M"]
    key_action(layer)
    assert layer.data.dtype == np.uint16 and layer.selected_label == 256
    np.testing.assert_array_equal(np.asarray(layer.data), full)


def _nuclei_layer_names(viewer):
    return [layer.name for layer in viewer.layers if layer.name.startswith("breast nuclei")]


def test_a_run_after_a_threshold_edit_leaves_no_rethreshold_pending(make_napari_viewer,
                                                                    tiny_model, qtbot):
    """A threshold edit arms a re-threshold 400 ms later; a Run with those thresholds makes
    it redundant. Left armed, it fired whenever Qt next processed events (napari's progress
    bar does, mid-job), after the user's next edit: that result went to a new layer and later
    prompts wrote there (the cause of the prompt test's intermittent failures)."""
    viewer = make_napari_viewer()
    segment = _segment_with(viewer, tiny_model)
    segment.run()
    with _notifications() as seen:
        segment.foreground.setValue(0.0)
        segment.run()  # re-thresholds the cached maps at once
        layer = viewer.layers["breast nuclei"]
        edited = np.asarray(layer.data).astype(np.int64)
        edited[0, 0] = edited.max() + 1  # the user's correction
        layer.data = edited.astype(layer.data.dtype)
        qtbot.wait(800)  # past the re-threshold delay, with Qt's events processed
    assert segment.last_error is None, segment.status.text()
    assert _nuclei_layer_names(viewer) == ["breast nuclei"]
    assert segment.labels_layer().name == layer.name
    np.testing.assert_array_equal(np.asarray(layer.data), edited)
    assert not [str(n.message) for n in seen if "already running" in str(n.message)]


def test_a_threshold_edit_during_a_run_is_applied_after_it(make_napari_viewer, tiny_model,
                                                           qtbot, monkeypatch):
    """A threshold edited while the segmentation runs (in a worker) re-thresholds once the
    run ends, instead of being refused with "a job is already running"."""
    monkeypatch.setenv("NAPARI_AMASAM_NOTHREADS", "0")
    viewer = make_napari_viewer()
    segment = _segment_with(viewer, tiny_model)
    with _notifications() as seen:
        job = segment.run()
        assert job.worker is not None
        segment.foreground.setValue(0.0)  # while the worker runs
        qtbot.waitUntil(lambda: not job.running, timeout=60000)
        qtbot.waitUntil(lambda: segment.job is not job and not segment.job.running,
                        timeout=20000)
        qtbot.wait(800)
    assert segment.last_error is None, segment.status.text()
    assert not [str(n.message) for n in seen if "already running" in str(n.message)]
    predictor = segment.predictor()
    maps = segment._cache["maps"]
    expected = predictor.postprocess(maps, segment.thresholds())
    assert not np.array_equal(expected, predictor.postprocess(maps, segment._model_thresholds))
    assert segment.network_runs == 1  # the edit re-thresholded the cached maps
    assert _nuclei_layer_names(viewer) == ["breast nuclei"]
    np.testing.assert_array_equal(np.asarray(viewer.layers["breast nuclei"].data), expected)


@pytest.mark.parametrize("top_id, widened", [(255, np.uint16), (65535, np.uint32)])
def test_a_prompt_past_the_dtype_widens_the_layer(make_napari_viewer, tiny_model, top_id,
                                                   widened):
    """A prompt's new id (max + 1) that no longer fits in the layer's dtype widens it
    instead of wrapping to 0; undo still restores the layer's values."""
    viewer = make_napari_viewer()
    segment = _segment_with(viewer, tiny_model)
    segment.foreground.setValue(0.0)
    segment.run()
    layer = viewer.layers["breast nuclei"]
    before = np.asarray(layer.data).astype(np.int64)
    before[before >= top_id] = 0  # all ids fit in the dtype (a segmentation may hold more)
    before[0, 0] = top_id  # a nucleus with the largest id the dtype holds
    layer.data = before.astype(np.uint8 if top_id == 255 else np.uint16)
    _, boxes = segment.prompts.add_prompt_layers()
    boxes.add_rectangles(np.array([[40, 40], [70, 70]]))
    commit = segment.prompts.last_commit
    assert commit is not None and commit["id"] == top_id + 1, segment.status.text()
    assert layer.data.dtype == widened
    assert (np.asarray(layer.data) == top_id + 1).sum() == commit["area"] > 0
    assert np.asarray(layer.data)[0, 0] == top_id
    layer.undo()
    np.testing.assert_array_equal(np.asarray(layer.data), before)


def test_empty_auxiliary_folder_error_names_that_folder(make_napari_viewer, primary_folder,
                                                       tmp_path):
    """Defect 8: the error of an empty auxiliary folder starts with its own path."""
    train = _dock(make_napari_viewer(), "Train")
    empty = tmp_path / "empty_aux"
    (empty / "images").mkdir(parents=True)
    (empty / "labels").mkdir()
    train.primary.setText(str(primary_folder))
    train.add_aux_folder(str(empty))
    train.output.setText(str(tmp_path / "out"))
    train.start()
    assert train.last_error is not None
    assert str(train.last_error).startswith(str(empty)), str(train.last_error)
    assert not (tmp_path / "out").exists()


def test_train_status_says_what_follows_the_last_step(make_napari_viewer):
    """Defect 8: no 'eta 0 s' during the final validation and threshold tuning."""
    train = _dock(make_napari_viewer(), "Train")
    record = {"stage": "train", "epoch": 2, "epochs": 2, "step": 9, "total_steps": 10,
              "loss": 0.5, "eta_s": 3.0}
    train._on_record(record)
    assert "eta 3 s" in train.status.text()
    train._on_record({**record, "step": 10, "eta_s": 0.0})
    assert "eta" not in train.status.text() and "validating" in train.status.text()


def test_train_widget_saves_the_users_choices_not_a_backbones_defaults(make_napari_viewer):
    """A backbone's defaults are shown, never stored as settings (else a fresh window would
    train tiny_conv with a stale stored alignment or epoch count); a user's edit is stored."""
    from napari import settings as napari_settings
    from napari.settings import get_plugin_settings

    from napari_amasam.config import train_defaults

    viewer = make_napari_viewer()
    train = _dock(viewer, "Train")
    for backbone in ("vit_b", "tiny_conv"):
        train.backbone.setCurrentText(backbone)
    assert train.alignment.currentText() == train_defaults("tiny_conv")["alignment"] == "none"
    stored = get_plugin_settings(PLUGIN).train
    assert stored.alignment == "" and stored.epochs == 0  # nothing of the defaults saved
    train.alignment.setCurrentText("cgrl")  # the user's choice
    assert get_plugin_settings(PLUGIN).train.alignment == "cgrl"
    viewer.close()
    napari_settings._clear_plugin_settings_cache()
    again = _dock(make_napari_viewer(), "Train")
    assert again.backbone.currentText() == "tiny_conv"
    assert again.alignment.currentText() == "cgrl"
    assert again.epochs.value() == train_defaults("tiny_conv")["epochs"]
