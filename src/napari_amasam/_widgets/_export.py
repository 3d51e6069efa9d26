"""Export the nuclei layer: labels TIFF, QuPath GeoJSON or a measurements CSV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qtpy.QtWidgets import QFileDialog, QWidget

#: (dialog filter, extension) in the order the dialog offers them.
EXPORT_FORMATS = (
    ("TIFF labels (*.tif)", ".tif"),
    ("QuPath GeoJSON (*.geojson)", ".geojson"),
    ("Measurements CSV (*.csv)", ".csv"),
)
EXPORT_SUFFIXES = (".tif", ".tiff", ".geojson", ".csv")


def with_extension(path: str, selected_filter: str) -> str:
    """``path`` with the chosen format's extension added when it has none of ours
    (Qt's dialog adds none on Linux)."""
    if Path(path).suffix.lower() in EXPORT_SUFFIXES:
        return path
    for filter_text, suffix in EXPORT_FORMATS:
        if filter_text == selected_filter:
            return path + suffix
    return path + EXPORT_FORMATS[0][1]


def ask_export_path(parent: QWidget, start: str = "") -> str:
    """A save dialog; returns the path with its extension, or '' when cancelled."""
    path, selected = QFileDialog.getSaveFileName(
        parent, "Export nuclei", start, ";;".join(f for f, _ in EXPORT_FORMATS))
    return with_extension(path, selected) if path else ""


def export_nuclei(path: str | Path, labels: np.ndarray, image: np.ndarray | None) -> Path:
    """Write ``labels`` by the path's suffix; returns the written path.

    Raises
    ------
    ValueError
        For a suffix other than .tif/.tiff/.geojson/.csv.
    """
    from ..export import write_csv, write_geojson, write_labels_tiff

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        return Path(write_labels_tiff(path, labels))
    if suffix == ".geojson":
        return Path(write_geojson(path, labels, image=image))
    if suffix == ".csv":
        return Path(write_csv(path, labels, image=image))
    raise ValueError(f"{path}: export as .tif, .geojson or .csv")
