"""Classical baseline on real H&E images (MoNuSeg train, TNBC) and its input checks."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from skimage.transform import rescale

from napari_amasam import metrics
from napari_amasam.inference.classical import segment_classical

from .helpers import MONUSEG, TNBC

MONUSEG_ID = "TCGA-21-5784-01Z-00-DX1"  # 512x512 centre crop
TNBC_ID = "01_1"


def _pair(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    return iio.imread(image_path)[..., :3], tifffile.imread(label_path).astype(np.int32)


@pytest.fixture(scope="module")
def monuseg() -> tuple[np.ndarray, np.ndarray]:
    root = MONUSEG
    return _pair(root / f"images/{MONUSEG_ID}.png", root / f"labels/{MONUSEG_ID}.tif")


@pytest.fixture(scope="module")
def monuseg_result(monuseg) -> np.ndarray:
    return segment_classical(monuseg[0])


def test_real_monuseg_image_is_segmented(monuseg, monuseg_result):
    image, gt = monuseg
    labels = monuseg_result
    assert labels.shape == gt.shape and labels.dtype == np.int32
    ids = np.unique(labels)
    np.testing.assert_array_equal(ids, np.arange(ids.size))  # sequential 0..N
    scores = metrics.evaluate_pair(gt, labels)
    # Bounds sit ~0.1 below what this crop gives (Dice 0.77, AJI 0.44, PQ 0.32).
    assert scores["dice"] > 0.6, scores
    assert scores["aji"] > 0.3, scores
    assert scores["pq"] > 0.22, scores
    # Nucleus count in the right range (the GT has 110).
    assert 0.5 < labels.max() / gt.max() < 1.5


def test_scale_keeps_quality_at_half_resolution(monuseg, monuseg_result):
    image, gt = monuseg
    half = (rescale(image, 0.5, channel_axis=-1, anti_aliasing=True) * 255).round().astype(np.uint8)
    labels = segment_classical(half, scale=0.5)
    scores = metrics.evaluate_pair(gt[::2, ::2], labels, f1_radius=6.0)
    assert scores["dice"] > 0.6 and scores["aji"] > 0.3, scores
    # Same physical min size and peak distance: about the same number of nuclei.
    assert 0.8 < labels.max() / monuseg_result.max() < 1.25


def test_real_tnbc_image_is_segmented():
    image, gt = _pair(TNBC / f"images/{TNBC_ID}.png", TNBC / f"labels/{TNBC_ID}.tif")
    labels = segment_classical(image)
    scores = metrics.evaluate_pair(gt, labels)
    assert scores["dice"] > 0.6 and scores["aji"] > 0.3, scores


def test_rgba_is_accepted_and_blank_image_gives_no_nuclei(monuseg):
    crop = monuseg[0][:128, :128]
    rgba = np.concatenate([crop, np.full(crop.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    np.testing.assert_array_equal(segment_classical(rgba), segment_classical(crop))
    blank = np.full((64, 64, 3), 240, np.uint8)
    labels = segment_classical(blank)
    assert labels.dtype == np.int32 and labels.max() == 0


def test_greyscale_and_non_uint8_are_rejected(monuseg):
    image = monuseg[0][:64, :64]
    with pytest.raises(ValueError, match="RGB"):
        segment_classical(image.mean(axis=-1).astype(np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        segment_classical(image.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="scale"):
        segment_classical(image, scale=-1)
