"""fill_holes_per_object skips objects that cannot hold a hole; the result must equal the
plain per-object loop on every object, including the awkward cases."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from napari_amasam.inference.postprocess import fill_holes_per_object


def _every_object(labels: np.ndarray) -> np.ndarray:
    """The straightforward loop: fill each object's enclosed background, in id order."""
    labels = labels.copy()
    for obj_id, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        crop = labels[box]
        mask = crop == obj_id
        holes = ndi.binary_fill_holes(mask) & ~mask & (crop == 0)
        crop[holes] = obj_id
    return labels


def _ring(labels, value, centre, outer, inner):
    yy, xx = np.mgrid[: labels.shape[0], : labels.shape[1]]
    r2 = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2
    labels[(r2 <= outer**2) & (r2 > inner**2)] = value


def test_awkward_cases_match_the_plain_loop():
    labels = np.zeros((120, 160), np.int32)
    _ring(labels, 1, (30, 30), 20, 8)  # a ring: its hole is filled
    _ring(labels, 2, (30, 90), 22, 14)  # a ring holding another ring with its own hole
    _ring(labels, 3, (30, 90), 10, 4)
    labels[70:100, 20:40] = 4  # two halves enclosing a hole together: nobody's hole
    labels[70:100, 40:60] = 5
    labels[80:90, 35:45] = 0
    _ring(labels, 6, (90, 120), 18, 6)  # a ring whose hole holds a one-pixel object
    labels[90, 120] = 7  # a one-pixel object inside ring 6's hole
    labels[5:15, 140:150] = 9  # an object without holes; id 8 is absent
    expected = _every_object(labels)
    actual = fill_holes_per_object(labels.copy())
    assert np.array_equal(actual, expected)
    assert (expected == 1).sum() > (labels == 1).sum()  # something was filled
    assert (expected[80:90, 35:45] == 0).any()  # the shared hole stayed background


def test_random_label_maps_match_the_plain_loop():
    rng = np.random.default_rng(0)
    for _ in range(5):
        noise = ndi.gaussian_filter(rng.random((150, 150)), 3)
        mask = noise > np.quantile(noise, 0.45)
        # punch random single-pixel and small holes
        mask[rng.random(mask.shape) < 0.01] = False
        labels = ndi.label(mask)[0].astype(np.int32)
        expected = _every_object(labels)
        assert np.array_equal(fill_holes_per_object(labels.copy()), expected)


def test_no_holes_returns_labels_unchanged():
    labels = np.zeros((20, 20), np.int32)
    labels[2:6, 2:6] = 1
    labels[10:15, 3:9] = 2
    assert np.array_equal(fill_holes_per_object(labels.copy()), labels)
