"""Tile grid, blending window and stitcher (napari_amasam.inference.tiling)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_amasam.config import ConfigError
from napari_amasam.inference.tiling import TileStitcher, axis_starts, blend_window, tile_grid


def _coverage(height, width, tiles):
    count = np.zeros((height, width), dtype=np.int32)
    for t in tiles:
        rows, cols = t.image_slices
        count[rows, cols] += 1
    return count


@pytest.mark.parametrize(
    "height, width, tile, overlap",
    [(300, 517, 128, 16), (256, 256, 256, 32), (1000, 1000, 256, 32), (257, 255, 256, 32), (64, 700, 64, 0)],
)
def test_grid_covers_every_pixel_with_full_tiles_aligned_to_edges(height, width, tile, overlap):
    tiles = tile_grid(height, width, tile, overlap)
    assert (_coverage(height, width, tiles) >= 1).all()
    for t in tiles:
        # Inside the image and exactly tile-sized when the image is at least a tile large.
        assert t.height == min(tile, height) and t.width == min(tile, width)
        assert 0 <= t.y and t.y + t.height <= height
        assert 0 <= t.x and t.x + t.width <= width
        assert t.size == tile
    # Row-major order, last row / column flush with the image edge.
    assert [(t.row, t.col) for t in tiles] == sorted((t.row, t.col) for t in tiles)
    assert max(t.y + t.height for t in tiles) == height
    assert max(t.x + t.width for t in tiles) == width
    ys = sorted({t.y for t in tiles})
    xs = sorted({t.x for t in tiles})
    # Neighbours overlap by at least ``overlap`` (and never leave a gap).
    for starts in (ys, xs):
        for a, b in zip(starts, starts[1:], strict=False):
            assert b - a <= tile - overlap


def test_grid_counts_for_odd_size():
    # 300 rows: starts 0, 112, 172 (last aligned); 517 cols: 0, 112, 224, 336, 389.
    assert axis_starts(300, 128, 16) == [0, 112, 172]
    assert axis_starts(517, 128, 16) == [0, 112, 224, 336, 389]
    assert len(tile_grid(300, 517, 128, 16)) == 15


def test_image_smaller_than_a_tile_gives_one_padded_tile():
    tiles = tile_grid(40, 90, 128, 16)
    assert len(tiles) == 1
    (t,) = tiles
    assert (t.y, t.x, t.height, t.width, t.size) == (0, 0, 40, 90, 128)
    # One axis small, the other large: one row of tiles spanning the short axis.
    tiles = tile_grid(50, 300, 128, 16)
    assert {t.height for t in tiles} == {50} and {t.width for t in tiles} == {128}
    assert (_coverage(50, 300, tiles) >= 1).all()


@pytest.mark.parametrize("tile, overlap", [(0, 0), (64, 64), (64, 80), (64, -1)])
def test_bad_grid_parameters_raise(tile, overlap):
    with pytest.raises(ConfigError, match="tile"):
        tile_grid(100, 100, tile, overlap)


def test_blend_window_is_smooth_positive_and_symmetric():
    window = blend_window(128, 32)
    assert window.shape == (128, 128) and window.dtype == np.float32
    assert (window > 0).all() and window.max() == pytest.approx(1.0)
    assert np.allclose(window, window.T) and np.allclose(window, window[::-1, ::-1])
    assert (window[32:96, 32:96] == 1).all()
    ramp = window[64, :32]
    assert (np.diff(ramp) > 0).all() and ramp[0] < 0.01
    # Two ramps crossing over an overlap sum to one: seams of a stride grid are flat.
    assert np.allclose(window[64, 96:] + window[64, :32], 1.0, atol=1e-6)
    assert (blend_window(16, 0) == 1).all()


@pytest.mark.parametrize("height, width, tile, overlap", [(300, 517, 128, 16), (70, 50, 64, 8), (40, 30, 64, 8)])
def test_stitching_constant_maps_returns_the_constant(height, width, tile, overlap):
    stitcher = TileStitcher(2, height, width, tile, overlap)
    for t in stitcher.tiles:
        maps = np.empty((2, tile, tile), dtype=np.float32)
        maps[0], maps[1] = 3.5, -1.25
        # Padding (outside the image) holds garbage that must be ignored.
        maps[:, t.height :, :] = 1e6
        maps[:, :, t.width :] = 1e6
        stitcher.add(t, maps)
    result = stitcher.result()
    assert result.shape == (2, height, width) and result.dtype == np.float32
    assert np.allclose(result[0], 3.5, atol=1e-4) and np.allclose(result[1], -1.25, atol=1e-4)


def test_stitching_tiles_cut_from_a_map_reconstructs_it():
    rng = np.random.default_rng(0)
    height, width, tile, overlap = 300, 517, 128, 16
    truth = rng.normal(size=(1, height, width)).astype(np.float32)
    stitcher = TileStitcher(1, height, width, tile, overlap)
    for t in stitcher.tiles:
        rows, cols = t.image_slices
        stitcher.add(t, truth[:, rows, cols])
    assert np.allclose(stitcher.result(), truth, atol=1e-4)


def test_stitcher_refuses_incomplete_or_repeated_tiles():
    stitcher = TileStitcher(1, 200, 200, 128, 16)
    first = stitcher.tiles[0]
    stitcher.add(first, np.zeros((1, 128, 128), np.float32))
    with pytest.raises(ValueError, match="twice"):
        stitcher.add(first, np.zeros((1, 128, 128), np.float32))
    with pytest.raises(ValueError, match="shape"):
        stitcher.add(stitcher.tiles[1], np.zeros((2, 128, 128), np.float32))
    with pytest.raises(RuntimeError, match="never added"):
        stitcher.result()
