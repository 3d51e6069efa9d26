"""Export instance labels: compressed TIFF, QuPath GeoJSON, per-nucleus measurements CSV.

Coordinates
-----------
GeoJSON polygons use QuPath's convention: ``x`` = column, ``y`` = row, in full-resolution
pixels, with pixel ``(row, col)`` covering the square ``[col, col+1) x [row, row+1)``. The
polygons trace pixel *edges* exactly (a one-pixel nucleus at (row 5, col 7) is the square
(7, 5), (8, 5), (8, 6), (7, 6)), so filling a polygon at pixel centres (integer + 0.5, never
on an edge) gives back exactly the nucleus' pixels: ``qupath_import.features_to_labels``.
A nucleus with holes is a Polygon with one inner ring per hole; a nucleus in several pieces
is a MultiPolygon. Rings follow RFC 7946 (exterior counter-clockwise, holes clockwise, in
the x-right / y-down image frame's shoelace sense: positive area outside, negative inside).

A label map that is a crop or a downsampled copy of a larger image maps back through
``offset`` (row, col of the crop's top-left pixel, in full-resolution pixels) and
``downsample`` (full-resolution pixels per label pixel):
``x_full = offset[1] + x_label * downsample``, ``y_full = offset[0] + y_label * downsample``.
A whole-slide caller passes the tile's level-0 position as ``offset``.

Measurements: the CSV is in pixels of the label map. GeoJSON ``measurements`` use QuPath's
names and full-resolution units: ``Area µm^2`` and ``Perimeter µm`` when the image's
``mpp`` (microns per full-resolution pixel) is known, else ``Area px^2`` / ``Perimeter px``;
``Solidity``, ``Eccentricity`` and ``Mean intensity`` (with the image).

All writers write to a temporary file next to the target and ``os.replace`` it, so a
crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import csv
import json
import math
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi
from skimage.measure import points_in_poly, regionprops

from ._labels import check_label_map, smallest_label_dtype
from .atomic import atomic_write
from .qupath_import import IMAGE_SHAPE_KEY

MEASUREMENT_COLUMNS = (
    "label",
    "area",
    "centroid_y",
    "centroid_x",
    "perimeter",
    "eccentricity",
    "solidity",
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
    ``solidity`` (area / convex hull area), ``mean_intensity``.
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
        "solidity": np.array([p.solidity for p in props], dtype=float),
    }
    if grey is None or n == 0:
        columns["mean_intensity"] = np.full(n, np.nan)
    else:
        columns["mean_intensity"] = np.asarray(
            ndi.mean(grey, labels=arr, index=columns["label"]), dtype=float
        )
    return columns


#: Columns :func:`write_csv` appends when the pixel size is known: area and perimeter in µm.
MICRON_COLUMNS = ("area_um2", "perimeter_um")


def write_csv(
    path: str | Path,
    labels: np.ndarray,
    image: np.ndarray | None = None,
    mpp: float | None = None,
) -> Path:
    """Write :func:`nucleus_measurements` as CSV, one row per nucleus (header only if none).

    Parameters
    ----------
    path : str or Path
    labels : (H, W) integer array
    image : (H, W, 3) or (H, W) array, optional
    mpp : float, optional
        Microns per pixel of ``labels``: when given, :data:`MICRON_COLUMNS` follow the
        pixel-unit columns (area and perimeter stay in pixels, as napari shows them).

    Returns
    -------
    Path written.
    """
    columns = nucleus_measurements(labels, image)
    header = list(MEASUREMENT_COLUMNS)
    if mpp is not None:
        columns["area_um2"] = columns["area"] * mpp**2
        columns["perimeter_um"] = columns["perimeter"] * mpp
        header += MICRON_COLUMNS

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for row in zip(*(columns[name] for name in header), strict=True):
                writer.writerow(
                    [int(row[0]), int(row[1])] + ["" if np.isnan(v) else f"{v:.6g}" for v in row[2:]]
                )

    return _atomic_write(path, write)


# ----------------------------------------------------------------------------- GeoJSON


# Directed unit edges of a pixel, clockwise on screen (y down), so the pixel is on the right:
# (which neighbour must be background, start corner, end corner) with corners as (dx, dy).
_PIXEL_EDGES = (
    ((-1, 0), (0, 0), (1, 0)),  # top
    ((0, 1), (1, 0), (1, 1)),  # right
    ((1, 0), (1, 1), (0, 1)),  # bottom
    ((0, -1), (0, 1), (0, 0)),  # left
)


def _pixel_edge_rings(mask: np.ndarray) -> list[np.ndarray]:
    """Closed rings along the pixel edges between ``mask`` and background.

    Parameters
    ----------
    mask : (h, w) bool array

    Returns
    -------
    list of (K, 2) float arrays of (x, y) = (col, row) corners, first == last, collinear
    corners dropped. Exterior rings have positive shoelace area, holes negative. Pixels
    touching only at a corner belong to separate rings (4-connectivity).
    """
    padded = np.pad(mask, 1)
    outgoing: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for (dr, dc), (x0, y0), (x1, y1) in _PIXEL_EDGES:
        neighbour = padded[1 + dr : padded.shape[0] - 1 + dr, 1 + dc : padded.shape[1] - 1 + dc]
        rows, cols = np.nonzero(mask & ~neighbour)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            outgoing.setdefault((c + x0, r + y0), []).append((c + x1, r + y1))
    rings = []
    while outgoing:
        start = next(iter(outgoing))
        ring = [start]
        here, direction = start, None
        while True:
            ends = outgoing[here]
            if len(ends) == 1 or direction is None:
                end = ends.pop(0)
            else:
                # A corner shared by two diagonal pixels: turn right (towards the pixel we
                # are tracing), which keeps corner-touching pixels in separate rings.
                right = (-direction[1], direction[0])
                end = next((e for e in ends if (e[0] - here[0], e[1] - here[1]) == right), ends[0])
                ends.remove(end)
            if not ends:
                del outgoing[here]
            direction = (end[0] - here[0], end[1] - here[1])
            here = end
            ring.append(here)
            if here == start:
                break
        rings.append(_drop_collinear(np.asarray(ring, dtype=float)))
    return rings


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """Keep the corners of a closed axis-aligned ring (first == last) where it turns."""
    points = ring[:-1]
    before = points - np.roll(points, 1, axis=0)
    after = np.roll(points, -1, axis=0) - points
    turns = (before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]) != 0
    kept = points[turns]
    return np.vstack([kept, kept[:1]])


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) / 2)


def mask_to_polygons(mask: np.ndarray) -> list[list[np.ndarray]]:
    """Polygons (exterior ring + hole rings) tracing a binary mask's pixel edges.

    Parameters
    ----------
    mask : (h, w) bool array

    Returns
    -------
    list of polygons, one per 4-connected piece; each a list of (K, 2) (x, y) rings in
    mask pixel coordinates, exterior first (positive shoelace area), then its holes.
    """
    rings = _pixel_edge_rings(mask)
    exteriors = [r for r in rings if _signed_area(r) > 0]
    holes = [r for r in rings if _signed_area(r) < 0]
    polygons = [[r] for r in exteriors]
    for hole in holes:
        if len(polygons) == 1:
            polygons[0].append(hole)
            continue
        # The mask pixel right of the hole's first edge belongs to the piece around it.
        (x0, y0), (x1, y1) = hole[0], hole[1]
        dx, dy = x1 - x0, y1 - y0
        probe = np.array([[(x0 + x1) / 2 - dy / 2, (y0 + y1) / 2 + dx / 2]])
        owner = next(
            (p for p in polygons if points_in_poly(probe, p[0])[0]), polygons[0]
        )
        owner.append(hole)
    return polygons


def _qupath_measurements(
    table: dict[str, np.ndarray], row: int, downsample: float, mpp: float | None
) -> dict[str, float]:
    """QuPath-named measurements of one nucleus, full-resolution units (µm with ``mpp``)."""
    area = float(table["area"][row]) * downsample**2
    perimeter = float(table["perimeter"][row]) * downsample
    if mpp:
        values = {"Area µm^2": area * mpp**2, "Perimeter µm": perimeter * mpp}
    else:
        values = {"Area px^2": area, "Perimeter px": perimeter}
    values["Solidity"] = float(table["solidity"][row])
    values["Eccentricity"] = float(table["eccentricity"][row])
    values["Mean intensity"] = float(table["mean_intensity"][row])
    return {k: v for k, v in values.items() if np.isfinite(v)}  # JSON has no NaN


def labels_to_geojson(
    labels: np.ndarray,
    offset: tuple[float, float] = (0, 0),
    downsample: float = 1.0,
    image: np.ndarray | None = None,
    classification: str = "Nucleus",
    color: tuple[int, int, int] = DEFAULT_COLOR,
    mpp: float | None = None,
) -> dict:
    """QuPath-compatible GeoJSON FeatureCollection: one detection per nucleus.

    Parameters
    ----------
    labels : (H, W) integer array
        Instance map, 0 = background.
    offset : (row, col)
        Full-resolution position of the label map's top-left pixel (y, x order, as numpy
        and napari index arrays): a crop's origin or a slide tile's level-0 position.
    downsample : float
        Full-resolution pixels per label-map pixel.
    image : (H, W, 3) or (H, W) array, optional
        For the ``Mean intensity`` measurement.
    classification : str
        Class name of every nucleus.
    color : (r, g, b)
        Class colour shown by QuPath.
    mpp : float, optional
        Microns per full-resolution pixel; measurements in µm when given.

    Returns
    -------
    dict ``{"type": "FeatureCollection", "features": [...]}``; each feature has a uuid
    ``id``, a ``Polygon`` (holes as inner rings) or ``MultiPolygon`` in full-resolution
    (x, y), and properties ``objectType`` ("detection"), ``classification`` {name, color},
    ``measurements`` (see the module doc) and ``label`` (the id in ``labels``). The
    collection's ``napari_amasam_image_shape`` is the label map's full-resolution extent
    ``offset + shape * downsample`` (rows, cols).
    """
    arr = check_label_map(labels)
    if downsample <= 0:
        raise ValueError(f"downsample must be positive, not {downsample}")
    if mpp is not None and not mpp > 0:
        raise ValueError(f"mpp must be positive, not {mpp}")
    off_y, off_x = (float(v) for v in offset)
    table = nucleus_measurements(arr, image)
    features = []
    boxes = ndi.find_objects(arr)
    for row, label in enumerate(table["label"]):
        box = boxes[label - 1]
        origin = np.array([box[1].start, box[0].start], dtype=float)  # (x, y) of the box
        polygons = [
            [
                [[off_x + float(x) * downsample, off_y + float(y) * downsample]
                 for x, y in (ring + origin)]
                for ring in polygon
            ]
            for polygon in mask_to_polygons(arr[box] == label)
        ]
        geometry = (
            {"type": "Polygon", "coordinates": polygons[0]}
            if len(polygons) == 1
            else {"type": "MultiPolygon", "coordinates": polygons}
        )
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid4()),
                "geometry": geometry,
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": classification, "color": [int(c) for c in color]},
                    "measurements": _qupath_measurements(table, row, downsample, mpp),
                    "label": int(label),
                },
            }
        )
    # Foreign member (ignored by QuPath): the full-resolution extent of this label map, so
    # the napari reader can rebuild a Labels layer of the image's size.
    extent = [math.ceil(off_y + arr.shape[0] * downsample), math.ceil(off_x + arr.shape[1] * downsample)]
    return {"type": "FeatureCollection", "features": features, IMAGE_SHAPE_KEY: extent}


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
