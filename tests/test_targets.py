"""Per-object foreground / centre-distance / boundary-distance targets."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_amasam.data.io import read_labels
from napari_amasam.data.targets import instance_targets

from .helpers import MONUSEG_FULL_LABEL


def _disc(shape=(41, 41), centre=(20, 20), radius=12) -> np.ndarray:
    rows, cols = np.indices(shape)
    return (np.hypot(rows - centre[0], cols - centre[1]) <= radius).astype(np.int32)


def _border(mask: np.ndarray) -> np.ndarray:
    """Object pixels with a 4-neighbour outside the object (image edge counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def test_disc_centre_zero_border_one():
    labels = _disc()
    targets = instance_targets(labels)
    assert targets.shape == (3, 41, 41) and targets.dtype == np.float32
    fg, centre, boundary = targets
    np.testing.assert_array_equal(fg, labels > 0)
    # Centre distance: 0 at the centroid, 1 at the farthest pixel, growing outwards.
    assert centre[20, 20] == 0.0
    assert centre[labels > 0].max() == pytest.approx(1.0)
    assert centre[20, 20 + 6] == pytest.approx(0.5, abs=0.02)
    border = _border(labels > 0)
    assert centre[border].min() > 0.85
    # Boundary distance: 0 at the deepest pixel (the centre), exactly 1 on the border.
    assert boundary[20, 20] == 0.0
    np.testing.assert_allclose(
        boundary[border & (ndimage.distance_transform_edt(labels) == 1)], 1.0
    )
    assert boundary[border].min() > 0.9


def test_values_in_range_and_background_zero():
    rng = np.random.default_rng(3)
    labels = np.zeros((80, 80), np.int32)
    for i in range(1, 25):
        r, c = rng.integers(0, 72, 2)
        h, w = rng.integers(1, 9, 2)
        labels[r : r + h, c : c + w] = i  # overlaps and 1-pixel objects included
    targets = instance_targets(labels)
    assert targets.min() >= 0.0 and targets.max() <= 1.0
    assert np.all(targets[:, labels == 0] == 0)
    assert np.all(targets[0][labels > 0] == 1)


def test_touching_objects_are_handled_separately():
    left = np.zeros((30, 40), np.int32)
    left[5:25, 4:20] = 1
    right = np.zeros((30, 40), np.int32)
    right[5:25, 20:36] = 2
    together = instance_targets(left + right)
    # Each object's targets are what it gets alone: the neighbour acts as background.
    np.testing.assert_allclose(together, instance_targets(left) + instance_targets(right))
    # Pixels on both sides of the shared edge are borders of their own object.
    assert together[2, 15, 19] == 1.0 and together[2, 15, 20] == 1.0
    # One centre (value 0) per object.
    assert (together[1][left > 0] == 0).sum() == 1 and (together[1][right > 0] == 0).sum() == 1


def test_non_convex_object_centre_is_the_deepest_point():
    # A thick "C": its centroid falls in the opening, outside the object.
    labels = np.zeros((60, 60), np.int32)
    rows, cols = np.indices(labels.shape)
    radius = np.hypot(rows - 30, cols - 30)
    labels[(radius >= 12) & (radius <= 26) & ~((cols > 30) & (np.abs(rows - 30) < 9))] = 5
    r_mean, c_mean = np.argwhere(labels).mean(axis=0).round().astype(int)
    assert labels[r_mean, c_mean] == 0  # the centroid is outside: the case under test
    targets = instance_targets(labels)
    centre_pixels = np.argwhere((targets[1] == 0) & (labels > 0))
    assert len(centre_pixels) == 1
    depth = ndimage.distance_transform_edt(labels > 0)
    r, c = centre_pixels[0]
    assert depth[r, c] == depth.max()
    # ... and that pixel is also where the boundary target is 0.
    assert targets[2][r, c] == 0.0


def test_image_edge_counts_as_boundary_and_sparse_ids_work():
    labels = np.zeros((20, 20), np.int64)
    labels[:8, :8] = 10**9  # touches the image corner, huge id
    labels[12:18, 12:18] = 3
    targets = instance_targets(labels)
    assert targets[2][0, 0] == 1.0 and targets[2][0, 4] == 1.0
    assert targets[2][3, 3] < targets[2][0, 3]
    assert targets[0].sum() == 64 + 36
    assert (targets[1][labels == 3] == 0).sum() == 1


def test_empty_labels_give_zeros():
    np.testing.assert_array_equal(instance_targets(np.zeros((7, 9), np.int32)), 0)
    with pytest.raises(ValueError, match="H x W"):
        instance_targets(np.zeros((2, 7, 9), np.int32))


def test_full_monuseg_tile_has_one_centre_per_nucleus():
    # Speed on this tile: benchmarks/bench_data.py.
    labels = read_labels(MONUSEG_FULL_LABEL)
    n_objects = len(np.unique(labels)) - 1
    assert labels.shape == (1000, 1000) and n_objects > 400
    targets = instance_targets(labels)
    # One centre pixel per nucleus (non-contiguous pieces of one id share a single centre).
    assert ((targets[1] == 0) & (labels > 0)).sum() == n_objects
