"""Segment widget section: segment every image of a folder into label files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtWidgets import QCheckBox, QHBoxLayout, QPushButton

from ._common import PathPicker
from ._layout import Section, tip
from ._settings import bind

if TYPE_CHECKING:
    from ._segment import SegmentWidget
    from ._workers import Job


class BatchSection(Section):
    """Input folder, output folder, extra formats and a Run button (collapsed at first)."""

    def __init__(self, owner: SegmentWidget):
        super().__init__("Batch (folder of images)", expanded=False)
        self.owner = owner
        self.input = tip(PathPicker("folder", "Folder of images"),
                         "Folder whose images (.tif, .png, .jpg) are segmented")
        self.output = tip(PathPicker("folder", "Output folder"),
                          "Where <image>_labels.tif (and GeoJSON/CSV) are written")
        self.geojson = tip(QCheckBox("GeoJSON"), "Also write QuPath GeoJSON per image")
        self.csv = tip(QCheckBox("CSV"), "Also write a per-nucleus measurements CSV per image")
        self.button = tip(QPushButton("Run batch"), "Segment every image of the input folder "
                          "with the model and settings above")
        self.button.clicked.connect(lambda: self.run())
        row = QHBoxLayout()
        row.addWidget(self.geojson)
        row.addWidget(self.csv)
        row.addWidget(self.button)
        self.form.addRow("Input folder", self.input)
        self.form.addRow("Output folder", self.output)
        self.form.addRow("Also write", row)
        bind("segment", "batch_geojson", self.geojson)
        bind("segment", "batch_csv", self.csv)

    def run(self, input_dir: str | None = None, output_dir: str | None = None) -> Job | None:
        """Segment every image in a folder; writes ``<stem>_labels.tif`` (+ GeoJSON/CSV)."""
        owner = self.owner
        if owner.busy():
            return None
        input_dir = input_dir or self.input.text()
        output_dir = output_dir or self.output.text()
        if not input_dir or not output_dir:
            owner.show_error(ValueError("choose an input and an output folder for the batch"))
            return None
        from ..data.io import collect_images

        images, problems = collect_images([input_dir])
        if problems:
            owner.show_error(ValueError("; ".join(problems)))
            return None
        model_key = owner.model_key()
        generator = batch_steps(images, Path(output_dir), self.geojson.isChecked(),
                                self.csv.isChecked(), owner.thresholds(), model_key,
                                {**owner._tiling(), "input_mpp": owner.input_mpp()},
                                owner.cached_predictor(model_key))
        return owner.start(generator, f"batch: {len(images)} images", self._done)

    def _done(self, result) -> None:
        if result is None:
            return
        self.owner.network_runs += result["runs"]
        text = f"batch: wrote {len(result['written'])} files"
        if result["skipped"]:
            text += f"; skipped {len(result['skipped'])}: " + "; ".join(result["skipped"])
        self.owner.status.setText(text)
        self.owner.finished.emit(result["written"])


def batch_steps(images, out: Path, geojson: bool, csv: bool, thresholds, model_key, tiling,
                predictor):
    """Worker generator: one ``image`` record per file; returns written/skipped/runs."""
    from ..data.io import read_image
    from ..errors import AmaSamError
    from ..export import write_csv, write_geojson, write_labels_tiff
    from ._segment import load_predictor

    if predictor is None:
        predictor = load_predictor(model_key)
    if predictor.is_classical:
        thresholds = None
    out.mkdir(parents=True, exist_ok=True)
    written, skipped, runs = [], [], 0
    for index, path in enumerate(images):
        yield {"stage": "image", "done": index, "total": len(images), "name": path.name}
        try:
            image = read_image(path)
            result = yield from predictor.iter_segment(image, **tiling, thresholds=thresholds)
        except AmaSamError as exc:
            skipped.append(str(exc))
            continue
        runs += 1
        written.append(write_labels_tiff(out / f"{path.stem}_labels.tif", result.labels))
        if geojson:
            written.append(write_geojson(out / f"{path.stem}.geojson", result.labels, image=image))
        if csv:
            written.append(write_csv(out / f"{path.stem}.csv", result.labels, image=image))
    yield {"stage": "image", "done": len(images), "total": len(images), "name": ""}
    return {"written": written, "skipped": skipped, "runs": runs}
