"""Open a whole-slide image and read regions of it at any resolution, never all of it.

Two backends behind one :class:`Slide` interface:

- :class:`OpenSlideSlide`: openslide-python (with the ``openslide-bin`` wheel, no system
  library) for the vendor formats (Aperio .svs, Hamamatsu .ndpi, 3DHistech .mrxs, Leica
  .scn, Ventana .bif, ...). Used first for every non-TIFF suffix.
- :class:`TiffSlide`: tifffile + zarr for pyramidal TIFF / OME-TIFF / BigTIFF (levels are
  the series' pyramid levels, read lazily through ``aszarr``). Used first for ``.tif`` /
  ``.tiff`` and as the fallback when OpenSlide is not installed or refuses a file
  (tifffile also reads SVS and NDPI).
- :class:`~.ome_zarr.OmeZarrSlide`: an OME-Zarr folder (NGFF multiscales), through zarr.

Coordinates are ``(row, col)`` = ``(y, x)`` like numpy; a level's pixel ``(r, c)`` covers
level-0 pixels ``[r*d, (r+1)*d) x [c*d, (c+1)*d)`` with ``d`` its downsample. Pixels
outside the slide read as white (glass).

Errors are :class:`SlideError` (a ``DataError``: ``"<file>: <problem>"`` on one line).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ..errors import DataError
from . import mpp as mpp_meta

#: Suffixes read as TIFF first (tifffile), everything else goes to OpenSlide first.
TIFF_SUFFIXES = {".tif", ".tiff", ".btf", ".tf8", ".ome.tif", ".ome.tiff"}
#: Vendor slide suffixes (OpenSlide's formats).
VENDOR_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"}
#: A TIFF without pyramid levels is handled as a slide from this many pixels on (below it,
#: the plain image path reads it whole, which is cheap).
LARGE_TIFF_PIXELS = 4096 * 4096
#: Value of pixels outside the slide or transparent in it.
BACKGROUND = 255


INSTALL_HINT = "pip install 'napari-amasam[wsi]'"


class SlideError(DataError):
    """A slide cannot be opened or read: ``"<file>: <problem>"``."""

    def __reduce__(self):
        # Rebuilt from (path, problem) when pickled back from a Dask worker.
        return (type(self), (str(self.path), self.problem))


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for double in (".ome.tif", ".ome.tiff", ".ome.zarr"):
        if name.endswith(double):
            return double
    return path.suffix.lower()


def slide_stem(path: str | Path) -> str:
    """The name without its (double) suffix: ``a.ome.zarr`` -> ``a``, ``b.svs`` -> ``b``."""
    path = Path(path)
    suffix = _suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


class Slide:
    """A multi-resolution image read region by region.

    Attributes
    ----------
    path : Path
    level_shapes : list of (height, width)
        Level 0 is the full resolution.
    downsamples : list of float
        Level-0 pixels per level pixel (1.0 for level 0), increasing.
    mpp : float or None
        Microns per level-0 pixel (metadata, or the value passed to :func:`open_slide`).
    backend : str
        ``"openslide"``, ``"tifffile"`` or ``"ome-zarr"``.
    mpp_note : str
        Why the metadata gave no mpp, when the format can say (appended to the error).
    """

    backend = ""
    mpp_note = ""

    def __init__(self, path: Path, level_shapes, downsamples, mpp: float | None):
        self.path = path
        self.level_shapes = [tuple(int(v) for v in s) for s in level_shapes]
        self.downsamples = [float(d) for d in downsamples]
        self.mpp = mpp

    # ------------------------------------------------------------------------ backend API
    def _read_level(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """``(h, w, 3) uint8`` of one level; the rectangle lies inside the level."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------- reading
    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 ``(height, width)``."""
        return self.level_shapes[0]

    def read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Read a rectangle of one level; the part outside the level is white.

        Returns
        -------
        ``(h, w, 3) uint8`` RGB.
        """
        out = np.full((h, w, 3), BACKGROUND, np.uint8)
        level_h, level_w = self.level_shapes[level]
        y0, x0 = max(0, y), max(0, x)
        y1, x1 = min(level_h, y + h), min(level_w, x + w)
        if y1 <= y0 or x1 <= x0:
            return out
        try:
            pixels = self._read_level(level, y0, x0, y1 - y0, x1 - x0)
        except SlideError:
            raise
        except Exception as exc:  # truncated or corrupt files fail here, not at open
            problem = f"cannot read pixels at level {level} ({type(exc).__name__}: {exc})"
            raise SlideError(self.path, problem.replace("\n", " ")) from None
        out[y0 - y : y1 - y, x0 - x : x1 - x] = pixels
        return out

    def best_level(self, downsample: float) -> int:
        """Coarsest level whose downsample does not exceed ``downsample`` (0.1% slack)."""
        best = 0
        for level, d in enumerate(self.downsamples):
            if d <= downsample * 1.001:
                best = level
        return best

    def read_scaled(self, y: int, x: int, h: int, w: int, downsample: float) -> np.ndarray:
        """Read a rectangle of a virtual level with any ``downsample`` (>= 1 or < 1).

        Output pixel ``(i, j)`` covers level-0 pixels ``[(y+i)*d, (y+i+1)*d)`` (and likewise
        for columns), ``d = downsample``. It is read from the coarsest level not coarser than
        ``d`` and resampled bilinearly (Gaussian anti-aliasing when shrinking); when ``d`` is
        a level's downsample the pixels are copied exactly.

        Returns
        -------
        ``(h, w, 3) uint8``.
        """
        level = self.best_level(downsample)
        ratio = downsample / self.downsamples[level]
        if abs(ratio - 1.0) < 1e-6:
            return self.read(level, y, x, h, w)
        # Level coordinates of the output pixel centres: (y + i + 0.5) * ratio - 0.5.
        first_y, first_x = (y + 0.5) * ratio - 0.5, (x + 0.5) * ratio - 0.5
        margin = 2 + int(math.ceil(2 * max(ratio, 1.0)))
        ly0, lx0 = int(math.floor(first_y)) - margin, int(math.floor(first_x)) - margin
        lh = int(math.ceil(h * ratio)) + 2 * margin + 1
        lw = int(math.ceil(w * ratio)) + 2 * margin + 1
        source = self.read(level, ly0, lx0, lh, lw).astype(np.float32)
        out = np.empty((h, w, 3), np.uint8)
        sigma = max(0.0, (ratio - 1.0) / 2.0)  # skimage's anti-aliasing convention
        for channel in range(3):
            plane = source[..., channel]
            if sigma > 0:
                plane = ndi.gaussian_filter(plane, sigma)
            resampled = ndi.affine_transform(
                plane, (ratio, ratio), offset=(first_y - ly0, first_x - lx0),
                output_shape=(h, w), order=1, mode="nearest",
            )
            out[..., channel] = np.clip(np.rint(resampled), 0, 255).astype(np.uint8)
        return out

    def scaled_shape(self, downsample: float) -> tuple[int, int]:
        """``(height, width)`` of the virtual level with ``downsample``."""
        height, width = self.shape
        return max(1, int(round(height / downsample))), max(1, int(round(width / downsample)))

    def thumbnail(self, downsample: float, source_block: int = 2048) -> np.ndarray:
        """The whole slide at ``downsample`` (a low resolution), read block by block.

        Each block reads at most about ``source_block`` squared pixels of the source level, so
        memory stays small even for a slide without a pyramid.

        Returns
        -------
        ``(H / d, W / d, 3) uint8``.
        """
        height, width = self.scaled_shape(downsample)
        ratio = downsample / self.downsamples[self.best_level(downsample)]
        step = max(16, int(source_block // max(ratio, 1.0)))
        out = np.empty((height, width, 3), np.uint8)
        for row in range(0, height, step):
            rows = min(step, height - row)
            for col in range(0, width, step):
                cols = min(step, width - col)
                out[row : row + rows, col : col + cols] = self.read_scaled(
                    row, col, rows, cols, downsample)
        return out

    def level_array(self, level: int, chunk: int = 512):
        """A lazy ``(h, w, 3) uint8`` dask array of one level (for napari)."""
        import dask.array as da

        height, width = self.level_shapes[level]

        def block(block_info=None):
            (r0, r1), (c0, c1), _ = block_info[None]["array-location"]
            return self.read(level, r0, c0, r1 - r0, c1 - c0)

        chunks = (
            tuple(min(chunk, height - r) for r in range(0, height, chunk)),
            tuple(min(chunk, width - c) for c in range(0, width, chunk)),
            (3,),
        )
        return da.map_blocks(block, chunks=chunks, dtype=np.uint8,
                             meta=np.empty((0, 0, 0), np.uint8))


class OpenSlideSlide(Slide):
    """A slide read by OpenSlide."""

    backend = "openslide"

    def __init__(self, path: Path, handle):
        self._handle = handle
        shapes = [(h, w) for (w, h) in handle.level_dimensions]
        super().__init__(path, shapes, handle.level_downsamples,
                         mpp_meta.mpp_from_openslide(handle.properties))
        self.vendor = handle.properties.get("openslide.vendor", "")

    def _read_level(self, level, y, x, h, w):
        d = self.downsamples[level]
        # read_region takes the top-left corner in level-0 pixels.
        rgba = np.asarray(self._handle.read_region((int(round(x * d)), int(round(y * d))),
                                                   level, (w, h)))
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = BACKGROUND  # transparent (outside scanned area) = glass
        return rgb

    def close(self):
        self._handle.close()


class TiffSlide(Slide):
    """A (pyramidal) TIFF read by tifffile through zarr, level by level."""

    backend = "tifffile"

    def __init__(self, path: Path, tiff):
        try:
            import zarr
        except ImportError:
            raise SlideError(path, f"reading slides needs zarr: {INSTALL_HINT}") from None

        self._tiff = tiff
        self._lock = threading.Lock()
        series = tiff.series[0]
        levels = series.levels
        axes = series.axes
        self._layout = _rgb_layout(path, axes, series.shape)
        shapes = [_yx_shape(level.shape, self._layout) for level in levels]
        base_h, base_w = shapes[0]
        downsamples = [(base_h / h + base_w / w) / 2 for h, w in shapes]
        self._store = series.aszarr()
        group = zarr.open(self._store, mode="r")
        self._levels = [group] if len(levels) == 1 else [group[str(i)] for i in range(len(levels))]
        super().__init__(path, shapes, downsamples, _tiff_mpp(tiff))

    def _read_level(self, level, y, x, h, w):
        array = self._levels[level]
        squeeze, order = self._layout
        index = (0,) * squeeze
        # One reader at a time: the store shares one file handle (napari reads in threads).
        with self._lock:
            if order == "SYX":
                pixels = np.moveaxis(np.asarray(array[index + (slice(None), slice(y, y + h),
                                                               slice(x, x + w))]), 0, -1)
            else:
                pixels = np.asarray(array[index + (slice(y, y + h), slice(x, x + w))])
        return _as_rgb(pixels, self.path)

    def close(self):
        self._store.close()
        self._tiff.close()


def _rgb_layout(path: Path, axes: str, shape) -> tuple[int, str]:
    """(number of leading length-1 axes, "YXS" / "SYX" / "YX") of a tifffile series."""
    lead = 0
    while lead < len(axes) - 2 and shape[lead] == 1 and axes[lead] not in "YX":
        lead += 1
    rest = axes[lead:].replace("C", "S")
    if rest in ("YXS", "SYX", "YX"):
        return lead, rest
    raise SlideError(path, f"unsupported TIFF layout (axes {axes}, shape {tuple(shape)}); "
                           "expected an RGB or greyscale 2-D image")


def _yx_shape(shape, layout) -> tuple[int, int]:
    lead, order = layout
    rest = tuple(shape[lead:])
    return rest[1:3] if order == "SYX" else rest[:2]


def _as_rgb(pixels: np.ndarray, path: Path) -> np.ndarray:
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    if pixels.shape[-1] == 4:
        pixels = pixels[..., :3]
    if pixels.shape[-1] != 3:
        raise SlideError(path, f"{pixels.shape[-1]} channels; expected RGB")
    if pixels.dtype != np.uint8:
        if pixels.dtype == np.uint16:
            pixels = (pixels >> 8).astype(np.uint8)
        else:
            raise SlideError(path, f"pixel type {pixels.dtype} is not supported (uint8 or uint16)")
    return pixels


def _tiff_mpp(tiff) -> float | None:
    page = tiff.pages[0]
    value = mpp_meta.mpp_from_ome(tiff.ome_metadata) if tiff.is_ome else None
    if value is None and tiff.is_svs:
        value = mpp_meta.mpp_from_aperio(page.description)
    if value is None:
        tags = page.tags
        unit = tags.get("ResolutionUnit")
        value = mpp_meta.mpp_from_tiff_resolution(
            tags["XResolution"].value if "XResolution" in tags else None,
            tags["YResolution"].value if "YResolution" in tags else None,
            int(unit.value) if unit is not None else None,
        )
    return value


@contextlib.contextmanager
def _quiet_tifffile():
    """Silence tifffile's warnings while probing: a broken file gets one error line of ours."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_tiff_complete(path: Path) -> None:
    """Raise when a TIFF-based file's image data runs past its end (a truncated copy).

    Readers open such files happily and fail (or return garbage) only when the missing
    tiles are read, possibly hours into a run; the check costs reading the tag tables.
    Files tifffile cannot parse are left to the format's reader.
    """
    import tifffile

    size = path.stat().st_size
    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tiff:
            if tiff.is_mmstack or tiff.is_ndpi:  # offsets beyond 4 GB are remapped there
                return
            pages = list(tiff.pages)
            for series in tiff.series:
                for level in series.levels:
                    pages.extend(level.pages)
            end = 0
            for page in pages:
                if page is None or not hasattr(page, "dataoffsets"):
                    continue
                for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False):
                    end = max(end, offset + count)
    except Exception as exc:
        if "not a TIFF" in str(exc) or "invalid TIFF" in str(exc):
            return
        raise SlideError(path, f"corrupt TIFF structure ({exc}); the file may be truncated") \
            from None
    if end > size:
        raise SlideError(path, f"truncated: image data runs to byte {end} but the file has "
                               f"{size} bytes")


def _open_openslide(path: Path) -> Slide | None:
    try:
        import openslide
    except ImportError:
        return None
    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        return None
    except openslide.OpenSlideError as exc:
        raise SlideError(path, f"OpenSlide cannot read it ({exc}); the file may be truncated "
                               "or corrupt") from None
    return OpenSlideSlide(path, handle)


def _open_tifffile(path: Path) -> Slide | None:
    import tifffile

    try:
        tiff = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, ValueError, EOFError, OSError, IndexError, KeyError) as exc:
        if "not a TIFF" in str(exc) or "invalid TIFF" in str(exc):
            return None
        raise SlideError(path, f"cannot read TIFF structure ({exc}); the file may be truncated "
                               "or corrupt") from None
    try:
        if not tiff.series:
            raise SlideError(path, "TIFF holds no image")
        return TiffSlide(path, tiff)
    except SlideError:
        tiff.close()
        raise
    except Exception as exc:
        tiff.close()
        raise SlideError(path, f"cannot read TIFF ({type(exc).__name__}: {exc}); the file may "
                               "be truncated or corrupt") from None


def open_slide(path: str | Path, mpp: float | None = None, require_mpp: bool = True) -> Slide:
    """Open a slide with the backend suited to its format.

    Parameters
    ----------
    path : str or Path
        A slide file, or an OME-Zarr folder.
    mpp : float, optional
        Microns per level-0 pixel; overrides the metadata.
    require_mpp : bool
        Raise when neither the metadata nor ``mpp`` gives the resolution.

    Raises
    ------
    SlideError
        Missing file, unsupported or corrupt format, no resolution.
    """
    path = Path(path)
    slide = None
    if path.is_dir():
        from .ome_zarr import open_ome_zarr

        slide = open_ome_zarr(path)
    elif not path.is_file():
        raise SlideError(path, "no such file")
    elif path.stat().st_size == 0:
        raise SlideError(path, "empty file")
    else:
        check_tiff_complete(path)
        tiff_first = _suffix(path) in TIFF_SUFFIXES
        openers = ((_open_tifffile, _open_openslide) if tiff_first
                   else (_open_openslide, _open_tifffile))
        for opener in openers:
            slide = opener(path)
            if slide is not None:
                break
    if slide is None:
        hint = ""
        try:
            import openslide  # noqa: F401
        except ImportError:
            hint = f"; OpenSlide is not installed ({INSTALL_HINT})"
        raise SlideError(path, "not a slide format OpenSlide or tifffile can read "
                               f"(suffix {path.suffix or 'none'!r}){hint}")
    try:
        if mpp is not None:
            value = float(mpp)
            if not math.isfinite(value) or value <= 0:
                raise SlideError(path, f"mpp must be a positive number, not {mpp}")
            slide.mpp = value
        if require_mpp and slide.mpp is None:
            why = f" ({slide.mpp_note})" if slide.mpp_note else ""
            raise SlideError(path, f"no microns-per-pixel in its metadata{why}; give it with "
                                   "--mpp (e.g. 0.25 at 40x, 0.5 at 20x)")
        # A first pixel read catches truncated files before any work is planned.
        level = len(slide.level_shapes) - 1
        slide.read(level, 0, 0, 1, 1)
    except BaseException:
        slide.close()
        raise
    return slide


def is_slide_file(path: str | Path) -> bool:
    """True for vendor slide suffixes, TIFFs that are pyramidal or very large, and Zarr folders.

    Small plain TIFFs stay with the ordinary image path (read whole). Any ``*.zarr`` folder
    counts, so one that is not an RGB OME-Zarr gets its problem reported in one line.
    """
    path = Path(path)
    if path.is_dir():
        from .ome_zarr import is_zarr_folder

        return is_zarr_folder(path)
    suffix = _suffix(path)
    if suffix in VENDOR_SUFFIXES:
        return True
    if suffix not in TIFF_SUFFIXES or not path.is_file():
        return False
    import tifffile

    try:
        check_tiff_complete(path)
    except SlideError:
        return True  # a broken TIFF goes where its problem is reported in one line

    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tiff:
            series = tiff.series[0]
            if len(series.levels) > 1 or tiff.is_svs or tiff.is_ndpi:
                return True
            page = tiff.pages[0]
            return bool(page.is_tiled) and page.imagelength * page.imagewidth >= LARGE_TIFF_PIXELS
    except Exception:
        return False
