"""Slide widget: segment a whole-slide image (opened by the slide reader) into a Labels layer.

The area is the whole slide (tissue only), the current field of view, or the polygons of a
Shapes layer. The engine (``slide.pipeline.iter_segment_slide``) writes the pyramidal labels
TIFF, GeoJSON and CSV into the output folder; the labels come back as a multiscale Labels
layer read lazily from that TIFF, placed over the slide (processing pixels are
``downsample`` slide pixels each).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._common import PathPicker, Progress, device_combo, end_job, report_error
from ._workers import Job

if TYPE_CHECKING:
    import napari

WHOLE, VIEW, SHAPES = "Whole slide (tissue)", "Current field of view", "Shapes layer"


def _slide_layers(viewer) -> list:
    from napari.layers import Image

    return [layer for layer in viewer.layers
            if isinstance(layer, Image) and layer.metadata.get("slide_path")]


class SlideWidget(QWidget):
    """Segment a slide image layer; the result is added as ``<slide> nuclei``.

    Attributes
    ----------
    last_result : SlideResult or None
    last_error : Exception or None
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.job: Job | None = None
        self.last_result: Any = None
        self.last_error: BaseException | None = None
        self._progress: Progress | None = None
        self._build()
        self._refresh_layers()
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)

    # ----------------------------------------------------------------------------- layout
    def _build(self) -> None:
        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.slide_combo = QComboBox()
        form.addRow("Slide layer", self.slide_combo)
        self.model_picker = PathPicker("folder", "Model folder", placeholder="classical")
        form.addRow("Model folder", self.model_picker)
        self.area_combo = QComboBox()
        self.area_combo.addItems([WHOLE, VIEW, SHAPES])
        form.addRow("Area", self.area_combo)
        self.shapes_combo = QComboBox()
        form.addRow("Shapes layer", self.shapes_combo)
        self.out_picker = PathPicker("folder", "Output folder",
                                     placeholder="beside the slide: <slide>_nuclei")
        form.addRow("Output folder", self.out_picker)
        self.workers_spin = QSpinBox()
        self.workers_spin.setRange(1, 64)
        form.addRow("Local workers", self.workers_spin)
        self.scheduler_edit = QLineEdit()
        self.scheduler_edit.setPlaceholderText("local Dask cluster (or tcp://host:8786, serial)")
        form.addRow("Dask scheduler", self.scheduler_edit)
        self.device = device_combo()
        form.addRow("Device", self.device)
        layout.addLayout(form)
        buttons = QHBoxLayout()
        self.run_button = QPushButton("Segment slide")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        layout.addStretch()

    def _refresh_layers(self, *_: Any) -> None:
        from napari.layers import Shapes

        for combo, layers in ((self.slide_combo, _slide_layers(self.viewer)),
                              (self.shapes_combo, [la for la in self.viewer.layers
                                                   if isinstance(la, Shapes)])):
            current = combo.currentText()
            combo.clear()
            combo.addItems([layer.name for layer in layers])
            if current in [layer.name for layer in layers]:
                combo.setCurrentText(current)

    # ------------------------------------------------------------------------------ area
    def _slide_layer(self):
        name = self.slide_combo.currentText()
        if not name:
            raise ValueError("no slide layer: open a slide with File > Open first")
        return self.viewer.layers[name]

    def field_of_view(self, layer) -> np.ndarray:
        """The visible rectangle as a polygon in the layer's level-0 ``(x, y)`` pixels."""
        height, width = self.viewer.canvas.size
        # napari 0.9 moved the camera to viewer.scene (viewer.camera is deprecated there).
        camera = getattr(self.viewer, "scene", self.viewer).camera
        zoom = camera.zoom
        center = np.asarray(camera.center)[-2:]
        half = np.array([height, width]) / (2 * zoom)
        corners = [layer.world_to_data(center + sign * half) for sign in (-1, 1)]
        (y0, x0), (y1, x1) = (np.asarray(c)[-2:] for c in corners)
        from ..slide.regions import rectangle

        return rectangle(y0, x0, y1, x1)

    def _area(self, layer):
        from ..slide.regions import Area

        choice = self.area_combo.currentText()
        if choice == WHOLE:
            return None
        if choice == VIEW:
            return Area([self.field_of_view(layer)])
        name = self.shapes_combo.currentText()
        if not name:
            raise ValueError("choose a Shapes layer with the region(s) to segment")
        shapes = self.viewer.layers[name]
        polygons = []
        for data in shapes.data:
            # Shapes vertices are (row, col) in the Shapes layer's data; map to the slide's.
            world = [shapes.data_to_world(v) for v in np.asarray(data)]
            pixels = np.array([np.asarray(layer.world_to_data(w))[-2:] for w in world])
            polygons.append(pixels[:, ::-1].astype(float))
        if not polygons:
            raise ValueError(f"Shapes layer {name!r} has no shapes")
        return Area(polygons)

    # ------------------------------------------------------------------------------- run
    def run(self) -> None:
        """Start segmenting with the current settings."""
        from ..slide.pipeline import iter_segment_slide
        from ..slide.reader import slide_stem

        try:
            layer = self._slide_layer()
            area = self._area(layer)
        except (ValueError, KeyError) as exc:
            report_error(self, exc)
            return
        slide_path = Path(layer.metadata["slide_path"])
        out = (self.out_picker.text()
               or str(slide_path.parent / f"{slide_stem(slide_path)}_nuclei"))
        model = self.model_picker.text() or "classical"
        generator = iter_segment_slide(
            slide_path, model, out, mpp=layer.metadata.get("mpp"), roi=area,
            tissue=area is None, scheduler=self.scheduler_edit.text().strip() or None,
            workers=self.workers_spin.value(), device=self.device.currentText(),
        )
        self.last_error = None
        self.status.setText("planning regions…")
        self._progress = Progress("Segmenting slide")
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self._layer_name = layer.name
        self.job = Job(generator, on_yielded=self._on_record, on_returned=self._on_result,
                       on_errored=lambda exc: report_error(self, exc),
                       on_finished=lambda: end_job(self, self.run_button))
        self.job.start()

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.status.setText("cancelling after the current region (finished regions are kept "
                                "and resume next time)…")

    def _on_record(self, record: dict) -> None:
        stage = record["stage"]
        if stage == "plan":
            self._progress.update_to(record["done"], record["regions"])
            share = record["tissue_fraction"]
            tissue = "" if share is None else f" (tissue: {share:.0%} of the slide)"
            self.status.setText(f"{record['regions']} regions to segment{tissue}")
        elif stage == "region":
            self._progress.update_to(record["done"], record["total"])
            self.status.setText(f"region {record['done']}/{record['total']}: "
                                f"{record['nuclei']} nuclei, about {record['eta_s']:.0f}s left")
        elif stage == "write":
            self.status.setText(f"writing {record['what']}…")

    def _on_result(self, result) -> None:
        if result is None:  # cancelled
            self.status.setText("cancelled; run again with the same settings to resume")
            return
        self.last_result = result
        self.add_labels_layer(result)
        self.status.setText(f"{result.nuclei} nuclei in {result.seconds:.0f}s -> "
                            f"{result.labels_path.parent}")


    def add_labels_layer(self, result):
        """Add the labels TIFF as a lazy multiscale Labels layer aligned with the slide."""
        import dask.array as da
        import tifffile
        import zarr

        store = tifffile.imread(result.labels_path, aszarr=True)
        group = zarr.open(store, mode="r")
        levels = ([da.from_zarr(group[key]) for key in sorted(group.keys(), key=int)]
                  if hasattr(group, "keys") else [da.from_zarr(group)])
        slide_layer = self.viewer.layers[self._layer_name]
        d = result.downsample
        scale = np.asarray(slide_layer.scale)[-2:] * d
        # Processing pixel i spans slide pixels [i*d, (i+1)*d): its centre is at i*d + (d-1)/2.
        translate = np.asarray(slide_layer.translate)[-2:] + \
            np.asarray(slide_layer.scale)[-2:] * (d - 1) / 2
        return self.viewer.add_labels(levels if len(levels) > 1 else levels[0],
                                      name=f"{self._layer_name} nuclei",
                                      multiscale=len(levels) > 1, scale=scale,
                                      translate=translate,
                                      metadata={"labels_path": str(result.labels_path)})
