"""Bundled sample data: real H&E crops with ground-truth nuclei (works offline).

MoNuSeg 2018, CC BY-NC-SA 4.0 (see LICENSE.md beside this file). napari's sample-data
contract: a function returning ``[(data, kwargs, layer_type), ...]``.
"""

from __future__ import annotations

from importlib import resources

import imageio.v3 as iio
import numpy as np
import tifffile

SAMPLE_MPP = 0.25  # MoNuSeg tiles are 40x, about 0.25 um/px
CITATION = (
    "MoNuSeg 2018 (Kumar et al., IEEE TMI 2017 and 2020), CC BY-NC-SA 4.0; "
    "512x512 crop of a training tile"
)
SAMPLES = {
    "monuseg_breast": "H&E breast (MoNuSeg)",
    "monuseg_prostate": "H&E prostate (MoNuSeg)",
}


def sample_files() -> dict[str, tuple]:
    """``{stem: (image_path, labels_path)}`` of the bundled samples."""
    root = resources.files(__package__)
    return {s: (root / f"{s}.png", root / f"{s}_labels.tif") for s in SAMPLES}


def load_sample(stem: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image HxWx3 uint8, labels HxW int32)`` of one bundled sample."""
    image_path, labels_path = sample_files()[stem]
    with resources.as_file(image_path) as p:
        image = iio.imread(p)
    with resources.as_file(labels_path) as p:
        labels = tifffile.imread(p).astype(np.int32)
    return image, labels


#: Where each sample sits (row, column in pixels): side by side when both are open.
SAMPLE_OFFSETS = {"monuseg_breast": (0, 0), "monuseg_prostate": (0, 544)}


def _layers(stem: str) -> list[tuple]:
    image, labels = load_sample(stem)
    meta = {"source": CITATION, "mpp": SAMPLE_MPP, "sample": stem}
    scale = (SAMPLE_MPP, SAMPLE_MPP)
    translate = tuple(v * SAMPLE_MPP for v in SAMPLE_OFFSETS[stem])
    space = {"scale": scale, "translate": translate, "units": "um"}
    return [
        (image, {"name": stem, "rgb": True, "metadata": meta, **space}, "image"),
        (labels, {"name": f"{stem} ground truth", "metadata": meta, "opacity": 0.5, **space},
         "labels"),
    ]


def monuseg_breast() -> list[tuple]:
    return _layers("monuseg_breast")


def monuseg_prostate() -> list[tuple]:
    return _layers("monuseg_prostate")
