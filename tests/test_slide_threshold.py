"""The classical baseline on a slide: one haematoxylin threshold for every region, computed
once, recorded in the job (resume reuses regions only under the same threshold)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from skimage.filters import threshold_otsu

from napari_amasam.inference.classical import (
    haematoxylin,
    haematoxylin_threshold,
    segment_classical,
)
from napari_amasam.slide.parts import PLAN_FILE
from tests.helpers import drain
from tests.slide_data import MONUSEG_MPP, monuseg_mosaic, write_pyramidal_tiff


def test_threshold_of_one_image_is_its_own_otsu():
    image, _, _ = monuseg_mosaic(1, 1)
    own = threshold_otsu(haematoxylin(image))
    assert haematoxylin_threshold([image]) == pytest.approx(own)
    np.testing.assert_array_equal(segment_classical(image, threshold=own),
                                  segment_classical(image))
    # A given threshold is used as given: a higher one keeps fewer nuclei pixels.
    assert (segment_classical(image, threshold=own * 1.3) > 0).sum() < \
        (segment_classical(image) > 0).sum()


def test_regions_of_one_slide_use_one_threshold(tmp_path):
    """Two patients' tiles side by side, two 512 px regions (one per tile, 128 px halo):
    every region is segmented with the slide's threshold, not its window's own Otsu."""
    from napari_amasam.slide.pipeline import iter_segment_slide

    image, _, _ = monuseg_mosaic(1, 2)  # 512 x 1024
    path = write_pyramidal_tiff(tmp_path / "two.tif", image, MONUSEG_MPP)
    out = tmp_path / "out"
    kwargs = dict(region_size=512, scheduler="serial", tissue=False)

    # Cancelled after the first region, then resumed: same threshold, first region reused.
    generator = iter_segment_slide(path, "classical", out, **kwargs)
    plan = next(generator)
    threshold = plan["classical_threshold"]
    assert next(generator)["done"] == 1
    generator.close()
    recorded = json.loads((out / "two.parts" / PLAN_FILE).read_text())["plan"]["job"]
    assert recorded["classical_threshold"] == threshold  # part of what the regions depend on
    records, result = drain(iter_segment_slide(path, "classical", out, **kwargs))
    assert records[0]["done"] == 1 and records[0]["classical_threshold"] == threshold
    # The samples are the two cores, i.e. the whole slide, smoothed in context: the whole
    # image's own Otsu threshold.
    assert threshold == pytest.approx(threshold_otsu(haematoxylin(image)), rel=1e-6)

    labels = tifffile.imread(result.labels_path)
    windows = {0: (0, 640), 1: (384, 1024)}  # core + 128 px halo, clipped to the slide
    interiors = {0: (0, 448), 1: (576, 1024)}  # > 64 px from the core border
    own_otsu_differs = 0
    for region, (x0, x1) in windows.items():
        window = image[:, x0:x1]
        lo, hi = interiors[region]
        got = labels[:, lo:hi] > 0
        shared = segment_classical(window, threshold=threshold)[:, lo - x0 : hi - x0] > 0
        np.testing.assert_array_equal(got, shared)
        own = segment_classical(window)[:, lo - x0 : hi - x0] > 0
        own_otsu_differs += int((own != got).sum() > 100)
        assert threshold_otsu(haematoxylin(window)) != pytest.approx(threshold, rel=0.01)
    assert own_otsu_differs >= 1  # the windows' own thresholds would have given other nuclei

    # The old behaviour (Otsu per window), kept for the benchmark's before/after figure.
    generator = iter_segment_slide(path, "classical", tmp_path / "old", slide_threshold=False,
                                   **kwargs)
    assert next(generator)["classical_threshold"] is None
    generator.close()
