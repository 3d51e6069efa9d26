"""npe2 reader: File > Open on a whole-slide image gives a lazy multiscale image layer.

Every pyramid level becomes a dask array whose 512 x 512 chunks are read from the slide
only when napari draws them, so opening is instant and panning reads just the visible
tiles of the level napari picks for the zoom. The layer is in level-0 pixel units (as
QuPath and the exported GeoJSON are); its metadata carries ``slide_path`` and ``mpp`` for
the Slide widget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LayerData = tuple[Any, dict, str]


def get_reader(path: str | list[str]):
    """Return :func:`read_slide` for slide files (vendor formats, pyramidal/large TIFF)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    from .slide.reader import is_slide_file

    return read_slide if is_slide_file(path) else None


def read_slide(path: str | list[str]) -> list[LayerData]:
    """The slide as one multiscale RGB image layer (see module doc)."""
    from .slide.reader import open_slide

    if isinstance(path, list):
        path = path[0]
    slide = open_slide(path, require_mpp=False)
    levels = [slide.level_array(level) for level in range(len(slide.level_shapes))]
    metadata = {"slide_path": str(Path(path).resolve()), "mpp": slide.mpp,
                "slide_shape": slide.shape, "backend": slide.backend}
    return [(levels if len(levels) > 1 else levels[0],
             {"name": Path(path).stem, "rgb": True, "multiscale": len(levels) > 1,
              "metadata": metadata, "contrast_limits": (0, 255)}, "image")]
