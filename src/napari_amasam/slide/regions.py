"""What part of a slide to segment, cut into independent square regions.

The *area* is either the detected tissue (:mod:`.tissue`), a user region (polygons in
level-0 pixel coordinates: a GeoJSON file in the CLI, a napari Shapes layer or the field of
view in the widget), or the whole slide. It is cut into core squares of ``region_size``
pixels at the processing resolution; a region is kept when the area touches its core.
Every region is later read with a halo around its core and owns the nuclei whose centroid
lies in its core, so the regions are independent tasks and every nucleus has one owner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .reader import SlideError


@dataclass(frozen=True)
class Region:
    """One core square at the processing resolution.

    Attributes
    ----------
    index : int
        Position in the slide's row-major grid of regions (stable across runs: it names
        the region's part file).
    y0, x0, y1, x1 : int
        Half-open core rectangle in processing-resolution pixels.
    """

    index: int
    y0: int
    x0: int
    y1: int
    x1: int


@dataclass
class Area:
    """Polygons (level-0 ``(x, y)`` vertices) limiting what is segmented; None = everywhere.

    Nuclei are kept when their centroid lies inside a polygon (a polygon's holes are not
    subtracted).
    """

    polygons: list[np.ndarray] | None

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Boolean mask of the points ``(x, y)`` (level-0 pixels) inside the area."""
        from skimage.measure import points_in_poly

        x, y = np.asarray(x, float), np.asarray(y, float)
        if self.polygons is None:
            return np.ones(x.shape, bool)
        points = np.stack([x, y], axis=-1)
        inside = np.zeros(x.shape, bool)
        for polygon in self.polygons:
            if len(points):
                inside |= points_in_poly(points, polygon)
        return inside

    def rasterize(self, shape: tuple[int, int], downsample: float) -> np.ndarray:
        """The area as a ``shape`` bool mask whose pixels are ``downsample`` level-0 pixels."""
        from skimage.draw import polygon as fill_polygon

        mask = np.zeros(shape, bool)
        if self.polygons is None:
            mask[:] = True
            return mask
        for poly in self.polygons:
            # Pixel centres of the mask sit at (i + 0.5) * downsample in level-0 units.
            rows, cols = fill_polygon(poly[:, 1] / downsample - 0.5, poly[:, 0] / downsample - 0.5,
                                      shape)
            mask[rows, cols] = True
            # Thin polygons may cover no pixel centre: mark the pixels of their vertices too.
            vr = np.clip((poly[:, 1] / downsample).astype(int), 0, shape[0] - 1)
            vc = np.clip((poly[:, 0] / downsample).astype(int), 0, shape[1] - 1)
            mask[vr, vc] = True
        return mask


def rectangle(y0: float, x0: float, y1: float, x1: float) -> np.ndarray:
    """A rectangle as a closed polygon of level-0 ``(x, y)`` vertices."""
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], float)


def _rings(geometry: dict, source: Path) -> list[np.ndarray]:
    kind = geometry.get("type") if isinstance(geometry, dict) else None
    coords = geometry.get("coordinates") if isinstance(geometry, dict) else None
    try:
        if kind == "Polygon":
            return [np.asarray(coords[0], float)[:, :2]]
        if kind == "MultiPolygon":
            return [np.asarray(polygon[0], float)[:, :2] for polygon in coords]
    except (TypeError, IndexError, ValueError):
        raise SlideError(source, f"malformed {kind} coordinates") from None
    if kind == "GeometryCollection":
        return [ring for g in geometry.get("geometries", []) for ring in _rings(g, source)]
    return []


def read_roi(path: str | Path) -> Area:
    """Polygons of a GeoJSON file (Polygon / MultiPolygon geometries, level-0 ``x, y``).

    Accepts a FeatureCollection, a Feature, a bare geometry or a list of features (QuPath
    exports annotations as any of these). Other geometry types are ignored.

    Raises
    ------
    SlideError
        Unreadable JSON or no polygon in it.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SlideError(path, f"cannot read region GeoJSON ({exc})") from None
    items = doc if isinstance(doc, list) else [doc]
    rings: list[np.ndarray] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "FeatureCollection":
            features = item.get("features", [])
        elif item.get("type") == "Feature":
            features = [item]
        else:
            features = [{"geometry": item}]
        for feature in features:
            if isinstance(feature, dict):
                rings.extend(_rings(feature.get("geometry") or {}, path))
    rings = [r for r in rings if len(r) >= 3 and np.isfinite(r).all()]
    if not rings:
        raise SlideError(path, "no Polygon or MultiPolygon with 3 or more vertices in it")
    return Area(rings)


def check_inside(area: Area, slide_shape: tuple[int, int], source: str | Path) -> None:
    """Raise when no polygon of ``area`` overlaps the slide's level-0 extent."""
    if area.polygons is None:
        return
    height, width = slide_shape
    for poly in area.polygons:
        if poly[:, 0].max() > 0 and poly[:, 0].min() < width and \
                poly[:, 1].max() > 0 and poly[:, 1].min() < height:
            return
    xs = np.concatenate([p[:, 0] for p in area.polygons])
    ys = np.concatenate([p[:, 1] for p in area.polygons])
    raise SlideError(source, f"region (x {xs.min():.0f}..{xs.max():.0f}, y {ys.min():.0f}.."
                             f"{ys.max():.0f}) lies outside the slide ({width} x {height} pixels)")


def plan_regions(
    shape: tuple[int, int],
    region_size: int,
    include: np.ndarray | None = None,
    include_downsample: float = 1.0,
) -> tuple[list[Region], int]:
    """Cut a processing-resolution image into core squares and keep those to segment.

    Parameters
    ----------
    shape : (height, width)
        Processing-resolution size of the slide.
    region_size : int
        Core side in pixels.
    include : (h, w) bool array, optional
        Where to segment (tissue and/or a user area) at a low resolution; None = everywhere.
    include_downsample : float
        Processing-resolution pixels per ``include`` pixel.

    Returns
    -------
    (regions kept, number of regions in the full grid)
    """
    region_size = int(region_size)
    if region_size < 64:
        raise ValueError(f"region size must be at least 64 pixels, not {region_size}")
    height, width = shape
    n_rows = -(-height // region_size)
    n_cols = -(-width // region_size)
    regions = []
    for r in range(n_rows):
        for c in range(n_cols):
            y0, x0 = r * region_size, c * region_size
            y1, x1 = min(height, y0 + region_size), min(width, x0 + region_size)
            if include is not None:
                d = include_downsample
                my0, mx0 = int(y0 // d), int(x0 // d)
                my1, mx1 = int(np.ceil(y1 / d)), int(np.ceil(x1 / d))
                if not include[my0:my1, mx0:mx1].any():
                    continue
            regions.append(Region(r * n_cols + c, y0, x0, y1, x1))
    return regions, n_rows * n_cols
