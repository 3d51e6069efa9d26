"""Tile grid, blending window and a memory-bounded stitcher for whole-image inference.

An image of any size is cut into square tiles of the network's input size that overlap by
``overlap`` pixels; the last row and column of tiles are shifted back so they end exactly at
the image edge (no tile hangs over it unless the image is smaller than one tile, in which
case the single tile is padded). Per-tile maps are blended with a separable raised-cosine
window, so seams are smooth and every pixel's value is a weighted mean of the tiles that
cover it.

Memory: :class:`TileStitcher` holds only the output maps ``(C, H, W) float32``; tiles are
added as soon as they are computed (a caller holds at most one batch of tile outputs), and
the normaliser is the outer product of two 1-D weight sums (the window is separable and the
grid is a product grid), so no ``H x W`` weight image is ever allocated.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..config import ConfigError


@dataclass(frozen=True)
class Tile:
    """One tile of a grid.

    Attributes
    ----------
    row, col : int
        Position of the tile in the grid (row-major order).
    y, x : int
        Top-left corner of the tile in the image.
    height, width : int
        Extent of the tile that lies inside the image: ``tile`` except when the image is
        smaller than one tile along that axis (the rest of the tile is padding).
    size : int
        Side of the (square) network input the tile is padded to.
    """

    row: int
    col: int
    y: int
    x: int
    height: int
    width: int
    size: int

    @property
    def image_slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices of the image covered by this tile."""
        return slice(self.y, self.y + self.height), slice(self.x, self.x + self.width)


def _validate(tile: int, overlap: int) -> None:
    if int(tile) != tile or tile < 1:
        raise ConfigError(f"tile size must be a positive integer, not {tile!r}")
    if int(overlap) != overlap or overlap < 0:
        raise ConfigError(f"tile overlap must be a non-negative integer, not {overlap!r}")
    if overlap >= tile:
        raise ConfigError(f"tile overlap ({overlap}) must be smaller than the tile size ({tile})")


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the tiles along one axis.

    Parameters
    ----------
    length : int
        Image extent along the axis (pixels).
    tile, overlap : int
        Tile side and minimum overlap between neighbouring tiles.

    Returns
    -------
    list of int
        Increasing offsets; the last one is ``length - tile`` (edge-aligned) when the image
        is longer than a tile, else the single offset 0.
    """
    _validate(tile, overlap)
    if length < 1:
        raise ConfigError(f"image extent must be positive, not {length}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    # The last tile is aligned to the edge; its overlap with the previous one may exceed
    # ``overlap`` but is never smaller.
    starts.append(length - tile)
    return starts


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """Cover an ``height x width`` image with overlapping square tiles.

    Parameters
    ----------
    height, width : int
        Image size in pixels.
    tile : int
        Tile side (the network input size).
    overlap : int
        Minimum overlap between neighbouring tiles, ``0 <= overlap < tile``.

    Returns
    -------
    list of Tile
        Row-major. Tiles are ``tile x tile`` inside the image when the image is at least
        that large along an axis; otherwise they span the whole axis and are padded.
    """
    ys = axis_starts(height, tile, overlap)
    xs = axis_starts(width, tile, overlap)
    tile_h = min(tile, height)
    tile_w = min(tile, width)
    return [
        Tile(row=r, col=c, y=y, x=x, height=tile_h, width=tile_w, size=tile)
        for r, y in enumerate(ys)
        for c, x in enumerate(xs)
    ]


def ramp_1d(tile: int, overlap: int) -> np.ndarray:
    """Separable factor of :func:`blend_window`: ``(tile,) float32`` in ``(0, 1]``.

    A raised-cosine ramp over the first and last ``overlap`` pixels, sampled at pixel
    centres so it is never exactly 0 (pixels at the image border, covered by one tile only,
    keep a positive weight and normalise to that tile's value).
    """
    _validate(tile, overlap)
    ramp = np.ones(tile, dtype=np.float64)
    if overlap > 0:
        t = (np.arange(overlap) + 0.5) / overlap
        rise = 0.5 - 0.5 * np.cos(np.pi * t)
        ramp[:overlap] = rise
        ramp[tile - overlap :] = np.minimum(ramp[tile - overlap :], rise[::-1])
    return ramp.astype(np.float32)


def blend_window(tile: int, overlap: int) -> np.ndarray:
    """Blending weights of one tile.

    Parameters
    ----------
    tile : int
        Tile side.
    overlap : int
        Width of the ramp at each edge.

    Returns
    -------
    ndarray
        ``(tile, tile) float32``, the outer product of :func:`ramp_1d` with itself; 1 in the
        interior, falling smoothly (but never to 0) towards the edges.
    """
    ramp = ramp_1d(tile, overlap)
    return np.outer(ramp, ramp)


class TileStitcher:
    """Accumulate weighted per-tile maps into full-image maps and normalise them.

    Parameters
    ----------
    channels, height, width : int
        Shape ``(C, H, W)`` of the output maps.
    tile, overlap : int
        Grid parameters (the same as passed to :func:`tile_grid`).

    Notes
    -----
    Holds one ``(C, H, W) float32`` accumulator and two 1-D weight profiles. Call
    :meth:`add` for every tile of ``tile_grid(height, width, tile, overlap)`` exactly once,
    then :meth:`result`.
    """

    def __init__(self, channels: int, height: int, width: int, tile: int, overlap: int):
        self.tiles = tile_grid(height, width, tile, overlap)
        self.shape = (int(channels), int(height), int(width))
        self._ramp = ramp_1d(tile, overlap).astype(np.float64)
        self._accumulator = np.zeros(self.shape, dtype=np.float32)
        # Sum of weights is separable: sum_r sum_c wy_r(y) wx_c(x) = Wy(y) * Wx(x).
        self._weight_y = self._axis_weight(height, (t.y for t in self.tiles if t.col == 0))
        self._weight_x = self._axis_weight(width, (t.x for t in self.tiles if t.row == 0))
        self._added: set[tuple[int, int]] = set()
        self._finished = False

    def _axis_weight(self, length: int, starts: Iterator[int]) -> np.ndarray:
        weight = np.zeros(length, dtype=np.float64)
        for start in starts:
            end = min(start + len(self._ramp), length)
            weight[start:end] += self._ramp[: end - start]
        return weight

    def add(self, tile: Tile, maps: np.ndarray) -> None:
        """Add one tile's maps.

        Parameters
        ----------
        tile : Tile
            A tile of this stitcher's grid.
        maps : ndarray
            ``(C, S, S)`` with ``S = tile.size`` (the padded network output); the padding
            beyond ``tile.height x tile.width`` is ignored.
        """
        if self._finished:
            raise RuntimeError("TileStitcher.result() was already called")
        channels = self.shape[0]
        if maps.ndim != 3 or maps.shape[0] != channels or maps.shape[1:] != (tile.size, tile.size):
            raise ValueError(
                f"tile maps have shape {maps.shape}; expected ({channels}, {tile.size}, {tile.size})"
            )
        key = (tile.row, tile.col)
        if key in self._added:
            raise ValueError(f"tile {key} was added twice")
        self._added.add(key)
        h, w = tile.height, tile.width
        window = np.outer(self._ramp[:h], self._ramp[:w]).astype(np.float32)
        rows, cols = tile.image_slices
        self._accumulator[:, rows, cols] += maps[:, :h, :w] * window

    @property
    def complete(self) -> bool:
        return len(self._added) == len(self.tiles)

    def result(self, rows_per_chunk: int = 256) -> np.ndarray:
        """Normalise in place and return the ``(C, H, W) float32`` maps.

        Raises
        ------
        RuntimeError
            If some tiles of the grid were never added.
        """
        if not self._finished:
            if not self.complete:
                missing = len(self.tiles) - len(self._added)
                raise RuntimeError(f"{missing} of {len(self.tiles)} tiles were never added")
            inverse_x = (1.0 / self._weight_x).astype(np.float32)
            # Chunks of rows keep the temporary normaliser small on huge images.
            for start in range(0, self.shape[1], rows_per_chunk):
                stop = min(start + rows_per_chunk, self.shape[1])
                inverse = np.outer(1.0 / self._weight_y[start:stop], inverse_x).astype(np.float32)
                self._accumulator[:, start:stop] *= inverse
            self._finished = True
        return self._accumulator
