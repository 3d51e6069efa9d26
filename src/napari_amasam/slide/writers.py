"""Final slide outputs, streamed from the part files (never a whole label image in memory).

- :func:`write_labels_pyramid`: ``<stem>_labels.tif``, a tiled, zlib-compressed, pyramidal
  BigTIFF of uint32 instance ids at the processing resolution, with its resolution tags
  (so it opens at the right scale), readable whole by ``tifffile.imread`` and lazily by
  ``tifffile.imread(..., aszarr=True)`` (a zarr group ``"0"``, ``"1"``, ...). Levels halve
  by nearest-neighbour subsampling, so ids stay ids.
- :func:`write_labels_ome_zarr` (optional): the same levels as an OME-Zarr (NGFF 0.4),
  through :func:`ome_zarr_levels` (any multiscale image: also RGB, which slides open).
- :func:`write_geojson` : QuPath detections with polygons in level-0 slide pixels.
- :func:`write_csv` : one row per nucleus, measurements in µm and µm².

The parts are the settled ones (:mod:`.ownership`): no two claim a pixel, so every nucleus
of the GeoJSON and CSV has its pixels in the TIFF under the same id. Each writer writes a
temporary file and renames it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..export import _atomic_write
from .parts import PartCache, PartInfo, load_part, read_geometries

#: Tile side of the labels TIFF (pixels).
TILE = 256
#: Rows of tiles assembled at once (memory: width x STRIP_TILES*TILE x 4 bytes per level).
STRIP_TILES = 4

CSV_COLUMNS = ("label", "centroid_x", "centroid_y", "centroid_x_um", "centroid_y_um",
               "area_um2", "perimeter_um", "eccentricity", "mean_intensity")


def _paste_strip(strip: np.ndarray, row0: int, step: int, parts: list[PartInfo],
                 cache: PartCache) -> None:
    """Paste parts' ids (subsampled by ``step``) into rows ``row0..`` of a level strip."""
    rows_here = strip.shape[0]
    top, bottom = row0 * step, (row0 + rows_here) * step  # in level-0-of-labels pixels
    for info in parts:
        py0, px0 = info.origin
        ph, pw = info.shape
        if info.count == 0 or py0 >= bottom or py0 + ph <= top:
            continue
        labels = cache.labels(info)
        # First label row/col that falls on the subsampled grid (multiples of step).
        sy = (-py0) % step
        sx = (-px0) % step
        sub = labels[sy::step, sx::step]
        gy0 = (py0 + sy) // step - row0
        gx0 = (px0 + sx) // step
        y0, y1 = max(0, gy0), min(rows_here, gy0 + sub.shape[0])
        if y1 <= y0:
            continue
        block = sub[y0 - gy0 : y1 - gy0]
        x1 = min(strip.shape[1], gx0 + block.shape[1])
        block = block[:, : x1 - gx0]
        target = strip[y0:y1, gx0:x1]
        ids = np.where(block > 0, block + np.uint32(info.first_id), 0).astype(np.uint32)
        free = (ids > 0) & (target == 0)
        target[free] = ids[free]


def _level_strips(shape: tuple[int, int], step: int, parts: list[PartInfo]
                  ) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, strip)`` of one pyramid level, :data:`STRIP_TILES` tile rows at a time.

    Strips are ``(rows padded to TILE, width padded to TILE)`` uint32, zero outside the level.
    """
    height, width = shape
    cache = PartCache()
    strip_rows = STRIP_TILES * TILE
    padded_width = -(-width // TILE) * TILE
    for row0 in range(0, height, strip_rows):
        rows = min(strip_rows, height - row0)
        strip = np.zeros((-(-rows // TILE) * TILE, padded_width), np.uint32)
        _paste_strip(strip[:rows, :width], row0, step, parts, cache)
        yield row0, strip


def _level_tiles(shape: tuple[int, int], step: int, parts: list[PartInfo]) -> Iterator[np.ndarray]:
    """Row-major ``TILE x TILE`` uint32 tiles of one pyramid level (edge tiles zero-padded)."""
    for _, strip in _level_strips(shape, step, parts):
        for ty in range(0, strip.shape[0], TILE):
            for tx in range(0, strip.shape[1], TILE):
                yield strip[ty : ty + TILE, tx : tx + TILE]


def pyramid_shapes(shape: tuple[int, int]) -> list[tuple[int, int]]:
    """Level shapes halving until the larger side fits in one tile."""
    shapes = [tuple(shape)]
    step = 1
    while max(shapes[-1]) > TILE:
        step *= 2
        shapes.append((-(-shape[0] // step), -(-shape[1] // step)))
    return shapes


def write_labels_pyramid(path: str | Path, shape: tuple[int, int], parts: list[PartInfo],
                         mpp: float) -> Path:
    """Write the slide's labels as a pyramidal tiled BigTIFF (see module doc).

    Parameters
    ----------
    path : str or Path
    shape : (height, width)
        Processing-resolution size.
    parts : list of PartInfo
        With ``first_id`` assigned (``PartStore.infos``).
    mpp : float
        Microns per pixel of the labels (written as resolution tags, in centimetres).
    """
    import tifffile

    shapes = pyramid_shapes(shape)
    resolution = (1e4 / mpp, 1e4 / mpp)

    def write(tmp: Path) -> None:
        with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
            for level, level_shape in enumerate(shapes):
                options = dict(shape=level_shape, dtype=np.uint32, tile=(TILE, TILE),
                               compression="zlib", resolutionunit="CENTIMETER",
                               resolution=tuple(r / 2**level for r in resolution))
                if level == 0:
                    options.update(subifds=len(shapes) - 1, metadata=None,
                                   description="napari-amasam nuclei instance labels")
                else:
                    options.update(subfiletype=1, metadata=None)
                tif.write(_level_tiles(level_shape, 2**level, parts), **options)

    return _atomic_write(path, write)


@contextlib.contextmanager
def ome_zarr_levels(path: str | Path, level_shapes: list[tuple[int, ...]], dtype, axes: str,
                    mpp: float, chunks: tuple[int, ...], description: str = "",
                    downsamples: list[float] | None = None, method: str = "subsample"
                    ) -> Iterator[list]:
    """Create an OME-Zarr (NGFF 0.4) multiscale image; the caller fills its level arrays.

    Written into a temporary folder renamed to ``path`` when the ``with`` block ends without
    an error (removed otherwise), so a ``.zarr`` folder that exists is finished.

    Parameters
    ----------
    path : str or Path
        The ``.zarr`` folder (replaced if it exists).
    level_shapes : list of tuple
        Finest first, one size per axis.
    dtype : numpy dtype
    axes : str
        Axis names in array order, from ``"yxc"`` (e.g. ``"yx"``, ``"cyx"``, ``"yxc"``);
        ``y`` and ``x`` are in micrometres. NGFF 0.4 puts channels before space (``cyx``);
        ``yxc`` (interleaved RGB, as slides store it) is what slide readers, this project's
        included, also open.
    mpp : float
        Microns per level-0 pixel; level ``k`` gets ``mpp * downsamples[k]``.
    chunks : tuple of int
        Zstd-compressed chunk shape.
    downsamples : list of float, optional
        Level-0 pixels per level pixel (default ``2**k``).
    method : str
        How the levels were made (NGFF ``type``): ``"subsample"`` (ids), ``"mean"`` (pixels).

    Yields
    ------
    list of zarr arrays, one per level (zero-filled until written).
    """
    import shutil
    import tempfile

    import zarr

    path = Path(path)
    downsamples = downsamples or [2.0**k for k in range(len(level_shapes))]
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        # NGFF 0.4 sits on the Zarr v2 format, which every OME-Zarr reader opens.
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        arrays = [root.create_array(str(level), shape=shape, dtype=dtype, chunks=chunks,
                                    fill_value=0)
                  for level, shape in enumerate(level_shapes)]
        yield arrays

        def axis(name: str) -> dict:
            if name == "c":
                return {"name": "c", "type": "channel"}
            return {"name": name, "type": "space", "unit": "micrometer"}

        root.attrs["multiscales"] = [{
            "version": "0.4",
            "name": path.name.split(".")[0],
            "axes": [axis(name) for name in axes],
            "datasets": [{"path": str(level), "coordinateTransformations": [
                {"type": "scale",
                 "scale": [1.0 if name == "c" else mpp * d for name in axes]}]}
                for level, d in enumerate(downsamples)],
            "type": method,
            "metadata": {"description": description},
        }]
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_labels_ome_zarr(path: str | Path, shape: tuple[int, int], parts: list[PartInfo],
                          mpp: float) -> Path:
    """Write the slide's labels as an OME-Zarr (NGFF 0.4) multiscale image, strip by strip.

    The same levels as :func:`write_labels_pyramid` (uint32 ids, halving by subsampling),
    ``TILE``-square zstd chunks, axes ``y, x`` in micrometres (see :func:`ome_zarr_levels`).

    Parameters
    ----------
    path : str or Path
        The ``.zarr`` folder (replaced if it exists).
    shape, parts, mpp
        As :func:`write_labels_pyramid`.
    """
    shapes = pyramid_shapes(shape)
    with ome_zarr_levels(path, shapes, np.uint32, "yx", mpp, (TILE, TILE),
                         "napari-amasam nuclei instance labels") as arrays:
        for level, (array, level_shape) in enumerate(zip(arrays, shapes, strict=True)):
            for row0, strip in _level_strips(level_shape, 2**level, parts):
                rows = min(strip.shape[0], level_shape[0] - row0)
                array[row0 : row0 + rows] = strip[:rows, : level_shape[1]]
    return Path(path)


def _nuclei(parts: list[PartInfo]) -> Iterator[tuple[int, dict, dict]]:
    """(slide-wide id, measurement row dict, GeoJSON geometry) for every nucleus in order."""
    for info in parts:
        if info.count == 0:
            continue
        part = load_part(info.path)
        geometries = read_geometries(part)
        for i in range(info.count):
            row = {name: float(part[name][i]) for name in
                   ("area", "perimeter", "eccentricity", "mean_intensity", "centroid_y",
                    "centroid_x")}
            yield info.first_id + i + 1, row, geometries[i]


def _in_um(row: dict, mpp: float, downsample: float) -> dict:
    """Processing-pixel measurements -> level-0 pixel centroids and µm / µm² values."""
    # Processing pixel index i has its centre at level-0 index (i + 0.5) * d - 0.5.
    cx = (row["centroid_x"] + 0.5) * downsample - 0.5
    cy = (row["centroid_y"] + 0.5) * downsample - 0.5
    slide_mpp = mpp / downsample
    return {
        "centroid_x": cx, "centroid_y": cy,
        "centroid_x_um": cx * slide_mpp, "centroid_y_um": cy * slide_mpp,
        "area_um2": row["area"] * mpp * mpp, "perimeter_um": row["perimeter"] * mpp,
        "eccentricity": row["eccentricity"], "mean_intensity": row["mean_intensity"],
    }


def write_csv(path: str | Path, parts: list[PartInfo], mpp: float, downsample: float) -> Path:
    """Per-nucleus measurements (columns :data:`CSV_COLUMNS`; centroids also in level-0 px).

    Parameters
    ----------
    mpp : float
        Microns per processing pixel.
    downsample : float
        Level-0 pixels per processing pixel.
    """

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            for label, row, _ in _nuclei(parts):
                values = _in_um(row, mpp, downsample)
                writer.writerow([label] + ["" if math.isnan(values[c]) else f"{values[c]:.6g}"
                                           for c in CSV_COLUMNS[1:]])

    return _atomic_write(path, write)


def write_geojson(path: str | Path, parts: list[PartInfo], mpp: float, downsample: float,
                  classification: str = "Nucleus", color: tuple[int, int, int] = (255, 0, 0)
                  ) -> Path:
    """QuPath detections, one feature per nucleus, streamed feature by feature.

    Polygons (with their holes; a ``MultiPolygon`` for a nucleus in pieces) are in level-0
    slide pixels (QuPath's pixel-edge convention, see ``export``);
    ``measurements`` carry the µm values of the CSV and ``label`` the id in the labels TIFF.
    """
    import uuid

    def write(tmp: Path) -> None:
        with open(tmp, "w") as handle:
            handle.write('{"type": "FeatureCollection", "features": [')
            first = True
            for label, row, geometry in _nuclei(parts):
                values = _in_um(row, mpp, downsample)
                measurements = {
                    "Area µm^2": values["area_um2"], "Perimeter µm": values["perimeter_um"],
                    "Eccentricity": values["eccentricity"],
                }
                if not math.isnan(values["mean_intensity"]):
                    measurements["Mean intensity"] = values["mean_intensity"]
                feature = {
                    "type": "Feature", "id": str(uuid.uuid4()),
                    "geometry": geometry,
                    "properties": {
                        "objectType": "detection",
                        "classification": {"name": classification, "color": list(color)},
                        "measurements": measurements, "label": label,
                    },
                }
                handle.write(("" if first else ",\n") + json.dumps(feature, ensure_ascii=False))
                first = False
            handle.write("]}\n")

    return _atomic_write(path, write)
