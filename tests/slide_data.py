"""Slide test inputs built from bundled data: pyramidal TIFF writer and a MoNuSeg mosaic."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "resources" / "demo" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
#: MoNuSeg tiles are 40x scans, ~0.25 microns per pixel.
MONUSEG_MPP = 0.25


def pyramid_levels(image: np.ndarray, tile: int = 256, levels: int | None = None
                   ) -> list[np.ndarray]:
    """``image`` (``(H, W, 3) uint8``) and its halvings by 2x2 means, finest first."""
    pyramid = [image]
    while (levels is None and max(pyramid[-1].shape[:2]) > 2 * tile) or \
            (levels is not None and len(pyramid) < levels):
        last = pyramid[-1]
        h, w = last.shape[0] // 2 * 2, last.shape[1] // 2 * 2
        half = last[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).mean(axis=(1, 3))
        pyramid.append(np.rint(half).astype(np.uint8))
    return pyramid


def write_pyramidal_tiff(path: Path, image: np.ndarray, mpp: float | None, tile: int = 256,
                         levels: int | None = None) -> Path:
    """Tiled, zlib-compressed pyramidal (Sub-IFD) BigTIFF with resolution tags when ``mpp``.

    ``image`` is ``(H, W, 3) uint8`` (or an iterator-free array); levels halve by 2x2 means.
    """
    pyramid = pyramid_levels(image, tile, levels)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level, data in enumerate(pyramid):
            options = dict(tile=(tile, tile), compression="zlib", photometric="rgb",
                           metadata=None)
            if mpp is not None:
                options.update(resolution=(1e4 / (mpp * 2**level),) * 2,
                               resolutionunit="CENTIMETER")
            if level == 0:
                options["subifds"] = len(pyramid) - 1
            else:
                options["subfiletype"] = 1
            tif.write(data, **options)
    return path


def monuseg_tiles(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first ``n`` bundled MoNuSeg tiles (512x512) with their labels."""
    tiles = []
    for split in ("monuseg_train", "monuseg_heldout"):
        for path in sorted((DEMO_DATA / split / "images").iterdir()):
            image = iio.imread(path)[..., :3]
            labels = tifffile.imread(DEMO_DATA / split / "labels" / f"{path.stem}.tif")
            tiles.append((np.ascontiguousarray(image), labels.astype(np.int32)))
    if len(tiles) < n:
        raise ValueError(f"only {len(tiles)} bundled tiles")
    return tiles[:n]


def monuseg_mosaic(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, list]:
    """A ``rows x cols`` mosaic of real tiles, its label mosaic (ids unique) and the tiles."""
    tiles = monuseg_tiles(rows * cols)
    size = tiles[0][0].shape[0]
    image = np.zeros((rows * size, cols * size, 3), np.uint8)
    labels = np.zeros((rows * size, cols * size), np.int32)
    offset = 0
    for i, (tile_image, tile_labels) in enumerate(tiles):
        r, c = divmod(i, cols)
        window = (slice(r * size, (r + 1) * size), slice(c * size, (c + 1) * size))
        image[window] = tile_image
        labels[window] = np.where(tile_labels > 0, tile_labels + offset, 0)
        offset += int(tile_labels.max())
    return image, labels, tiles


def write_rgb_ome_zarr(path: Path, image: np.ndarray, mpp: float, tile: int = 256,
                       levels: int | None = None, axes: str = "yxc") -> Path:
    """The pyramid of :func:`write_pyramidal_tiff` as an OME-Zarr, with the project's writer.

    ``axes`` is ``"yxc"`` (interleaved, as slides store RGB) or ``"cyx"`` (NGFF's order).
    """
    from napari_amasam.slide.writers import ome_zarr_levels

    pyramid = pyramid_levels(image, tile, levels)
    if axes == "cyx":
        pyramid = [np.moveaxis(level, -1, 0) for level in pyramid]
    chunks = (tile, tile, 3) if axes == "yxc" else (3, tile, tile)
    shapes = [level.shape for level in pyramid]
    downsamples = [image.shape[0] / level.shape[axes.index("y")] for level in pyramid]
    with ome_zarr_levels(path, shapes, np.uint8, axes, mpp, chunks, "H&E slide",
                         downsamples, method="mean") as arrays:
        for array, level in zip(arrays, pyramid, strict=True):
            array[...] = level
    return path
