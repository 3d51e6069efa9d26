"""Blocked post-processing (instances_from_maps_tiled) against the whole-image result."""

from __future__ import annotations

import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from napari_amasam.config import PostprocessConfig
from napari_amasam.data.targets import instance_targets
from napari_amasam.inference import postprocess as pp
from napari_amasam.inference import predictor as predictor_module
from napari_amasam.inference.postprocess import instances_from_maps, instances_from_maps_tiled
from napari_amasam.inference.predictor import Maps, Predictor
from tests.helpers import MONUSEG_FULL_LABEL

# Small blocks so a 1000 x 1000 image has 16 blocks and many nuclei on block borders.
BLOCK = 256


@pytest.fixture(scope="module")
def maps() -> np.ndarray:
    """(3, 1000, 1000) float32 ideal maps (fg, cdist, bdist) of a real MoNuSeg label."""
    labels = tifffile.imread(MONUSEG_FULL_LABEL).astype(np.int32)
    return instance_targets(labels)


def _best_iou(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """For each object 1..N of ``reference``, the largest IoU with any object of ``other``.

    Parameters
    ----------
    reference, other : (H, W) int arrays with sequential ids

    Returns
    -------
    (N,) float array
    """
    n, m = int(reference.max()), int(other.max())
    pairs = reference.astype(np.int64) * (m + 1) + other
    overlap = np.bincount(pairs.ravel(), minlength=(n + 1) * (m + 1)).reshape(n + 1, m + 1)
    area_ref, area_other = overlap.sum(1), overlap.sum(0)
    iou = overlap / (area_ref[:, None] + area_other[None, :] - overlap)
    return iou[1:, 1:].max(axis=1)


def _crossing_ids(labels: np.ndarray, block: int) -> np.ndarray:
    """Ids of objects whose bounding box spans a block border (row or column)."""
    ids = []
    for obj_id, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        # A border at b (a multiple of block) is crossed when the box holds b - 1 and b.
        if any((s.start // block) != ((s.stop - 1) // block) for s in box):
            ids.append(obj_id)
    return np.asarray(ids, int)


def _compare(whole: np.ndarray, tiled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU of each whole-image object's best tiled match, and of each crossing tiled object's."""
    assert whole.max() > 100  # a real, crowded image
    assert abs(int(tiled.max()) - int(whole.max())) <= 0.01 * whole.max()
    crossing = _crossing_ids(tiled, BLOCK)
    assert len(crossing) > 20  # the block borders do cut through many nuclei
    return _best_iou(whole, tiled), _best_iou(tiled, whole)[crossing - 1]


def test_distance_method_matches_whole_image(maps):
    whole = instances_from_maps(maps[0], maps[1], maps[2])
    tiled = instances_from_maps_tiled(maps[0], maps[1], maps[2], block=BLOCK)
    per_object, crossing = _compare(whole, tiled)
    assert per_object.min() > 0.95
    # Objects spanning block borders were owned by one block and pasted whole.
    assert crossing.min() > 0.95


def test_edt_method_matches_whole_image(maps):
    whole = instances_from_maps(maps[0])
    tiled = instances_from_maps_tiled(maps[0], None, None, block=BLOCK)
    per_object, crossing = _compare(whole, tiled)
    # skimage's watershed breaks ties between equal heap values in an order that depends on
    # the rest of the image, so on the plateaus of an ideal EDT a rare pair of touching
    # nuclei can split differently in a window than in the whole image (seen on 3 of 30
    # MoNuSeg images, never over 4 nuclei); hence a 99% criterion here, not all.
    assert np.mean(per_object > 0.95) >= 0.99
    assert np.mean(crossing > 0.95) >= 0.99
    assert per_object.min() > 0.5


def test_sequential_int32_and_empty():
    fg = np.zeros((600, 700), np.float32)
    empty = instances_from_maps_tiled(fg, fg, fg, block=BLOCK)
    assert empty.dtype == np.int32 and empty.shape == fg.shape and not empty.any()
    assert not instances_from_maps_tiled(fg, block=BLOCK).any()

    # Discs on a grid, several per block; halo 0 cuts some at the borders, whose pieces
    # are still numbered without gaps.
    rows, cols = np.indices(fg.shape)
    fg = (np.hypot((rows % 50) - 25, (cols % 50) - 25) < 15).astype(np.float32)
    for halo in (None, 0):
        labels = instances_from_maps_tiled(fg, block=BLOCK, halo=halo)
        assert labels.dtype == np.int32
        assert np.array_equal(np.unique(labels), np.arange(labels.max() + 1))
    assert instances_from_maps_tiled(fg, block=BLOCK).max() == 12 * 14


def test_single_block_is_the_whole_image_function(maps):
    crop = maps[:, :300, :250]
    cfg = PostprocessConfig(min_size=20)
    for method_maps in ((crop[0], crop[1], crop[2]), (crop[0], None, None)):
        expected = instances_from_maps(*method_maps, cfg, 1.3)
        got = instances_from_maps_tiled(*method_maps, cfg, 1.3, block=300)
        assert got.dtype == np.int32
        assert np.array_equal(got, expected)


def test_invalid_arguments():
    fg = np.zeros((64, 64), np.float32)
    with pytest.raises(ValueError, match="block"):
        instances_from_maps_tiled(fg, block=0)
    with pytest.raises(ValueError, match="halo"):
        instances_from_maps_tiled(fg, block=16, halo=-1)
    with pytest.raises(ValueError, match="differs"):
        instances_from_maps_tiled(fg, fg, np.zeros((64, 65), np.float32), block=16)
    with pytest.raises(ValueError, match="2-D"):
        instances_from_maps_tiled(np.zeros((2, 64, 64)), block=16)


def test_predictor_tiles_only_large_images(monkeypatch):
    calls = []

    def spy(name, function):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)

        monkeypatch.setattr(pp, name, wrapped)

    spy("instances_from_maps", pp.instances_from_maps)
    spy("instances_from_maps_tiled", pp.instances_from_maps_tiled)
    # postprocess reads only the predictor's thresholds (default and per routed task): no
    # model is needed.
    fake = SimpleNamespace(thresholds=PostprocessConfig(), task_thresholds={})
    fg = np.zeros((40, 50), np.float32)
    fg[10:20, 10:20] = 1.0
    maps_small = Maps(fg, None, None, 1.0)

    labels = Predictor.postprocess(fake, maps_small)
    assert calls == ["instances_from_maps"] and labels.max() == 1
    monkeypatch.setattr(predictor_module, "TILED_POSTPROCESS_PIXELS", 40 * 50 - 1)
    calls.clear()
    labels = Predictor.postprocess(fake, maps_small)
    assert calls[0] == "instances_from_maps_tiled" and labels.dtype == np.int32


def _traced_peak(function, *args, **kwargs) -> int:
    """Peak bytes traced (numpy buffers included) while ``function`` runs, above the start."""
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        function(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def test_tiled_peak_memory_well_below_whole(maps):
    big = [np.ascontiguousarray(np.tile(channel, (3, 3))) for channel in maps]  # 3000 x 3000
    whole = _traced_peak(instances_from_maps, *big)
    tiled = _traced_peak(instances_from_maps_tiled, *big)
    print(f"3000x3000 post-processing peak: whole {whole / 2**20:.0f} MiB, "
          f"tiled {tiled / 2**20:.0f} MiB")
    assert tiled < 0.5 * whole
