"""Segment widget: an image layer + a model folder (or the classical baseline) -> Labels.

Also: export, batch over a folder, "Add to training data" (the corrected labels become a new
training pair) and "Fine-tune" (continue training the current model with that folder).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._common import PathPicker, Progress, device_combo, notify, report_error, trained_models
from ._training_data import safe_stem, save_training_pair, unique_folder
from ._workers import Job

if TYPE_CHECKING:
    import napari

CLASSICAL = "classical"
EXPORT_FILTER = "TIFF labels (*.tif);;QuPath GeoJSON (*.geojson);;Measurements CSV (*.csv)"


class SegmentWidget(QWidget):
    """Segment nuclei in an image layer into a ``<image> nuclei`` Labels layer.

    Attributes
    ----------
    network_runs : int
        How many times the network (or the classical baseline) ran; re-thresholding from
        cached maps does not count.
    last_error : Exception or None
        Error of the last job (also shown in the status line).
    """

    finished = Signal(object)  # the labels layer (segmentation) or list of paths (batch)

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.job: Job | None = None
        self.last_error: BaseException | None = None
        self.network_runs = 0
        self._progress: Progress | None = None
        self._predictor: Any = None
        self._predictor_key: tuple | None = None
        self._cache: dict[str, Any] = {"key": None, "maps": None}
        self._model_thresholds = None
        self._build()
        self._refresh_layers()
        layers = self.viewer.layers
        layers.events.inserted.connect(self._refresh_layers)
        layers.events.removed.connect(self._refresh_layers)
        registry = trained_models()
        for folder in registry.folders:
            self._add_model_choice(folder, select=False)
        registry.added.connect(self._on_model_trained)
        self.destroyed.connect(lambda *_: _disconnect(registry.added, self._on_model_trained))

    # ----------------------------------------------------------------------------- layout
    def _build(self) -> None:
        layout = QVBoxLayout(self)
        main = QGroupBox("Segment")
        form = QFormLayout(main)
        self.image_layer = QComboBox()
        self.model = QComboBox()
        self.model.setEditable(True)
        self.model.addItem(CLASSICAL)
        self.model.currentTextChanged.connect(self._model_changed)
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse_model)
        row = QHBoxLayout()
        row.addWidget(self.model, stretch=1)
        row.addWidget(browse)
        self.tile_size = QSpinBox()
        self.tile_size.setRange(0, 4096)
        self.tile_size.setSpecialValueText("model input size")
        self.overlap = QSpinBox()
        self.overlap.setRange(-1, 2048)
        self.overlap.setValue(-1)
        self.overlap.setSpecialValueText("auto")
        self.foreground = self._probability_box()
        self.centre = self._probability_box()
        self.boundary = self._probability_box()
        self.min_size = QSpinBox()
        self.min_size.setRange(0, 100000)
        self.device = device_combo()
        # "model default" = the folder's config.json precision (napari_amasam.precision)
        self.precision = QComboBox()
        self.precision.addItems(["model default", "auto", "fp32", "bf16"])
        self.precision.setToolTip("bf16 is faster on CUDA GPUs and on CPUs with bf16 "
                                  "arithmetic (AVX-512 BF16, AMX); auto picks it there")
        form.addRow("Image layer", self.image_layer)
        form.addRow("Model", row)
        form.addRow("Tile size", self.tile_size)
        form.addRow("Overlap", self.overlap)
        form.addRow("Foreground threshold", self.foreground)
        form.addRow("Centre threshold", self.centre)
        form.addRow("Boundary threshold", self.boundary)
        form.addRow("Min size (px)", self.min_size)
        form.addRow("Device", self.device)
        form.addRow("Precision", self.precision)
        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.export_button = QPushButton("Export…")
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.export_button.clicked.connect(self._export_dialog)
        for b in (self.run_button, self.cancel_button, self.export_button):
            buttons.addWidget(b)
        form.addRow(buttons)
        layout.addWidget(main)

        batch = QGroupBox("Batch (folder of images)")
        form = QFormLayout(batch)
        self.batch_input = PathPicker("folder", "Folder of images")
        self.batch_output = PathPicker("folder", "Output folder")
        self.batch_geojson = QCheckBox("GeoJSON")
        self.batch_csv = QCheckBox("CSV")
        self.batch_button = QPushButton("Run batch")
        self.batch_button.clicked.connect(self.run_batch)
        row = QHBoxLayout()
        row.addWidget(self.batch_geojson)
        row.addWidget(self.batch_csv)
        row.addWidget(self.batch_button)
        form.addRow("Input folder", self.batch_input)
        form.addRow("Output folder", self.batch_output)
        form.addRow("Also write", row)
        layout.addWidget(batch)

        data = QGroupBox("Training data")
        form = QFormLayout(data)
        self.data_folder = PathPicker("folder", "Training data folder (images/ + labels/)",
                                      placeholder="the model's primary folder")
        self.pair_name = QLineEdit()
        self.pair_name.setPlaceholderText("image layer name")
        self.add_button = QPushButton("Add to training data")
        self.add_button.clicked.connect(lambda: self.add_to_training_data())
        self.finetune_epochs = QSpinBox()
        self.finetune_epochs.setRange(1, 1000)
        self.finetune_epochs.setValue(5)
        self.finetune_button = QPushButton("Fine-tune")
        self.finetune_button.clicked.connect(lambda: self.fine_tune())
        row = QHBoxLayout()
        row.addWidget(QLabel("epochs"))
        row.addWidget(self.finetune_epochs)
        row.addWidget(self.finetune_button)
        form.addRow("Folder", self.data_folder)
        form.addRow("Pair name", self.pair_name)
        form.addRow(self.add_button)
        form.addRow(row)
        layout.addWidget(data)

        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout.addWidget(self.status)
        layout.addStretch(1)

        # Threshold edits re-run post-processing only, once the user pauses typing.
        self._rethreshold_timer = QTimer(self)
        self._rethreshold_timer.setSingleShot(True)
        self._rethreshold_timer.setInterval(400)
        self._rethreshold_timer.timeout.connect(self.rethreshold)
        for box in (self.foreground, self.centre, self.boundary, self.min_size):
            box.valueChanged.connect(lambda *_: self._rethreshold_timer.start())
        self._model_changed(CLASSICAL)

    @staticmethod
    def _probability_box() -> QDoubleSpinBox:
        box = QDoubleSpinBox()
        box.setRange(0.0, 1.0)
        box.setDecimals(2)
        box.setSingleStep(0.05)
        return box

    # ---------------------------------------------------------------------- layers, models
    def _refresh_layers(self, *_: Any) -> None:
        from napari.layers import Image

        current = self.image_layer.currentText()
        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]
        self.image_layer.blockSignals(True)
        self.image_layer.clear()
        self.image_layer.addItems(names)
        if current in names:
            self.image_layer.setCurrentText(current)
        self.image_layer.blockSignals(False)

    def _browse_model(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Model folder", "")
        if path:
            self._add_model_choice(path, select=True)

    def _add_model_choice(self, folder: str, select: bool) -> None:
        if self.model.findText(folder) < 0:
            self.model.addItem(folder)
        if select:
            self.model.setCurrentText(folder)

    def _on_model_trained(self, folder: str) -> None:
        self._add_model_choice(folder, select=True)
        self.status.setText(f"new model available: {folder}")

    def model_name(self) -> str:
        return self.model.currentText().strip() or CLASSICAL

    def _model_changed(self, name: str) -> None:
        """Fill the thresholds from the model folder's thresholds.json."""
        from ..config import PostprocessConfig

        name = name.strip() or CLASSICAL
        classical = name == CLASSICAL
        thresholds = PostprocessConfig()
        if not classical:
            from ..model_folder import read_model_folder

            try:
                folder = read_model_folder(name)
            except Exception as exc:  # not (yet) a model folder: say so, keep going
                self.status.setText(f"model: {exc}")
            else:
                thresholds = folder.thresholds
                primary = folder.train.primary if folder.train is not None else ""
                if primary and not self.data_folder.text():
                    self.data_folder.setText(primary)
        self._model_thresholds = thresholds
        boxes = (self.foreground, self.centre, self.boundary, self.min_size)
        for box in boxes:
            box.blockSignals(True)
        self.foreground.setValue(thresholds.foreground_threshold)
        self.centre.setValue(thresholds.center_distance_threshold)
        self.boundary.setValue(thresholds.boundary_distance_threshold)
        self.min_size.setValue(thresholds.min_size)
        for box in boxes:
            box.blockSignals(False)
            # The classical baseline has its own fixed settings.
            box.setEnabled(not classical)
        self.finetune_button.setEnabled(not classical)

    def thresholds(self):
        """The model's :class:`PostprocessConfig` with the form's four values."""
        from ..config import PostprocessConfig

        base = self._model_thresholds or PostprocessConfig()
        return dataclasses.replace(
            base,
            foreground_threshold=self.foreground.value(),
            center_distance_threshold=self.centre.value(),
            boundary_distance_threshold=self.boundary.value(),
            min_size=self.min_size.value(),
        )

    def _tiling(self) -> dict[str, int | None]:
        return {"tile_size": self.tile_size.value() or None,
                "overlap": None if self.overlap.value() < 0 else self.overlap.value()}

    def _model_key(self) -> tuple[str, str, str | None]:
        """``(model, device, precision)`` from the form; precision None = the model's."""
        precision = self.precision.currentText()
        return (self.model_name(), self.device.currentText(),
                None if precision == "model default" else precision)

    def predictor(self, key: tuple | None = None):
        """The loaded predictor for ``(model, device[, precision])`` (default: the form's;
        cached)."""
        from ..inference.predictor import Predictor

        key = key or self._model_key()
        if self._predictor_key != key:
            if key[0] == CLASSICAL:
                self._predictor = Predictor.classical()
            else:
                self._predictor = Predictor.from_folder(
                    key[0], device=key[1], precision=key[2] if len(key) > 2 else None)
            self._predictor_key = key
        return self._predictor

    def current_image_layer(self):
        name = self.image_layer.currentText()
        if not name or name not in self.viewer.layers:
            return None
        return self.viewer.layers[name]

    def _input_mpp(self, layer) -> float | None:
        mpp = (layer.metadata or {}).get("mpp")
        return float(mpp) if mpp else None

    # ------------------------------------------------------------------------------ run
    def _cache_key(self, layer) -> tuple:
        tiling = self._tiling()
        return (layer.name, id(layer.data), tuple(np.shape(layer.data)), *self._model_key(),
                tiling["tile_size"], tiling["overlap"])

    def _busy(self) -> bool:
        if self.job is not None and self.job.running:
            notify("a job is already running; wait or cancel it")
            return True
        return False

    def run(self) -> Job | None:
        """Segment the chosen image layer (re-thresholds cached maps when only thresholds changed)."""
        if self._busy():
            return None
        layer = self.current_image_layer()
        if layer is None:
            self._show_error(ValueError("choose an image layer to segment"))
            return None
        key = self._cache_key(layer)
        image = np.asarray(layer.data)
        thresholds = self.thresholds()
        cached = self._cache["maps"] if self._cache["key"] == key else None
        # Everything the worker needs is read from the form here, on the UI thread.
        generator = self._segment_steps(image, key, cached, thresholds, self._input_mpp(layer),
                                        self._model_key(),
                                        self._tiling())
        return self._start(generator, f"segmenting {layer.name}",
                           lambda result: self._show_result(layer, image, result))

    def rethreshold(self) -> Job | None:
        """Re-run post-processing with the form's thresholds, only if maps are cached."""
        layer = self.current_image_layer()
        if layer is None or self._cache["key"] != self._cache_key(layer) or self._cache["maps"] is None:
            return None
        return self.run()

    def _segment_steps(self, image, key, cached, thresholds, input_mpp, model_key, tiling):
        """Generator run in the worker: load the model, tiles (or cached maps), labels."""
        from ..inference.predictor import SegmentResult

        yield {"stage": "setup", "message": f"loading model {model_key[0]}"}
        predictor = self.predictor(model_key)
        if cached is not None:
            yield {"stage": "postprocess"}
            return SegmentResult(predictor.postprocess(cached, thresholds), cached)
        self.network_runs += 1
        result = yield from predictor.iter_segment(
            image, **tiling, input_mpp=input_mpp, thresholds=thresholds)
        self._cache = {"key": key, "maps": result.maps}
        return result

    def _show_result(self, image_layer, image: np.ndarray, result) -> None:
        if result is None:  # cancelled
            return
        layer = self.write_labels_layer(image_layer, image, result.labels)
        n = int(len(layer.features))
        self.status.setText(f"{image_layer.name}: {n} nuclei")
        self.finished.emit(layer)

    def write_labels_layer(self, image_layer, image: np.ndarray, labels: np.ndarray):
        """Add or update ``<image> nuclei`` with ``labels`` and a per-nucleus features table."""
        import pandas as pd

        from ..data.io import as_rgb_uint8
        from ..export import nucleus_measurements

        columns = nucleus_measurements(labels, as_rgb_uint8(image, image_layer.name))
        features = pd.DataFrame(columns)
        # napari looks nuclei up by the `index` column (status bar shows their features).
        features.insert(0, "index", features["label"].to_numpy())
        name = f"{image_layer.name} nuclei"
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data = labels
            layer.features = features
        else:
            ndim = 2
            layer = self.viewer.add_labels(
                labels, name=name, features=features,
                scale=tuple(image_layer.scale[-ndim:]),
                translate=tuple(image_layer.translate[-ndim:]),
                units=tuple(image_layer.units[-ndim:]),
                metadata={"source_image": image_layer.name, "model": self.model_name()},
            )
        layer.metadata["model"] = self.model_name()
        return layer

    def labels_layer(self):
        """The ``<image> nuclei`` layer of the chosen image (None if not segmented yet)."""
        name = f"{self.image_layer.currentText()} nuclei"
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def cancel(self) -> None:
        if self.job is not None and self.job.running:
            self.job.cancel()
            self.status.setText("cancelling…")

    # --------------------------------------------------------------------------- export
    def _export_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export nuclei", "", EXPORT_FILTER)
        if path:
            self.export(path)

    def export(self, path: str | Path) -> Path | None:
        """Write the current nuclei as ``.tif`` labels, ``.geojson`` or ``.csv`` (by suffix)."""
        from ..export import write_csv, write_geojson, write_labels_tiff

        layer = self.labels_layer()
        if layer is None:
            self._show_error(ValueError("nothing to export: run the segmentation first"))
            return None
        path = Path(path)
        labels = np.asarray(layer.data)
        image_layer = self.current_image_layer()
        image = np.asarray(image_layer.data) if image_layer is not None else None
        suffix = path.suffix.lower()
        if suffix in (".tif", ".tiff"):
            written = write_labels_tiff(path, labels)
        elif suffix == ".geojson":
            written = write_geojson(path, labels, image=image)
        elif suffix == ".csv":
            written = write_csv(path, labels, image=image)
        else:
            self._show_error(ValueError(f"{path}: export as .tif, .geojson or .csv"))
            return None
        self.status.setText(f"exported {written}")
        return Path(written)

    # ---------------------------------------------------------------------------- batch
    def run_batch(self, input_dir: str | None = None, output_dir: str | None = None) -> Job | None:
        """Segment every image in a folder; writes ``<stem>_labels.tif`` (+ GeoJSON/CSV)."""
        if self._busy():
            return None
        input_dir = input_dir or self.batch_input.text()
        output_dir = output_dir or self.batch_output.text()
        if not input_dir or not output_dir:
            self._show_error(ValueError("choose an input and an output folder for the batch"))
            return None
        from ..data.io import collect_images

        images, problems = collect_images([input_dir])
        if problems:
            self._show_error(ValueError("; ".join(problems)))
            return None
        generator = self._batch_steps(images, Path(output_dir), self.batch_geojson.isChecked(),
                                      self.batch_csv.isChecked(), self.thresholds(),
                                      self._model_key(),
                                      self._tiling())
        return self._start(generator, f"batch: {len(images)} images", self._batch_done)

    def _batch_steps(self, images, out: Path, geojson: bool, csv: bool, thresholds,
                     model_key, tiling):
        from ..data.io import read_image
        from ..errors import AmaSamError
        from ..export import write_csv, write_geojson, write_labels_tiff

        predictor = self.predictor(model_key)
        if predictor.is_classical:
            thresholds = None
        out.mkdir(parents=True, exist_ok=True)
        written, skipped = [], []
        for index, path in enumerate(images):
            yield {"stage": "image", "done": index, "total": len(images), "name": path.name}
            try:
                image = read_image(path)
                result = yield from predictor.iter_segment(image, **tiling,
                                                           thresholds=thresholds)
            except AmaSamError as exc:
                skipped.append(str(exc))
                continue
            self.network_runs += 1
            written.append(write_labels_tiff(out / f"{path.stem}_labels.tif", result.labels))
            if geojson:
                written.append(write_geojson(out / f"{path.stem}.geojson", result.labels, image=image))
            if csv:
                written.append(write_csv(out / f"{path.stem}.csv", result.labels, image=image))
        yield {"stage": "image", "done": len(images), "total": len(images), "name": ""}
        return {"written": written, "skipped": skipped}

    def _batch_done(self, result) -> None:
        if result is None:
            return
        text = f"batch: wrote {len(result['written'])} files"
        if result["skipped"]:
            text += f"; skipped {len(result['skipped'])}: " + "; ".join(result["skipped"])
        self.status.setText(text)
        self.finished.emit(result["written"])

    # ------------------------------------------------------------------- training data
    def training_folder(self) -> str:
        """The folder new pairs go to: the form's, else the model's recorded primary folder."""
        if self.data_folder.text():
            return self.data_folder.text()
        if self.model_name() != CLASSICAL:
            from ..model_folder import read_model_folder

            try:
                train = read_model_folder(self.model_name()).train
            except Exception:
                return ""
            return train.primary if train is not None else ""
        return ""

    def add_to_training_data(self, folder: str | None = None,
                             name: str | None = None) -> tuple[Path, Path] | None:
        """Save the image and its (corrected) nuclei layer as ``images/<name>.png`` + ``labels/<name>.tif``.

        Refuses (returns None, says why) when a file of that pair already exists.
        """
        image_layer, labels_layer = self.current_image_layer(), self.labels_layer()
        if image_layer is None or labels_layer is None:
            self._show_error(ValueError("segment an image first (no '<image> nuclei' layer)"))
            return None
        folder = folder or self.training_folder()
        if not folder:
            self._show_error(ValueError("choose a training data folder"))
            return None
        name = safe_stem(name or self.pair_name.text() or image_layer.name)
        try:
            image_path, label_path = save_training_pair(
                folder, name, np.asarray(image_layer.data), np.asarray(labels_layer.data))
        except (FileExistsError, ValueError) as exc:
            self._show_error(exc)
            return None
        self.status.setText(f"added {image_path.name} + {label_path.name} to {folder}")
        return image_path, label_path

    def fine_tune(self, epochs: int | None = None, out: str | None = None) -> Job | None:
        """Continue training the current model with the training folder's data.

        Settings come from the model folder's config.json; the result goes to a new folder
        next to it (``<model>_finetuned``) and is offered in the model list when done.
        """
        from ..config import ModelConfig, TrainConfig
        from ..model_folder import read_model_folder
        from ..training.trainer import train

        if self._busy():
            return None
        model_dir = self.model_name()
        if model_dir == CLASSICAL:
            self._show_error(ValueError("the classical baseline cannot be fine-tuned; pick a model folder"))
            return None
        try:
            folder = read_model_folder(model_dir)
        except Exception as exc:
            self._show_error(exc)
            return None
        primary = self.training_folder()
        if not primary:
            self._show_error(ValueError("choose the training data folder to fine-tune with"))
            return None
        target = Path(out) if out else unique_folder(Path(model_dir).with_name(
            f"{Path(model_dir).name}_finetuned"))
        recorded = folder.train or TrainConfig()
        cfg = dataclasses.replace(
            recorded, primary=primary, out=str(target), init_from=str(model_dir),
            epochs=int(epochs or self.finetune_epochs.value()), max_steps=0,
            device=self.device.currentText())
        import threading

        cancel = threading.Event()
        generator = train(cfg, ModelConfig(), cancel=cancel)
        return self._start(generator, f"fine-tuning → {target}", self._finetune_done,
                           cancel_event=cancel)

    def _finetune_done(self, out) -> None:
        if out is not None and (Path(out) / "weights.pt").is_file():
            trained_models().add(str(out))

    # ------------------------------------------------------------------- job plumbing
    def _start(self, generator, description: str, on_returned, cancel_event=None) -> Job:
        self.last_error = None
        self._progress = Progress(description)
        self.status.setText(description)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.job = Job(generator, cancel_event=cancel_event, on_yielded=self._on_record,
                       on_returned=on_returned, on_errored=self._show_error,
                       on_finished=self._on_finished)
        return self.job.start()

    def _on_record(self, record: dict) -> None:
        stage = record.get("stage")
        if self._progress is None:
            return
        if stage == "tile":
            self._progress.update_to(record["done"], record["total"], "tiles")
        elif stage == "image":
            self._progress.update_to(record["done"], record["total"], record.get("name"))
        elif stage == "train":
            self._progress.update_to(record["step"], record["total_steps"],
                                     f"epoch {record['epoch']}/{record['epochs']}")
            self.status.setText(f"fine-tuning step {record['step']}/{record['total_steps']} "
                                f"loss {record['loss']:.4f}")
        elif stage in ("setup", "postprocess"):
            self.status.setText(record.get("message", "post-processing"))

    def _on_finished(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _show_error(self, exc: BaseException) -> None:
        report_error(self, exc)


def _disconnect(signal, slot) -> None:
    try:
        signal.disconnect(slot)
    except (TypeError, RuntimeError):
        pass
