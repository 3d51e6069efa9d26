"""Metrics: method.md 4.3 cross-check table, 4.2 edge cases, invariances, real labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile
from skimage.segmentation import find_boundaries

from napari_amasam import metrics

from .helpers import MONUSEG_FULL_LABEL as MONUSEG_LABEL

s = np.s_


def _rect_map(rects: dict[int, tuple[slice, slice]]) -> np.ndarray:
    labels = np.zeros((64, 64), np.int32)
    for obj_id, sl in rects.items():
        labels[sl] = obj_id
    return labels


# method.md 4.3: (gt rectangles, prediction rectangles, expected values)
CROSS_CHECK = {
    "A_perfect": (
        {1: s[4:14, 4:14], 2: s[20:30, 20:30]},
        {1: s[4:14, 4:14], 2: s[20:30, 20:30]},
        dict(dice=1, aji=1, aji_plus=1, dice2=1, dq=1, sq=1, pq=1),
    ),
    "B_merge": (
        {1: s[10:20, 10:20], 2: s[10:20, 20:30]},
        {1: s[10:20, 10:30]},
        dict(dice=1.0, aji=0.5, aji_plus=0.333333, dice2=0.666667, dq=0, sq=0, pq=0),
    ),
    "C_split": (
        {1: s[10:20, 10:30]},
        {1: s[10:20, 10:20], 2: s[10:20, 20:30]},
        dict(dice=1.0, aji=0.333333, aji_plus=0.333333, dice2=0.666667, dq=0, sq=0, pq=0),
    ),
    "D_shift_fn_fp": (
        {1: s[0:10, 0:10], 2: s[30:40, 30:40]},
        {1: s[2:12, 0:10], 2: s[50:60, 50:60]},
        dict(dice=0.4, aji=0.25, aji_plus=0.25, dice2=0.8, dq=0.5, sq=0.666666, pq=0.333333),
    ),
    "E_low_iou": (
        {1: s[0:10, 0:10]},
        {1: s[0:10, 6:16]},
        dict(dice=0.4, aji=0.25, aji_plus=0.25, dice2=0.4, dq=0, sq=0, pq=0),
    ),
}


@pytest.mark.parametrize("case", sorted(CROSS_CHECK))
def test_cross_check_table(case):
    gt_rects, pred_rects, expected = CROSS_CHECK[case]
    gt, pred = _rect_map(gt_rects), _rect_map(pred_rects)
    result = metrics.evaluate_pair(gt, pred)
    # The table is printed to 6 decimals (HoVer-Net's SQ eps makes 2/3 print as 0.666666).
    for name, value in expected.items():
        assert round(result[name], 6) == pytest.approx(value, abs=1e-6), name
    # The standalone functions agree with evaluate_pair.
    assert metrics.dice(gt, pred) == pytest.approx(result["dice"], abs=1e-12)
    assert metrics.aji(gt, pred) == pytest.approx(result["aji"], abs=1e-12)
    assert metrics.aji_plus(gt, pred) == pytest.approx(result["aji_plus"], abs=1e-12)
    assert metrics.dice2(gt, pred) == pytest.approx(result["dice2"], abs=1e-12)
    panoptic = metrics.pq(gt, pred)
    for name in ("dq", "sq", "pq"):
        assert panoptic[name] == pytest.approx(result[name], abs=1e-12)


def test_cross_check_sq_epsilon_and_merge_ordering():
    # Case A: SQ = 2 / (2 + 1e-6) exactly; case B: AJI punishes merges less than AJI+.
    gt, pred, _ = CROSS_CHECK["A_perfect"]
    assert metrics.pq(_rect_map(gt), _rect_map(pred))["sq"] == pytest.approx(2 / (2 + 1e-6), abs=1e-12)
    gt, pred, _ = CROSS_CHECK["B_merge"]
    assert metrics.aji(_rect_map(gt), _rect_map(pred)) > metrics.aji_plus(_rect_map(gt), _rect_map(pred))


def test_results_are_plain_floats():
    gt, pred, _ = CROSS_CHECK["D_shift_fn_fp"]
    result = metrics.evaluate_pair(_rect_map(gt), _rect_map(pred))
    assert set(result) == {"dice", "aji", "aji_plus", "dice2", "dq", "sq", "pq", "f1"}
    assert all(type(v) is float for v in result.values())


# ----------------------------------------------------------------------------- 4.2 edge cases


def test_gt_non_empty_prediction_empty_is_all_zero():
    gt = _rect_map({1: s[4:14, 4:14], 2: s[20:30, 20:30]})
    result = metrics.evaluate_pair(gt, np.zeros_like(gt))
    assert all(v == 0.0 for v in result.values()), result


def test_gt_empty_prediction_non_empty_is_all_zero():
    pred = _rect_map({1: s[4:14, 4:14]})
    result = metrics.evaluate_pair(np.zeros_like(pred), pred)
    assert all(v == 0.0 for v in result.values()), result


def test_both_empty_is_all_nan():
    empty = np.zeros((32, 32), np.int32)
    result = metrics.evaluate_pair(empty, empty)
    assert all(math.isnan(v) for v in result.values()), result
    assert math.isnan(metrics.dice(empty, empty))
    assert math.isnan(metrics.detection_f1(empty, empty))


def test_nothing_overlaps_is_zero_except_f1_by_centroids():
    gt = _rect_map({1: s[10:20, 10:20]})
    touching = _rect_map({1: s[10:20, 20:30]})  # centroids 10 px apart: within 12 px
    far = _rect_map({1: s[40:50, 40:50]})
    near_result = metrics.evaluate_pair(gt, touching)
    far_result = metrics.evaluate_pair(gt, far)
    for result in (near_result, far_result):
        for name in ("dice", "aji", "aji_plus", "dice2", "dq", "sq", "pq"):
            assert result[name] == 0.0, name
    assert near_result["f1"] == 1.0
    assert far_result["f1"] == 0.0


# ----------------------------------------------------------------------------- parameters


def test_pq_below_half_pairs_by_hungarian_then_thresholds():
    gt, pred = _rect_map({1: s[0:10, 0:10]}), _rect_map({1: s[0:10, 6:16]})  # IoU 0.25
    low = metrics.pq(gt, pred, match_iou=0.2)
    assert low["dq"] == 1.0 and low["sq"] == pytest.approx(0.25, abs=1e-5)
    assert metrics.pq(gt, pred, match_iou=0.25)["dq"] == 0.0  # strictly greater
    # One GT overlapping two predictions: the one-to-one assignment keeps only the better.
    gt2 = _rect_map({1: s[0:10, 0:20]})
    pred2 = _rect_map({1: s[0:10, 0:12], 2: s[0:10, 12:20]})
    res = metrics.pq(gt2, pred2, match_iou=0.3)
    assert res["dq"] == pytest.approx(1 / 1.5)  # TP 1, FP 1
    assert res["sq"] == pytest.approx(0.6, abs=1e-5)


def test_match_instances_gives_pq_true_positives_in_original_ids():
    gt = _rect_map({5: s[0:10, 0:10], 9: s[20:30, 20:30], 40: s[40:50, 40:50]})
    pred = _rect_map({3: s[0:10, 1:10], 70: s[20:30, 26:36], 8: s[50:60, 0:10]})  # IoU 0.9, 0.25
    gt_ids, pred_ids = metrics.match_instances(gt, pred)
    assert gt_ids.tolist() == [5] and pred_ids.tolist() == [3] and gt_ids.dtype == np.int64
    assert metrics.pq(gt, pred)["dq"] == pytest.approx(1 / (1 + 0.5 * 2 + 0.5 * 2))
    # Below 0.5 the one-to-one assignment decides, as in pq().
    gt_ids, pred_ids = metrics.match_instances(gt, pred, match_iou=0.2)
    assert sorted(zip(gt_ids.tolist(), pred_ids.tolist(), strict=True)) == [(5, 3), (9, 70)]
    gt2 = _rect_map({1: s[0:10, 0:20]})
    pred2 = _rect_map({1: s[0:10, 0:12], 2: s[0:10, 12:20]})
    assert [a.tolist() for a in metrics.match_instances(gt2, pred2, match_iou=0.3)] == [[1], [1]]
    with pytest.raises(ValueError, match="match_iou"):
        metrics.match_instances(gt, pred, match_iou=1.0)


def test_detection_f1_radius_is_a_parameter():
    gt = _rect_map({1: s[10:20, 10:20], 2: s[40:50, 40:50]})
    shifted = np.roll(gt, 5, axis=1)
    assert metrics.detection_f1(gt, shifted, radius=12.0) == 1.0
    assert metrics.detection_f1(gt, shifted, radius=4.0) == 0.0
    assert metrics.evaluate_pair(gt, shifted, f1_radius=4.0)["f1"] == 0.0


def test_detection_f1_counts_fp_and_fn():
    gt = _rect_map({1: s[0:6, 0:6], 2: s[20:26, 20:26], 3: s[40:46, 40:46]})
    pred = _rect_map({1: s[0:6, 1:7], 2: s[50:56, 0:6]})  # 1 TP, 1 FP, 2 FN
    assert metrics.detection_f1(gt, pred) == pytest.approx(2 / (2 + 1 + 2))


# ----------------------------------------------------------------------------- invariances, errors


@pytest.fixture(scope="module")
def real_gt() -> np.ndarray:
    return tifffile.imread(MONUSEG_LABEL).astype(np.int32)


def test_ids_permutation_and_gaps_do_not_change_scores(real_gt):
    rng = np.random.default_rng(0)
    pred = real_gt.copy()
    pred[find_boundaries(real_gt, mode="inner")] = 0
    pred = np.roll(pred, 2, axis=0)
    base = metrics.evaluate_pair(real_gt, pred)
    n = int(real_gt.max())
    perm = np.concatenate([[0], rng.permutation(n) * 7 + 1000])  # shuffled, non-contiguous
    shuffled = metrics.evaluate_pair(perm[real_gt], perm[pred])
    for name, value in base.items():
        assert shuffled[name] == pytest.approx(value, abs=1e-12), name


def test_real_label_against_itself_and_eroded(real_gt):
    same = metrics.evaluate_pair(real_gt, real_gt)
    for name in ("dice", "aji", "aji_plus", "dice2", "dq", "f1"):
        assert same[name] == 1.0, name
    assert same["pq"] == pytest.approx(1.0, abs=1e-6)
    eroded = real_gt.copy()
    eroded[find_boundaries(real_gt, mode="inner")] = 0
    worse = metrics.evaluate_pair(real_gt, eroded)
    for name in ("dice", "aji", "aji_plus", "dice2", "sq", "pq"):
        assert 0.3 < worse[name] < 1.0, (name, worse[name])
    assert worse["f1"] > 0.95  # centroids barely move


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(10, 10\).*\(10, 12\)"):
        metrics.evaluate_pair(np.zeros((10, 10), int), np.zeros((10, 12), int))


def test_float_and_negative_maps_are_rejected():
    with pytest.raises(ValueError, match="integer"):
        metrics.dice(np.zeros((4, 4), float), np.zeros((4, 4), int))
    with pytest.raises(ValueError, match="negative"):
        metrics.aji(np.full((4, 4), -1), np.zeros((4, 4), int))


def test_relabel_contiguous_keeps_order_and_handles_huge_ids():
    labels = np.array([[0, 5, 5], [900_000_000, 0, 7]], np.int64)
    relabelled, n = metrics.relabel_contiguous(labels)
    assert n == 3
    np.testing.assert_array_equal(relabelled, [[0, 1, 1], [3, 0, 2]])


# ----------------------------------------------------------------------------- dataset level


def test_summarize_skips_nan_and_counts_them():
    per_image = {
        "a": {"dice": 0.8, "aji": 0.5},
        "b": {"dice": 0.6, "aji": 0.7},
        "empty": {"dice": math.nan, "aji": math.nan},
    }
    summary = metrics.summarize(per_image)
    assert summary["n_images"] == 3
    assert summary["n_skipped"] == 1
    assert summary["n_skipped_per_metric"] == {"dice": 1, "aji": 1}
    assert summary["mean"]["dice"] == pytest.approx(0.7)
    assert summary["mean"]["aji"] == pytest.approx(0.6)
    all_nan = metrics.summarize({"x": {"dice": math.nan}})
    assert math.isnan(all_nan["mean"]["dice"]) and all_nan["n_skipped"] == 1


def test_aggregated_aji_pools_intersections_and_unions():
    b_gt, b_pred, _ = CROSS_CHECK["B_merge"]  # C = 200, U = 400
    d_gt, d_pred, _ = CROSS_CHECK["D_shift_fn_fp"]  # C = 80, U = 320
    empty = np.zeros((64, 64), np.int32)
    pairs = [
        (_rect_map(b_gt), _rect_map(b_pred)),
        (_rect_map(d_gt), _rect_map(d_pred)),
        (empty, empty),
    ]
    assert metrics.aggregated_aji(pairs) == pytest.approx(280 / 720)
    assert math.isnan(metrics.aggregated_aji([(empty, empty)]))
