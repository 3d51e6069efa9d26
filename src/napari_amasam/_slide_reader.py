"""npe2 reader: File > Open on a whole-slide image gives a lazy multiscale image layer.

Slides are vendor files, pyramidal or very large TIFFs, and RGB OME-Zarr folders (an
OME-Zarr that is not an RGB uint8 image, e.g. exported labels, is left to other readers).

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
    """Return :func:`read_slide` for slides (vendor formats, pyramidal/large TIFF, OME-Zarr)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    from .slide.reader import SlideError, is_slide_file, open_slide

    if not is_slide_file(path):
        return None
    if Path(path).is_dir():
        # Claim only the Zarr folders we can show (opening reads metadata and one pixel).
        try:
            open_slide(path, require_mpp=False).close()
        except SlideError:
            return None
    return read_slide


def read_slide(path: str | list[str]) -> list[LayerData]:
    """The slide as one multiscale RGB image layer (see module doc)."""
    from .slide.reader import open_slide, slide_stem

    if isinstance(path, list):
        path = path[0]
    slide = open_slide(path, require_mpp=False)
    levels = [slide.level_array(level) for level in range(len(slide.level_shapes))]
    metadata = {"slide_path": str(Path(path).resolve()), "mpp": slide.mpp,
                "slide_shape": slide.shape, "backend": slide.backend}
    return [(levels if len(levels) > 1 else levels[0],
             {"name": slide_stem(path), "rgb": True, "multiscale": len(levels) > 1,
              "metadata": metadata, "contrast_limits": (0, 255)}, "image")]
