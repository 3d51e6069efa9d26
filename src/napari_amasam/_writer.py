"""napari writer: a Labels layer to QuPath-compatible GeoJSON (no Qt)."""

from __future__ import annotations

from typing import Any

import numpy as np


def write_labels_geojson(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer ``(path, data, meta) -> [path]``.

    Polygons are written in full-resolution pixel coordinates of the layer's data, which
    is what QuPath expects for an image opened at level 0.
    """
    from .export import write_geojson

    labels = np.asarray(data)
    if labels.ndim != 2:
        raise ValueError(f"{path}: GeoJSON export takes a 2D Labels layer, got {labels.ndim}D")
    if not str(path).lower().endswith(".geojson"):
        path = f"{path}.geojson"
    write_geojson(path, labels)
    return [str(path)]
