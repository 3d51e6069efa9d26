"""napari reader for QuPath GeoJSON (no Qt): detections -> Labels, annotations -> Shapes.

The Labels layer has the image's full-resolution size when the file records it (files
written by this plugin), else the smallest size holding every detection (QuPath exports
carry no image size; pixel (0, 0) stays at the image origin, so it overlays the image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

GEOJSON_SUFFIXES = (".geojson",)


def get_reader(path: str | list[str]):
    """npe2 ``get_reader``: a reader for one ``.geojson`` path, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if not str(path).lower().endswith(GEOJSON_SUFFIXES):
        return None
    return read_geojson_layers


def read_geojson_layers(path: str | list[str]) -> list[tuple[Any, dict, str]]:
    """Layer data tuples: ``(labels, meta, "labels")`` for detections and
    ``(shapes, meta, "shapes")`` for annotations (only the kinds the file holds)."""
    from .qupath_import import (
        annotation_shapes,
        features_extent,
        features_to_labels,
        read_qupath_geojson,
    )

    if isinstance(path, list):
        path = path[0]
    name = Path(path).stem
    objects = read_qupath_geojson(path)
    layers: list[tuple[Any, dict, str]] = []
    if objects.detections:
        shape = objects.image_shape or features_extent(objects.detections)
        labels = features_to_labels(objects.detections, shape)
        layers.append((labels, {"name": f"{name} detections"}, "labels"))
    if objects.annotations:
        data, types, properties = annotation_shapes(objects.annotations)
        if data:
            meta = {
                "name": f"{name} annotations",
                "shape_type": types,
                "properties": properties,
                "edge_color": "yellow",
                "face_color": "transparent",
                "edge_width": 2,
            }
            layers.append((data, meta, "shapes"))
    if not layers:
        # An empty Labels layer says "read fine, nothing in it" better than an error.
        import numpy as np

        layers.append((np.zeros(objects.image_shape or (1, 1), dtype=np.int32),
                       {"name": f"{name} detections"}, "labels"))
    return layers
