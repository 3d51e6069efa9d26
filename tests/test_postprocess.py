"""Post-processing: distance-seeded watershed, EDT fallback, min size, holes, scale."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_amasam.config import PostprocessConfig
from napari_amasam.inference.postprocess import (
    edt_watershed,
    instances_from_maps,
    watershed_from_distances,
)


def _discs(shape, centres, radius) -> np.ndarray:
    """Label map of discs; where discs overlap the nearer centre wins (a straight cut)."""
    rows, cols = np.indices(shape)
    dist = np.stack([np.hypot(rows - r, cols - c) for r, c in centres])
    nearest = dist.argmin(axis=0)
    inside = dist.min(axis=0) <= radius
    return np.where(inside, nearest + 1, 0).astype(np.int32)


def _ideal_maps(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Foreground, normalised centre distance and inverted boundary distance per object.

    Local stand-in for data.targets.instance_targets (same conventions, see architecture.md).
    """
    fg = (labels > 0).astype(np.float32)
    cdist = np.zeros(labels.shape, np.float32)
    bdist = np.zeros(labels.shape, np.float32)
    rows, cols = np.indices(labels.shape)
    for obj_id in range(1, labels.max() + 1):
        mask = labels == obj_id
        if not mask.any():
            continue
        edt = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        cy, cx = ndi.center_of_mass(mask)
        if not mask[int(round(cy)), int(round(cx))]:
            cy, cx = np.unravel_index(np.argmax(edt), edt.shape)
        centre = np.hypot(rows - cy, cols - cx)
        cdist[mask] = centre[mask] / max(centre[mask].max(), 1e-6)
        bdist[mask] = (edt.max() - edt[mask]) / max(edt.max() - 1.0, 1e-6)
    return fg, np.clip(cdist, 0, 1), np.clip(bdist, 0, 1)


def _best_iou(truth_mask: np.ndarray, labels: np.ndarray) -> float:
    ids, counts = np.unique(labels[truth_mask], return_counts=True)
    counts, ids = counts[ids > 0], ids[ids > 0]
    if ids.size == 0:
        return 0.0
    best = ids[np.argmax(counts)]
    pred = labels == best
    return (truth_mask & pred).sum() / (truth_mask | pred).sum()


def _assert_sequential_int32(labels: np.ndarray, shape) -> None:
    assert labels.dtype == np.int32 and labels.shape == shape
    ids = np.unique(labels)
    np.testing.assert_array_equal(ids, np.arange(ids.size))


def test_touching_discs_split_by_distance_maps():
    truth = _discs((64, 72), [(32, 24), (32, 45)], radius=12)
    fg, cdist, bdist = _ideal_maps(truth)
    # Without the distance maps the union is a single connected component.
    assert ndi.label(fg > 0.5)[1] == 1
    labels = watershed_from_distances(fg, cdist, bdist, PostprocessConfig())
    _assert_sequential_int32(labels, truth.shape)
    assert labels.max() == 2
    for obj_id in (1, 2):
        assert _best_iou(truth == obj_id, labels) > 0.9
    # The dispatcher takes the same path when both maps are given.
    np.testing.assert_array_equal(instances_from_maps(fg, cdist, bdist, PostprocessConfig()), labels)


def test_distance_watershed_keeps_unseeded_component():
    truth = _discs((40, 40), [(20, 20)], radius=8)
    fg, _, _ = _ideal_maps(truth)
    no_seed = np.ones_like(fg)  # distances never below the thresholds
    labels = watershed_from_distances(fg, no_seed, no_seed, PostprocessConfig())
    assert labels.max() == 1
    assert _best_iou(truth == 1, labels) > 0.9


def test_edt_fallback_splits_overlapping_discs():
    truth = _discs((64, 80), [(32, 26), (32, 50)], radius=14)
    fg = (truth > 0).astype(np.float32)
    for labels in (
        instances_from_maps(fg, None, None, PostprocessConfig()),
        instances_from_maps(fg, fg, fg, PostprocessConfig(method="edt")),
        edt_watershed(fg, PostprocessConfig()),
    ):
        _assert_sequential_int32(labels, truth.shape)
        assert labels.max() == 2
        for obj_id in (1, 2):
            assert _best_iou(truth == obj_id, labels) > 0.85


@pytest.mark.parametrize("method", ["edt", "distance"])
def test_min_size_removes_specks_and_scales_with_area(method):
    cfg = PostprocessConfig(method=method, min_size=10, sigma_foreground=0.0)
    fg = np.zeros((40, 40), np.float32)
    fg[2:5, 2:5] = 1  # 9 px speck
    fg[20:24, 20:24] = 1  # 16 px object
    maps = (fg, np.zeros_like(fg), np.zeros_like(fg)) if method == "distance" else (fg, None, None)
    at_scale_1 = instances_from_maps(*maps, cfg=cfg, scale=1.0)
    assert at_scale_1.max() == 1 and at_scale_1[21, 21] == 1 and at_scale_1[3, 3] == 0
    # scale 2: min_size becomes 40 px, so the 16 px object goes as well.
    at_scale_2 = instances_from_maps(*maps, cfg=cfg, scale=2.0)
    assert at_scale_2.max() == 0


def test_scale_keeps_split_of_upsampled_discs():
    truth = _discs((64, 72), [(32, 24), (32, 45)], radius=12)
    big = np.kron(truth, np.ones((2, 2), np.int32))
    fg, cdist, bdist = _ideal_maps(big)
    for maps in ((fg, cdist, bdist), (fg, None, None)):
        labels = instances_from_maps(*maps, cfg=PostprocessConfig(), scale=2.0)
        assert labels.max() == 2


@pytest.mark.parametrize("method", ["edt", "distance"])
def test_holes_are_filled_per_object(method):
    truth = _discs((48, 48), [(24, 24)], radius=14)
    fg, cdist, bdist = _ideal_maps(truth)
    hole = np.hypot(*(np.indices(fg.shape) - 24)) <= 4
    fg[hole] = 0
    maps = (fg, cdist, bdist) if method == "distance" else (fg, None, None)
    filled = instances_from_maps(*maps, cfg=PostprocessConfig(method=method))
    assert filled.max() == 1 and (filled[hole] == 1).all()
    kept = instances_from_maps(*maps, cfg=PostprocessConfig(method=method, fill_holes=False))
    assert (kept[hole] == 0).any()


def test_hole_filling_does_not_overwrite_an_enclosed_object():
    from napari_amasam.inference.postprocess import fill_holes_per_object

    labels = np.zeros((20, 20), np.int32)
    labels[2:18, 2:18] = 1
    labels[6:14, 6:14] = 0
    labels[8:12, 8:12] = 2
    fill_holes_per_object(labels)
    assert (labels[8:12, 8:12] == 2).all()
    assert (labels[6:8, 6:14] == 1).all()


def test_empty_input_gives_zeros():
    zeros = np.zeros((30, 40), np.float32)
    for labels in (
        instances_from_maps(zeros, zeros, zeros),
        instances_from_maps(zeros),
        edt_watershed(zeros),
    ):
        assert labels.dtype == np.int32 and labels.shape == (30, 40) and labels.max() == 0


def test_bad_inputs_raise_clear_errors():
    fg = np.zeros((8, 8), np.float32)
    with pytest.raises(ValueError, match="differs"):
        watershed_from_distances(fg, np.zeros((8, 9)), fg, PostprocessConfig())
    with pytest.raises(ValueError, match="scale"):
        edt_watershed(fg, PostprocessConfig(), scale=0)
    with pytest.raises(ValueError, match="2-D"):
        edt_watershed(np.zeros((2, 8, 8)), PostprocessConfig())
