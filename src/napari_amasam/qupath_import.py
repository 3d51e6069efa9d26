"""Read QuPath GeoJSON exports: detections -> instance labels, annotations -> polygons.

QuPath writes a ``FeatureCollection`` (older versions: a bare list of features, or one
feature). Each feature's kind is ``properties.objectType`` (``annotation``, ``detection``,
``cell``, ``tile``; QuPath 0.2: ``id`` such as ``PathAnnotationObject``). Cells contribute
their ``nucleusGeometry`` when present. Coordinates are full-resolution (x, y) pixels with
pixel edges at integers, as ``export`` writes them (see its module doc), so a polygon is
filled at pixel centres and exported labels come back pixel for pixel.

::

    file.geojson -> read_qupath_geojson -> QuPathObjects(detections, annotations)
      detections -> features_to_labels(shape, offset, downsample) -> (H, W) int32 labels
      annotations -> annotation_shapes -> napari Shapes data ((N, 2) row, col vertices)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from skimage.draw import polygon as fill_polygon

from .errors import DataError

DETECTION_KINDS = ("detection", "cell", "tile")
_LEGACY_KINDS = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
}
#: Foreign member our exporter adds: the label map's full-resolution (rows, cols).
IMAGE_SHAPE_KEY = "napari_amasam_image_shape"


@dataclass
class QuPathObjects:
    """Features of a QuPath GeoJSON file, sorted by kind.

    Attributes
    ----------
    detections : list of dict
        Detections, cells (their nucleus geometry) and tiles: GeoJSON features.
    annotations : list of dict
        Annotation features.
    image_shape : (rows, cols) or None
        Full-resolution image size when the file records it (files from this plugin).
    """

    detections: list[dict] = field(default_factory=list)
    annotations: list[dict] = field(default_factory=list)
    image_shape: tuple[int, int] | None = None


def _kind(feature: dict) -> str:
    props = feature.get("properties") or {}
    kind = props.get("objectType") or props.get("object_type") or feature.get("objectType")
    if kind is None:
        kind = _LEGACY_KINDS.get(str(feature.get("id", "")), "annotation")
    return str(kind).lower()


def read_qupath_geojson(path: str | Path) -> QuPathObjects:
    """Parse a QuPath GeoJSON export.

    Raises
    ------
    DataError
        One line naming the file: unreadable, not JSON, or not GeoJSON features.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"cannot be read as GeoJSON ({exc})") from None
    shape = None
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
        recorded = doc.get(IMAGE_SHAPE_KEY)
        if isinstance(recorded, list) and len(recorded) == 2:
            shape = (int(recorded[0]), int(recorded[1]))
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    elif isinstance(doc, list):
        features = doc
    else:
        raise DataError(path, "not a GeoJSON FeatureCollection, Feature or feature list")
    if not isinstance(features, list):
        raise DataError(path, "'features' is not a list")
    objects = QuPathObjects(image_shape=shape)
    for i, feature in enumerate(features):
        if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
            raise DataError(path, f"feature {i} has no geometry")
        kind = _kind(feature)
        if kind in DETECTION_KINDS:
            if kind == "cell" and isinstance(feature.get("nucleusGeometry"), dict):
                feature = {**feature, "geometry": feature["nucleusGeometry"]}
            objects.detections.append(feature)
        else:
            objects.annotations.append(feature)
    return objects


def _polygons(geometry: dict) -> list[list[np.ndarray]]:
    """Polygon/MultiPolygon -> list of polygons, each [exterior, *holes] of (K, 2) (x, y)."""
    kind, coords = geometry.get("type"), geometry.get("coordinates")
    if kind == "Polygon":
        parts = [coords]
    elif kind == "MultiPolygon":
        parts = coords
    else:
        return []
    return [[np.asarray(ring, dtype=float).reshape(-1, 2) for ring in part] for part in parts if part]


def features_extent(features: list[dict]) -> tuple[int, int]:
    """Full-resolution (rows, cols) covering every polygon vertex of ``features``."""
    rows = cols = 0
    for feature in features:
        for polygon in _polygons(feature["geometry"]):
            for ring in polygon:
                if ring.size:
                    cols = max(cols, math.ceil(float(ring[:, 0].max())))
                    rows = max(rows, math.ceil(float(ring[:, 1].max())))
    return rows, cols


def features_to_labels(
    features: list[dict],
    shape: tuple[int, int],
    offset: tuple[float, float] = (0, 0),
    downsample: float = 1.0,
) -> np.ndarray:
    """Rasterise polygon features into an instance map, one id per feature (1..N, in order).

    Parameters
    ----------
    features : list of GeoJSON features
        Polygon or MultiPolygon geometries; other geometry types are skipped.
    shape : (H, W)
        Size of the label map.
    offset : (row, col)
        Full-resolution position of the label map's top-left pixel.
    downsample : float
        Full-resolution pixels per label pixel.

    Returns
    -------
    (H, W) int32 labels; a pixel belongs to a feature when its centre lies inside the
    exterior ring and outside every hole; where features overlap, the later one wins.
    """
    if downsample <= 0:
        raise ValueError(f"downsample must be positive, not {downsample}")
    labels = np.zeros(shape, dtype=np.int32)
    off_y, off_x = (float(v) for v in offset)
    label = 0
    for feature in features:
        polygons = _polygons(feature["geometry"])
        if not polygons:
            continue
        label += 1
        mask = np.zeros(shape, dtype=bool)
        for exterior, *holes in polygons:
            for ring, value in [(exterior, True)] + [(h, False) for h in holes]:
                # Pixel centres sit at index + 0.5 in edge coordinates.
                cols = (ring[:, 0] - off_x) / downsample - 0.5
                rows = (ring[:, 1] - off_y) / downsample - 0.5
                rr, cc = fill_polygon(rows, cols, shape)
                mask[rr, cc] = value
        labels[mask] = label
    return labels


def annotation_shapes(
    features: list[dict], offset: tuple[float, float] = (0, 0)
) -> tuple[list[np.ndarray], list[str], dict[str, list[Any]]]:
    """napari Shapes data for annotation features.

    Returns
    -------
    data : list of (K, 2) float arrays of (row, col) vertices in napari's pixel-centre frame
        (edge coordinate - 0.5); one polygon per exterior ring (napari shapes have no holes),
        one path per LineString.
    shape_types : list of ``"polygon"`` / ``"path"``
    properties : dict with ``name`` and ``classification`` lists (one entry per shape)
    """
    off_y, off_x = (float(v) for v in offset)
    data, types = [], []
    properties: dict[str, list[Any]] = {"name": [], "classification": []}

    def add(ring: np.ndarray, kind: str, props: dict) -> None:
        if ring.shape[0] >= 2:
            if kind == "polygon" and np.array_equal(ring[0], ring[-1]):
                ring = ring[:-1]
            data.append(np.column_stack([ring[:, 1] - off_y - 0.5, ring[:, 0] - off_x - 0.5]))
            types.append(kind)
            classification = props.get("classification") or {}
            properties["classification"].append(
                classification.get("name", "") if isinstance(classification, dict) else str(classification)
            )
            properties["name"].append(str(props.get("name", "")))

    for feature in features:
        props = feature.get("properties") or {}
        geometry = feature["geometry"]
        if geometry.get("type") in ("LineString", "MultiLineString"):
            lines = [geometry["coordinates"]] if geometry["type"] == "LineString" else geometry["coordinates"]
            for line in lines:
                add(np.asarray(line, dtype=float).reshape(-1, 2), "path", props)
        for polygon in _polygons(geometry):
            add(polygon[0], "polygon", props)
    return data, types, properties
