"""Export instance labels: compressed TIFF, QuPath GeoJSON, per-nucleus measurements CSV.

Coordinates
-----------
GeoJSON polygons use QuPath's convention: ``x`` = column, ``y`` = row, in full-resolution
pixels, with pixel ``(row, col)`` covering the square ``[col, col+1) x [row, row+1)``. So the
polygon traces pixel *edges*: a one-pixel nucleus at (row 5, col 7) is the diamond through
(7, 5.5), (7.5, 5), (8, 5.5), (7.5, 6). To rasterise a polygon back onto the pixel grid
(pixel centres at integer + 0.5), subtract 0.5 from each coordinate before
``skimage.draw.polygon``.

A label map that is a crop or a downsampled copy of a larger image maps back through
``offset`` (row, col of the crop's top-left pixel, in full-resolution pixels) and
``downsample`` (full-resolution pixels per label pixel):
``x_full = offset[1] + x_label * downsample``, ``y_full = offset[0] + y_label * downsample``.

Measurements (CSV and GeoJSON ``measurements``) are in pixels of the label map.

All writers write to a temporary file next to the target and ``os.replace`` it, so a
crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import csv
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi
from skimage.measure import approximate_polygon, find_contours, regionprops

from ._labels import check_label_map
from .atomic import atomic_write

MEASUREMENT_COLUMNS = (
    "label",
    "area",
    "centroid_y",
    "centroid_x",
    "perimeter",
    "eccentricity",
    "mean_intensity",
)

# QuPath's default colour for the "Nucleus" class is not fixed; this red reads well on H&E.
DEFAULT_COLOR = (255, 0, 0)


# ----------------------------------------------------------------------------- helpers


def _atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file in the target folder, then rename it
    (with the user's umask; see ``napari_amasam.atomic``)."""
    return atomic_write(path, write)


def _grey(image: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    """Grey values of ``image`` (luminance of RGB, unchanged for greyscale), (H, W) float."""
    if image is None:
        return None
    arr = np.asarray(image)
    if arr.shape[:2] != shape:
        raise ValueError(f"image shape {arr.shape[:2]} differs from labels shape {shape}")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        # ITU-R BT.709 luminance weights, in the image's own value range.
        return arr[..., :3].astype(np.float64) @ np.array([0.2125, 0.7154, 0.0721])
    if arr.ndim == 2:
        return arr.astype(np.float64)
    raise ValueError(f"image must be (H, W) or (H, W, 3), got shape {arr.shape}")


def smallest_label_dtype(max_label: int) -> np.dtype:
    """Smallest unsigned dtype holding ``max_label``: uint8, uint16 or uint32."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"label id {max_label} does not fit in uint32")


# ----------------------------------------------------------------------------- TIFF


def write_labels_tiff(path: str | Path, labels: np.ndarray) -> Path:
    """Write an instance map as a zlib-compressed TIFF in the smallest unsigned dtype.

    Parameters
    ----------
    path : str or Path
        Target file (``.tif``); its folder is created.
    labels : (H, W) integer array
        Instance map, 0 = background, ids >= 0.

    Returns
    -------
    Path written.
    """
    arr = check_label_map(labels)
    max_label = int(arr.max()) if arr.size else 0
    out = arr.astype(smallest_label_dtype(max_label), copy=False)
    return _atomic_write(path, lambda tmp: tifffile.imwrite(tmp, out, compression="zlib"))


# ----------------------------------------------------------------------------- measurements


def nucleus_measurements(
    labels: np.ndarray, image: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per-nucleus shape and intensity measurements.

    Parameters
    ----------
    labels : (H, W) integer array
        Instance map, 0 = background.
    image : (H, W, 3) or (H, W) array, optional
        Image the labels belong to; ``mean_intensity`` is its mean grey value (RGB
        luminance, in the image's value range) inside each nucleus, NaN without an image.

    Returns
    -------
    dict of column name -> (N,) array, N = number of nuclei, rows in increasing label order:
    ``label`` (int), ``area`` (pixels), ``centroid_y``, ``centroid_x`` (row, column),
    ``perimeter`` (pixels, skimage's 4-connected estimate), ``eccentricity`` (0 = circle),
    ``mean_intensity``.
    """
    arr = check_label_map(labels)
    grey = _grey(image, arr.shape)
    props = regionprops(arr)
    n = len(props)
    columns: dict[str, np.ndarray] = {
        "label": np.array([p.label for p in props], dtype=np.int64),
        "area": np.array([p.area for p in props], dtype=np.int64),
        "centroid_y": np.array([p.centroid[0] for p in props], dtype=float),
        "centroid_x": np.array([p.centroid[1] for p in props], dtype=float),
        "perimeter": np.array([p.perimeter for p in props], dtype=float),
        "eccentricity": np.array([p.eccentricity for p in props], dtype=float),
    }
    if grey is None or n == 0:
        columns["mean_intensity"] = np.full(n, np.nan)
    else:
        columns["mean_intensity"] = np.asarray(
            ndi.mean(grey, labels=arr, index=columns["label"]), dtype=float
        )
    return columns


def write_csv(path: str | Path, labels: np.ndarray, image: np.ndarray | None = None) -> Path:
    """Write :func:`nucleus_measurements` as CSV, one row per nucleus (header only if none).

    Parameters
    ----------
    path : str or Path
    labels : (H, W) integer array
    image : (H, W, 3) or (H, W) array, optional

    Returns
    -------
    Path written.
    """
    columns = nucleus_measurements(labels, image)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(MEASUREMENT_COLUMNS)
            for row in zip(*(columns[name] for name in MEASUREMENT_COLUMNS), strict=True):
                writer.writerow(
                    [int(row[0]), int(row[1])] + ["" if np.isnan(v) else f"{v:.6g}" for v in row[2:]]
                )

    return _atomic_write(path, write)


# ----------------------------------------------------------------------------- GeoJSON


def _outline(mask: np.ndarray) -> np.ndarray:
    """Closed outline of a binary mask at pixel-edge coordinates.

    Parameters
    ----------
    mask : (h, w) bool array

    Returns
    -------
    (K, 2) float array of (row, col) vertices in the pixel-edge convention of the module
    doc (first == last); the largest contour if the mask has several parts.
    """
    padded = np.pad(mask, 1).astype(np.float32)
    contours = find_contours(padded, 0.5)
    ring = max(contours, key=len)
    # Drop collinear vertices along straight runs (exact: tolerance 0).
    ring = approximate_polygon(ring, tolerance=0)
    if not np.array_equal(ring[0], ring[-1]):
        ring = np.vstack([ring, ring[:1]])
    # -1 undoes the padding; +0.5 moves from pixel-centre indices to pixel-edge coordinates.
    return ring - 1 + 0.5


def labels_to_geojson(
    labels: np.ndarray,
    offset: tuple[float, float] = (0, 0),
    downsample: float = 1.0,
    image: np.ndarray | None = None,
    classification: str = "Nucleus",
    color: tuple[int, int, int] = DEFAULT_COLOR,
) -> dict:
    """QuPath-compatible GeoJSON FeatureCollection: one Polygon detection per nucleus.

    Parameters
    ----------
    labels : (H, W) integer array
        Instance map, 0 = background.
    offset : (row, col)
        Full-resolution position of the label map's top-left pixel (y, x order, as numpy
        and napari index arrays).
    downsample : float
        Full-resolution pixels per label-map pixel.
    image : (H, W, 3) or (H, W) array, optional
        For the ``mean_intensity`` measurement.
    classification : str
        Class name of every nucleus.
    color : (r, g, b)
        Class colour shown by QuPath.

    Returns
    -------
    dict ``{"type": "FeatureCollection", "features": [...]}``; each feature has a uuid
    ``id``, a closed ``Polygon`` ring in full-resolution (x, y), and properties
    ``objectType`` ("detection"), ``classification`` {name, color}, ``measurements``
    (label-map pixels; NaN values left out, JSON has no NaN) and ``label``.
    """
    arr = check_label_map(labels)
    if downsample <= 0:
        raise ValueError(f"downsample must be positive, not {downsample}")
    off_y, off_x = (float(v) for v in offset)
    table = nucleus_measurements(arr, image)
    features = []
    boxes = ndi.find_objects(arr)
    for row, label in enumerate(table["label"]):
        box = boxes[label - 1]
        ring = _outline(arr[box] == label)
        ys = off_y + (ring[:, 0] + box[0].start) * downsample
        xs = off_x + (ring[:, 1] + box[1].start) * downsample
        measurements = {
            name: float(table[name][row])
            for name in MEASUREMENT_COLUMNS
            if name != "label" and not np.isnan(table[name][row])
        }
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid4()),
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[float(x), float(y)] for x, y in zip(xs, ys, strict=True)]],
                },
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": classification, "color": [int(c) for c in color]},
                    "measurements": measurements,
                    "label": int(label),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | Path, labels: np.ndarray, **kwargs) -> Path:
    """Write :func:`labels_to_geojson` (same keyword arguments) to ``path``.

    Returns
    -------
    Path written.
    """
    collection = labels_to_geojson(labels, **kwargs)

    def write(tmp: Path) -> None:
        with open(tmp, "w") as handle:
            json.dump(collection, handle)

    return _atomic_write(path, write)
