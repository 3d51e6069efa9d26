"""Inference: tiling, the predictor, post-processing and the classical baseline.

Names are imported lazily so ``import napari_amasam.inference`` stays cheap (no torch or
scikit-image until something is used)::

    from napari_amasam.inference import Predictor
    labels = Predictor.from_folder("my_model").segment(image)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Predictor": "predictor",
    "Maps": "predictor",
    "SegmentResult": "predictor",
    "Tile": "tiling",
    "TileStitcher": "tiling",
    "tile_grid": "tiling",
    "blend_window": "tiling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
