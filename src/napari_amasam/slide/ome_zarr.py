"""OME-Zarr (NGFF) images as slides: the multiscales' levels, read lazily through zarr.

Accepted: a folder (usually ``*.zarr``) holding one NGFF multiscale image,

- NGFF 0.4 (Zarr v2, ``multiscales`` in ``.zattrs``; this project's ``--ome-zarr`` writer
  and most converters) or 0.5 (Zarr v3, ``multiscales`` under ``"ome"`` in ``zarr.json``),
  at the folder's root or as series ``0`` of a bioformats2raw layout;
- axes ``y`` and ``x``, a channel axis (named ``c`` or of type ``channel``) of 3 (RGB) or 4
  (RGBA; transparent pixels read as glass) channels, in any order (``c, y, x`` as NGFF
  orders them, or ``y, x, c``), and any other axes (``t``, ``z``) of length 1;
- ``uint8`` pixels.

The datasets are the levels, finest first; a level's downsample comes from its shape, as for
pyramidal TIFFs. Microns per pixel come from the level-0 dataset's ``scale`` (times the
multiscale's own ``scale``, if any) on ``y`` and ``x`` when their axis ``unit`` is a length
(``micrometer`` in practice). Only the chunks a read touches are loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import mpp as mpp_meta
from .reader import BACKGROUND, INSTALL_HINT, Slide, SlideError

#: Zarr group metadata files (v2, v3): a folder holding one of them is a Zarr store.
ZARR_METADATA = (".zattrs", ".zgroup", "zarr.json")


def is_zarr_folder(path: str | Path) -> bool:
    """True for a ``*.zarr`` folder or any folder with Zarr metadata at its root."""
    path = Path(path)
    if not path.is_dir():
        return False
    return path.suffix.lower() == ".zarr" or any((path / name).is_file()
                                                 for name in ZARR_METADATA)


def stamp_file(path: Path) -> Path:
    """The file whose size and time stand for the store's (the multiscales metadata).

    A folder's own time changes only when entries are added or removed; a rewritten image
    rewrites its metadata.
    """
    for name in (".zattrs", "zarr.json", "0/.zattrs", "0/zarr.json"):
        if (path / name).is_file():
            return path / name
    return path


def _scale(transforms, count: int) -> list[float]:
    """The product of the ``scale`` transforms of a list (ones when there is none)."""
    scale = [1.0] * count
    for transform in transforms or []:
        if isinstance(transform, dict) and transform.get("type") == "scale":
            values = transform.get("scale") or []
            if len(values) == count:
                scale = [a * float(b) for a, b in zip(scale, values, strict=True)]
    return scale


def _multiscale(path: Path, group):
    """(image group, its first multiscales entry) of a store, or SlideError."""
    attrs = dict(group.attrs)
    if "ome" in attrs and isinstance(attrs["ome"], dict):  # NGFF 0.5
        attrs = attrs["ome"]
    if "multiscales" not in attrs and "bioformats2raw.layout" in attrs and "0" in group:
        # bioformats2raw: series are groups 0, 1, ...; a slide is the first.
        return _multiscale(path, group["0"])
    if "plate" in attrs or "well" in attrs:
        raise SlideError(path, "an OME-Zarr plate (HCS), not one image; open one of its images")
    multiscales = attrs.get("multiscales")
    if not multiscales or not isinstance(multiscales, list):
        raise SlideError(path, "not an OME-Zarr image: no NGFF 'multiscales' in its attributes")
    return group, multiscales[0]


class OmeZarrSlide(Slide):
    """An OME-Zarr multiscale image read level by level (see module doc)."""

    backend = "ome-zarr"

    def __init__(self, path: Path, group, multiscale: dict):
        axes = multiscale.get("axes")
        datasets = multiscale.get("datasets") or []
        if not axes or not datasets:
            raise SlideError(path, "NGFF multiscales without 'axes' or 'datasets' (NGFF 0.4 or "
                                   "later is needed)")
        # NGFF 0.3 gave axes as plain names (no units).
        axes = [a if isinstance(a, dict) else {"name": str(a)} for a in axes]
        names = [str(a.get("name", "")).lower() for a in axes]
        if "y" not in names or "x" not in names:
            raise SlideError(path, f"axes {names} lack y or x")
        channel = [i for i, a in enumerate(axes)
                   if names[i] == "c" or a.get("type") == "channel"]
        levels = []
        for k, dataset in enumerate(datasets):
            key = str(dataset.get("path", ""))
            try:
                levels.append(group[key])
            except KeyError:
                raise SlideError(path, f"level {k} (dataset {key!r}) is missing") from None
            if not hasattr(levels[-1], "dtype"):
                raise SlideError(path, f"level {k} (dataset {key!r}) is a group, not an array")
            if levels[-1].ndim != len(axes):
                raise SlideError(path, f"level {k} has {levels[-1].ndim} dimensions for "
                                       f"{len(axes)} axes {names}")
        base = levels[0]
        if base.dtype != np.uint8:
            raise SlideError(path, f"pixel type {base.dtype}; a slide must be RGB uint8 "
                                   "(labels or fluorescence are not slides to segment)")
        if not channel:
            raise SlideError(path, f"no channel axis (axes {names}); a slide must be RGB")
        self._c = channel[0]
        channels = base.shape[self._c]
        if channels not in (3, 4):
            raise SlideError(path, f"{channels} channels; a slide must be RGB (3) or RGBA (4)")
        self._y, self._x = names.index("y"), names.index("x")
        for i, name in enumerate(names):
            if i not in (self._y, self._x, self._c) and base.shape[i] != 1:
                raise SlideError(path, f"axis {name} has {base.shape[i]} planes; a slide is "
                                       "one 2-D RGB image")
        self._levels = levels
        self._alpha = channels == 4
        # Other axes are read at index 0; the kept ones come out in store order.
        kept = sorted((self._y, self._x, self._c))
        self._order = [kept.index(self._y), kept.index(self._x), kept.index(self._c)]
        shapes = [(level.shape[self._y], level.shape[self._x]) for level in levels]
        for k in range(1, len(shapes)):
            if shapes[k][0] > shapes[k - 1][0] or shapes[k][1] > shapes[k - 1][1]:
                raise SlideError(path, f"level {k} {shapes[k]} is larger than level {k - 1} "
                                       f"{shapes[k - 1]}; levels must go finest first")
        base_h, base_w = shapes[0]
        downsamples = [(base_h / h + base_w / w) / 2 for h, w in shapes]
        scale = _scale(datasets[0].get("coordinateTransformations"), len(axes))
        outer = _scale(multiscale.get("coordinateTransformations"), len(axes))
        value, why = mpp_meta.mpp_from_ngff(
            axes[self._y].get("unit"), axes[self._x].get("unit"),
            scale[self._y] * outer[self._y], scale[self._x] * outer[self._x])
        super().__init__(path, shapes, downsamples, value)
        self.mpp_note = why

    def _read_level(self, level, y, x, h, w):
        index = [0] * len(self._levels[level].shape)
        index[self._y] = slice(y, y + h)
        index[self._x] = slice(x, x + w)
        index[self._c] = slice(None)
        pixels = np.asarray(self._levels[level][tuple(index)]).transpose(self._order)
        if not self._alpha:
            return pixels
        rgb = pixels[..., :3].copy()
        rgb[pixels[..., 3] == 0] = BACKGROUND  # transparent = glass, as with OpenSlide
        return rgb


def open_ome_zarr(path: Path) -> OmeZarrSlide:
    """Open an OME-Zarr folder as a slide; SlideError naming it when it is not one we read."""
    try:
        import zarr
        import zarr.errors
    except ImportError:
        raise SlideError(path, f"reading OME-Zarr needs zarr: {INSTALL_HINT}") from None
    if not is_zarr_folder(path):
        raise SlideError(path, "a folder, not a slide file or an OME-Zarr (no Zarr metadata "
                               "in it)")
    try:
        group = zarr.open_group(str(path), mode="r")
    except (zarr.errors.GroupNotFoundError, FileNotFoundError):
        raise SlideError(path, "not an OME-Zarr: no Zarr group metadata (.zgroup/.zattrs or "
                               "zarr.json) at its root") from None
    except Exception as exc:
        raise SlideError(path, f"cannot read its Zarr metadata ({type(exc).__name__}: "
                               f"{exc})".replace("\n", " ")) from None
    image, multiscale = _multiscale(path, group)
    if not isinstance(multiscale, dict):
        raise SlideError(path, "NGFF 'multiscales' entry is not an object")
    return OmeZarrSlide(path, image, multiscale)
