"""Segment widget: an image layer + a model folder (or the classical baseline) -> Labels.

The widget holds the form (image, pixel size, model, thresholds, tiling, device), runs the
segmentation job and owns the sections below it, one file each: prompts
(:mod:`._prompts`), batch (:mod:`._batch`), training data and fine-tuning
(:mod:`._training_data_section`). Results go to the nuclei layer through
:mod:`._nuclei_layer` (edits are never overwritten).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
)

from .._labels import compact_labels
from ._batch import BatchSection
from ._common import Progress, device_combo, end_job, notify, report_error, trained_models
from ._export import ask_export_path, export_nuclei
from ._layout import ScrollableDock, Section, tip
from ._nuclei_layer import measure_nuclei, write_nuclei_layer
from ._pixel_size import layer_mpp
from ._prompts import PromptSection
from ._settings import bind, recent_models, remember_model
from ._training_data_section import TrainingDataSection
from ._workers import Job

if TYPE_CHECKING:
    import napari

CLASSICAL = "classical"


def load_predictor(model_key: tuple):
    """The engine's predictor for ``(model folder or 'classical', device[, precision])``
    (worker-side; precision None = the model folder's)."""
    from ..inference.predictor import Predictor

    if model_key[0] == CLASSICAL:
        return Predictor.classical()
    precision = model_key[2] if len(model_key) > 2 else None
    return Predictor.from_folder(model_key[0], device=model_key[1], precision=precision)


@dataclasses.dataclass
class Segmentation:
    """What a segmentation job hands back to the UI thread."""

    key: tuple
    predictor: Any
    predictor_key: tuple
    labels: np.ndarray
    maps: Any
    features: Any
    network_ran: bool
    thresholds: Any  # the PostprocessConfig that made ``labels``


class SegmentWidget(ScrollableDock):
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
        # Cached network maps and the thresholds of the labels last made from them.
        self._cache: dict[str, Any] = {"key": None, "maps": None, "thresholds": None}
        self._rethreshold_pending = False  # a threshold edit arrived while a job ran
        self._model_thresholds = None
        self._outputs: dict[str, Any] = {}  # image layer name -> its latest nuclei layer
        self._build()
        self._refresh_layers()
        layers = self.viewer.layers
        layers.events.inserted.connect(self._refresh_layers)
        layers.events.removed.connect(self._refresh_layers)
        registry = trained_models()
        for folder in recent_models()[::-1] + registry.folders:
            self._add_model_choice(folder, select=False)
        registry.added.connect(self._on_model_trained)
        self.destroyed.connect(lambda *_: _disconnect(registry.added, self._on_model_trained))

    # ----------------------------------------------------------------------------- layout
    def _build(self) -> None:
        main = Section("Segment")
        form = main.form
        self.image_layer = tip(QComboBox(), "Image layer to segment (RGB H&E, any bit depth)")
        self.image_layer.currentTextChanged.connect(self._image_changed)
        self.pixel_size = tip(QDoubleSpinBox(), (
            "Microns per pixel of this image (from the layer or its file when known; "
            "40x is about 0.25, 20x about 0.5). The image is rescaled to the model's "
            "training resolution. 'unknown' uses it as it is."))
        self.pixel_size.setDecimals(3)
        self.pixel_size.setRange(0.0, 50.0)
        self.pixel_size.setSingleStep(0.05)
        self.pixel_size.setSpecialValueText("unknown")
        self.model = tip(QComboBox(), (
            "'classical' (colour deconvolution baseline) or a trained model folder; "
            "type a path and press Enter, or Browse. Recently used folders are listed."))
        self.model.setEditable(True)
        self.model.setMinimumContentsLength(28)
        self.model.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.model.addItem(CLASSICAL)
        self.model.currentTextChanged.connect(self._model_text_changed)
        self.model.lineEdit().editingFinished.connect(
            lambda: self._model_changed(self.model_name()))
        browse = tip(QPushButton("Browse…"), "Choose a trained model folder")
        browse.clicked.connect(self._browse_model)
        row = QHBoxLayout()
        row.addWidget(self.model, stretch=1)
        row.addWidget(browse)
        self.model_status = QLabel("")
        self.model_status.setWordWrap(True)
        form.addRow("Image layer", self.image_layer)
        form.addRow("Pixel size (µm)", self.pixel_size)
        form.addRow("Model", row)
        form.addRow("", self.model_status)
        buttons = QHBoxLayout()
        self.run_button = tip(QPushButton("Run"), "Segment the image (only re-thresholds when "
                              "just the thresholds changed)")
        self.cancel_button = tip(QPushButton("Cancel"), "Stop after the current tile")
        self.cancel_button.setEnabled(False)
        self.export_button = tip(QPushButton("Export…"), "Save the nuclei as labels TIFF, "
                                 "QuPath GeoJSON or a measurements CSV")
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.export_button.clicked.connect(self._export_dialog)
        for b in (self.run_button, self.cancel_button, self.export_button):
            buttons.addWidget(b)
        form.addRow(buttons)
        self.content.addWidget(main)

        post = Section("Thresholds", expanded=True)
        self.foreground = self._probability_box("Nucleus probability above which a pixel is "
                                                "foreground")
        self.centre = self._probability_box("Centre-distance value that seeds a nucleus "
                                            "(higher: fewer, surer seeds)")
        self.boundary = self._probability_box("Boundary-distance value below which pixels "
                                              "split touching nuclei")
        self.min_size = tip(QSpinBox(), "Smallest nucleus kept (pixels at the model's "
                            "resolution)")
        self.min_size.setRange(0, 100000)
        post.form.addRow("Foreground", self.foreground)
        post.form.addRow("Centre", self.centre)
        post.form.addRow("Boundary", self.boundary)
        post.form.addRow("Min size (px)", self.min_size)
        self.content.addWidget(post)

        tiling = Section("Tiling and device", expanded=False)
        self.tile_size = tip(QSpinBox(), "Tile side in pixels (at most the model input size)")
        self.tile_size.setRange(0, 4096)
        self.tile_size.setSpecialValueText("model input size")
        self.overlap = tip(QSpinBox(), "Overlap between tiles in pixels (auto: tile/8, "
                           "at least 32)")
        self.overlap.setRange(-1, 2048)
        self.overlap.setValue(-1)
        self.overlap.setSpecialValueText("auto")
        self.device = tip(device_combo(), "Where the network runs (auto: CUDA, then MPS, "
                          "then CPU)")
        # "model default" = the folder's config.json precision (napari_amasam.precision)
        self.precision = tip(QComboBox(), "bf16 is faster on CUDA GPUs and on CPUs with bf16 "
                             "arithmetic (AVX-512 BF16, AMX); auto picks it there; model "
                             "default: the model folder's setting")
        self.precision.addItems(["model default", "auto", "fp32", "bf16"])
        tiling.form.addRow("Tile size", self.tile_size)
        tiling.form.addRow("Overlap", self.overlap)
        tiling.form.addRow("Device", self.device)
        tiling.form.addRow("Precision", self.precision)
        self.content.addWidget(tiling)

        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.content.addWidget(self.status)

        self.prompts = PromptSection(self)
        self.batch = BatchSection(self)
        self.training_data = TrainingDataSection(self)
        for section in (self.prompts, self.batch, self.training_data):
            self.content.addWidget(section)
        self.content.addStretch(1)

        for key, control in (("device", self.device), ("tile_size", self.tile_size),
                             ("overlap", self.overlap)):
            bind("segment", key, control)

        # Threshold edits re-run post-processing only, once the user pauses typing. A Run
        # stops the timer (it uses the form's thresholds): left armed, it would fire at the
        # next processEvents (napari's progress bar calls it), after later edits too.
        self._rethreshold_timer = QTimer(self)
        self._rethreshold_timer.setSingleShot(True)
        self._rethreshold_timer.setInterval(400)
        self._rethreshold_timer.timeout.connect(self.rethreshold)
        for box in (self.foreground, self.centre, self.boundary, self.min_size):
            box.valueChanged.connect(lambda *_: self._rethreshold_timer.start())
        self._model_changed(CLASSICAL)

    @staticmethod
    def _probability_box(tooltip: str) -> QDoubleSpinBox:
        box = tip(QDoubleSpinBox(), tooltip)
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
        if self.image_layer.currentText() != current:
            self._image_changed(self.image_layer.currentText())

    def _image_changed(self, name: str) -> None:
        """Fill the pixel size from the new image layer (metadata, scale or file)."""
        layer = self.current_image_layer()
        mpp = layer_mpp(layer) if layer is not None else None
        self.pixel_size.setValue(mpp or 0.0)

    def _browse_model(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Model folder", "")
        if path:
            self._add_model_choice(path, select=True)

    def _add_model_choice(self, folder: str, select: bool) -> None:
        if self.model.findText(folder) < 0:
            self.model.insertItem(1, folder)  # newest first, after 'classical'
        if select:
            self.model.setCurrentText(folder)
            self._model_changed(folder)

    def _on_model_trained(self, folder: str) -> None:
        self._shown_model = None  # a folder trained again in place: re-read its thresholds
        self._add_model_choice(folder, select=True)
        self.status.setText(f"new model available: {folder}")

    def model_name(self) -> str:
        return self.model.currentText().strip() or CLASSICAL

    def _model_text_changed(self, text: str) -> None:
        """A picked or typed model: load it once it is one; while typing, no stale error."""
        from pathlib import Path

        name = text.strip() or CLASSICAL
        if name == CLASSICAL or (Path(name) / "config.json").is_file():
            self._model_changed(name)
        else:
            self.model_status.setText("")

    def _model_changed(self, name: str) -> None:
        """Fill the thresholds from the model folder's thresholds.json (once per model, so
        leaving the model box does not reset thresholds the user has edited)."""
        from ..config import PostprocessConfig

        name = name.strip() or CLASSICAL
        if name == getattr(self, "_shown_model", None):
            return
        self._shown_model = name
        classical = name == CLASSICAL
        thresholds = PostprocessConfig()
        self.model_status.setText("")
        if not classical:
            from ..model_folder import read_model_folder

            try:
                folder = read_model_folder(name)
            except Exception as exc:  # not (yet) a model folder: say so, keep going
                self.model_status.setText(f"model: {exc}")
            else:
                thresholds = folder.thresholds
                remember_model(name)
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
        self.training_data.model_changed(None if classical else name)
        self.prompts.model_changed(classical)

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

    def model_key(self) -> tuple[str, str, str | None]:
        """``(model, device, precision)`` from the form; precision None = the model's."""
        precision = self.precision.currentText()
        return (self.model_name(), self.device.currentText(),
                None if precision == "model default" else precision)

    def predictor(self, key: tuple | None = None):
        """The loaded predictor for ``(model, device[, precision])`` (default: the form's;
        cached).

        UI thread only; jobs get the cached one (or None) and load in the worker.
        """
        key = key or self.model_key()
        if self._predictor_key != key:
            self._keep_predictor(load_predictor(key), key)
        return self._predictor

    def cached_predictor(self, key: tuple):
        """The already loaded predictor for ``key``, or None (a job then loads one)."""
        return self._predictor if self._predictor_key == key else None

    def _keep_predictor(self, predictor, key) -> None:
        if self._predictor_key != key:
            self._predictor, self._predictor_key = predictor, key
            self.prompts.forget_session()

    def current_image_layer(self):
        name = self.image_layer.currentText()
        if not name or name not in self.viewer.layers:
            return None
        return self.viewer.layers[name]

    def input_mpp(self) -> float | None:
        return self.pixel_size.value() or None

    # ------------------------------------------------------------------------------ run
    def _cache_key(self, layer) -> tuple:
        tiling = self._tiling()
        return (layer.name, id(layer.data), tuple(np.shape(layer.data)), *self.model_key(),
                tiling["tile_size"], tiling["overlap"], self.input_mpp())

    def busy(self) -> bool:
        if self.job is not None and self.job.running:
            notify("a job is already running; wait or cancel it")
            return True
        return False

    def run(self) -> Job | None:
        """Segment the chosen image layer (re-thresholds cached maps when only thresholds changed)."""
        if self.busy():
            return None
        self._rethreshold_timer.stop()
        self._rethreshold_pending = False
        layer = self.current_image_layer()
        if layer is None:
            self.show_error(ValueError("choose an image layer to segment"))
            return None
        key = self._cache_key(layer)
        image = np.asarray(layer.data)
        model_key = self.model_key()
        cached = self._cache["maps"] if self._cache["key"] == key else None
        # Everything the worker needs is read from the form here, on the UI thread.
        generator = segment_steps(image, layer.name, key, cached, self.thresholds(),
                                  self.input_mpp(), model_key, self._tiling(),
                                  self.cached_predictor(model_key))
        return self.start(generator, f"segmenting {layer.name}",
                          lambda result: self._show_result(layer, result))

    def rethreshold(self) -> Job | None:
        """Re-run post-processing with the form's thresholds, only if maps are cached and
        the thresholds differ from the shown result's; during a job, once it has ended."""
        if self.job is not None and self.job.running:
            self._rethreshold_pending = True  # that job read the form before this edit
            return None
        layer = self.current_image_layer()
        if layer is None or self._cache["key"] != self._cache_key(layer) or self._cache["maps"] is None:
            return None
        if self._cache["thresholds"] == self.thresholds():
            return None  # the layer already shows these thresholds
        return self.run()

    def _show_result(self, image_layer, result: Segmentation | None) -> None:
        if result is None:  # cancelled
            return
        self._keep_predictor(result.predictor, result.predictor_key)
        if result.network_ran:
            self.network_runs += 1
        self._cache = {"key": result.key, "maps": result.maps, "thresholds": result.thresholds}
        target = self._outputs.get(image_layer.name)
        layer, kept = write_nuclei_layer(self.viewer, image_layer, result.labels,
                                         result.features, self.model_name(), target)
        self._outputs[image_layer.name] = layer
        text = f"{image_layer.name}: {len(layer.features)} nuclei"
        task = getattr(result.maps, "routed_task", None) if result.maps is not None else None
        if task is not None:  # CA-SAM: which task's alignment layer segmented it
            text += " (base path: like no task)" if task < 0 else f" (routed to task {task})"
        if kept is not None:
            text += (f" in new layer '{layer.name}'; your edits in '{kept.name}' are kept")
            notify(f"'{kept.name}' was edited, so the new result went to '{layer.name}'")
        self.status.setText(text)
        self.finished.emit(layer)

    def labels_layer(self):
        """The nuclei layer of the chosen image (its latest result; None if none yet)."""
        image = self.image_layer.currentText()
        layer = self._outputs.get(image)
        if layer is not None and layer in self.viewer.layers:
            return layer
        name = f"{image} nuclei"
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def cancel(self) -> None:
        if self.job is not None and self.job.running:
            self.job.cancel()
            self.status.setText("cancelling…")

    # --------------------------------------------------------------------------- export
    def _export_dialog(self) -> None:
        path = ask_export_path(self)
        if path:
            self.export(path)

    def export(self, path) -> Any:
        """Write the current nuclei as ``.tif`` labels, ``.geojson`` or ``.csv`` (by suffix)."""
        layer = self.labels_layer()
        if layer is None:
            self.show_error(ValueError("nothing to export: run the segmentation first"))
            return None
        image_layer = self.current_image_layer()
        image = np.asarray(image_layer.data) if image_layer is not None else None
        try:
            written = export_nuclei(path, np.asarray(layer.data), image)
        except ValueError as exc:
            self.show_error(exc)
            return None
        self.status.setText(f"exported {written}")
        return written

    # ------------------------------------------------------------------- job plumbing
    def start(self, generator, description: str, on_returned, cancel_event=None) -> Job:
        """Run an engine generator as this widget's job (progress, status, errors)."""
        self.last_error = None
        self._progress = Progress(description)
        self.status.setText(description)
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.job = Job(generator, cancel_event=cancel_event, on_yielded=self._on_record,
                       on_returned=on_returned, on_errored=self.show_error,
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
        elif stage == "adapt":
            self._progress.update_to(record["step"], record["total_steps"], "adapting")
        elif stage == "train":
            self._progress.update_to(record["step"], record["total_steps"],
                                     f"epoch {record['epoch']}/{record['epochs']}")
            self.status.setText(f"fine-tuning step {record['step']}/{record['total_steps']} "
                                f"loss {record['loss']:.4f}")
        elif stage in ("setup", "progress", "postprocess", "measure", "prompt"):
            self.status.setText(record.get("message", stage))

    def _on_finished(self) -> None:
        end_job(self, self.run_button)
        self.prompts.on_job_finished()
        if self._rethreshold_pending:
            self._rethreshold_pending = False
            self._rethreshold_timer.start()  # after a prompt re-run that may start first

    def show_error(self, exc: BaseException) -> None:
        report_error(self, exc)


def segment_steps(image, name, key, cached, thresholds, input_mpp, model_key, tiling,
                  predictor):
    """Generator run in the worker: model, tiles (or cached maps), labels, measurements.

    Touches no widget state: everything comes in as arguments and goes back as a
    :class:`Segmentation`.
    """
    from ..inference.predictor import SegmentResult

    if predictor is None:
        yield {"stage": "setup", "message": f"loading model {model_key[0]}"}
        predictor = load_predictor(model_key)
    if cached is not None:
        yield {"stage": "postprocess", "message": "re-thresholding the cached maps"}
        result, ran = SegmentResult(predictor.postprocess(cached, thresholds), cached), False
    else:
        result = yield from predictor.iter_segment(
            image, **tiling, input_mpp=input_mpp,
            thresholds=None if predictor.is_classical else thresholds)
        ran = True
    yield {"stage": "measure", "message": "measuring nuclei"}
    labels = compact_labels(result.labels)  # here, off the UI thread
    features = measure_nuclei(labels, image, name)
    return Segmentation(key, predictor, model_key, labels, result.maps, features, ran,
                        thresholds)


def _disconnect(signal, slot) -> None:
    try:
        signal.disconnect(slot)
    except (TypeError, RuntimeError):
        pass
