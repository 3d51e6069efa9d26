"""Read images and instance labels from disk into the package's canonical arrays.

Images become ``H x W x 3 uint8`` RGB; labels become ``H x W int32`` instance maps
(0 = background, 1..N = nuclei). Every failure is a :class:`~napari_amasam.errors.DataError`
naming the file, so a folder check can collect them all and the CLI can print them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from napari_amasam.errors import DataError, os_error_problem

#: File suffixes (lower case) read as images or labels.
IMAGE_EXTENSIONS: tuple[str, ...] = (".tif", ".tiff", ".png", ".jpg", ".jpeg")

_TIFF_EXTENSIONS = (".tif", ".tiff")
_JPEG_EXTENSIONS = (".jpg", ".jpeg")

# Percentiles used to map 16-bit or float images onto 0..255 (robust to a few hot pixels).
_LOW_PERCENTILE = 1.0
_HIGH_PERCENTILE = 99.8


class BinaryLabelsWarning(UserWarning):
    """A label file holds a binary mask; it was split into connected components."""


def _os_error_in(exc: BaseException) -> OSError | None:
    """The operating-system error (with an errno) behind ``exc``, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _read_array(path: Path) -> np.ndarray:
    """Decode a file into a numpy array (tifffile for TIFF, imageio otherwise).

    Raises
    ------
    DataError
        If the file is missing, has an unsupported suffix, or cannot be decoded.
    """
    suffix = path.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise DataError(
            path, f"unsupported file type {suffix or '(none)'}; use {', '.join(IMAGE_EXTENSIONS)}"
        )
    if not path.is_file():
        raise DataError(path, "file does not exist")
    try:
        if suffix in _TIFF_EXTENSIONS:
            import tifffile

            array = tifffile.imread(path)
        else:
            import imageio.v3 as iio

            # Pillow directly: letting imageio try every plugin is slow and noisy on bad files.
            array = iio.imread(path, plugin="pillow")
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the same to the user
        os_error = _os_error_in(exc)
        if os_error is not None:
            # imageio wraps the real cause ("error initializing plugin pillow"): name it.
            raise DataError(path, f"cannot be read: {os_error_problem(os_error)}") from exc
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "can not handle" in message:
            # imageio's wording when the decoder does not recognise the bytes at all.
            message = f"not a valid {suffix[1:].upper()} file (corrupt or wrong extension)"
        raise DataError(path, f"cannot be read: {message}") from exc
    return np.asarray(array)


def _to_channels_last(array: np.ndarray, source: str) -> np.ndarray:
    """Return ``H x W x C`` (C in 1..4) from 2-D, channels-last or channel-first input."""
    array = np.asarray(array)
    # Drop leading singleton axes (e.g. a 1-page TIFF stored as 1 x H x W x 3).
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim == 3:
        if array.shape[-1] in (1, 2, 3, 4):
            return array
        if array.shape[0] in (1, 2, 3, 4):
            # Channel-first (C, H, W), as some TIFF writers store RGB.
            return np.moveaxis(array, 0, -1)
        raise DataError(source, f"image has shape {array.shape}; expected H x W x 3 (RGB)")
    raise DataError(
        source, f"image has {array.ndim} dimensions {array.shape}; expected a 2-D image"
    )


def _rescale_to_uint8(array: np.ndarray) -> np.ndarray:
    """Map a non-8-bit image onto 0..255 with joint 1st/99.8th percentiles (keeps colour balance)."""
    values = array.astype(np.float32)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(array.shape, dtype=np.uint8)
    low, high = np.percentile(finite, [_LOW_PERCENTILE, _HIGH_PERCENTILE])
    if high <= low:
        # Constant image: nothing to stretch; keep it black rather than dividing by zero.
        return np.zeros(array.shape, dtype=np.uint8)
    scaled = (np.nan_to_num(values, nan=low) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _scale_by_range(array: np.ndarray, maximum: int) -> np.ndarray:
    """``array * 255 / maximum``, rounded and clipped to uint8."""
    scaled = array.astype(np.float32) * np.float32(255.0 / maximum)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def as_rgb_uint8(array: np.ndarray, source: str = "<array>",
                 bit_depth: int | None = None) -> np.ndarray:
    """Convert an in-memory image (e.g. a napari layer's data) to ``H x W x 3 uint8`` RGB.

    Parameters
    ----------
    array : ndarray
        ``H x W`` grayscale, ``H x W x C`` or channel-first ``C x H x W`` with C in 1..4
        (2 = grayscale + alpha, 4 = RGBA; alpha is dropped). Any dtype: ``uint8`` is kept,
        ``bool`` becomes 0/255, integers already within 0..255 are cast, colour images of
        wider unsigned integers (16-bit RGB scans) are divided by their type's range (so
        H&E colours keep their balance and absolute level), other integers and floats are
        stretched between their 1st and 99.8th percentiles (all channels jointly).
    source : str
        Name used in error messages (a file path or layer name).
    bit_depth : int, optional
        Declared bit depth of integer data (e.g. 12 for a 12-bit camera stored in uint16):
        values are divided by ``2**bit_depth - 1`` instead.

    Returns
    -------
    ndarray
        ``H x W x 3`` uint8.

    Raises
    ------
    DataError
        If the array is not a single 2-D image.
    """
    array = _to_channels_last(np.asarray(array), source)
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise DataError(source, f"image is empty (shape {array.shape})")
    n_channels = array.shape[-1]
    if n_channels in (1, 2):
        array = np.repeat(array[:, :, :1], 3, axis=2)
    elif n_channels == 4:
        array = array[:, :, :3]

    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if bit_depth is not None and np.issubdtype(array.dtype, np.integer):
        if not 1 <= int(bit_depth) <= 32:
            raise DataError(source, f"bit depth {bit_depth} is not between 1 and 32")
        return _scale_by_range(array, 2 ** int(bit_depth) - 1)
    if np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= 255:
        # An 8-bit image stored in a wider integer type: keep its values as they are.
        return array.astype(np.uint8)
    if n_channels >= 3 and np.issubdtype(array.dtype, np.unsignedinteger):
        # Colour: a percentile stretch would shift the stain colours (issue 15, item 3).
        return _scale_by_range(array, np.iinfo(array.dtype).max)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(source, f"image has unsupported data type {array.dtype}")
    return _rescale_to_uint8(array)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB.

    Parameters
    ----------
    path : str or Path
        A ``.tif``, ``.tiff``, ``.png``, ``.jpg`` or ``.jpeg`` file.

    Returns
    -------
    ndarray
        ``H x W x 3`` uint8 (see :func:`as_rgb_uint8` for the conversions applied).

    Raises
    ------
    DataError
        If the file cannot be read or is not a 2-D image.
    """
    path = Path(path)
    return as_rgb_uint8(_read_array(path), source=str(path))


def _is_binary(values: np.ndarray) -> bool:
    """True when the distinct label values are exactly {0, 1} or {0, 255}."""
    present = set(values.tolist())
    return present in ({0, 1}, {0, 255})


def labels_from_array(array: np.ndarray, source: str = "<array>") -> np.ndarray:
    """Validate an in-memory label array and return an ``H x W int32`` instance map.

    Parameters
    ----------
    array : ndarray
        ``H x W`` (or ``H x W x 1`` / ``1 x H x W``) integers, bools or integral floats.
    source : str
        Name used in warnings and error messages.

    Returns
    -------
    ndarray
        ``H x W`` int32. A binary mask ({0, 1} or {0, 255}) holding more than one connected
        component is split into 8-connected components, with a :class:`BinaryLabelsWarning`.

    Raises
    ------
    DataError
        Multi-channel, negative or non-integer labels.
    """
    array = np.asarray(array)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[:, :, 0]
    if array.ndim != 2:
        raise DataError(
            source, f"labels have shape {array.shape}; expected a single-channel H x W instance map"
        )
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise DataError(source, "labels are not integers (NaN or infinite values)")
        fractional = array != np.round(array)
        if fractional.any():
            example = float(array[fractional].flat[0])
            raise DataError(source, f"labels are not integers (e.g. value {example:g})")
    elif not np.issubdtype(array.dtype, np.integer):
        raise DataError(source, f"labels have unsupported data type {array.dtype}")
    if array.size and array.min() < 0:
        raise DataError(source, f"labels contain negative values (min {array.min()})")

    # Only a handful of distinct values can make a binary mask; avoid np.unique on big maps.
    maximum = int(array.max()) if array.size else 0
    if maximum in (1, 255) and _is_binary(np.unique(array)):
        from scipy import ndimage

        components, n_components = ndimage.label(array > 0, structure=np.ones((3, 3), bool))
        if n_components > 1 or maximum == 255:
            warnings.warn(
                f"{source}: labels are a binary mask; split into {n_components} nuclei by "
                "connected components (touching nuclei stay merged)",
                BinaryLabelsWarning,
                stacklevel=3,
            )
            return components.astype(np.int32)
    if maximum > np.iinfo(np.int32).max:
        from skimage.segmentation import relabel_sequential

        array = relabel_sequential(array.astype(np.int64))[0]
    return array.astype(np.int32)


def read_labels(path: str | Path) -> np.ndarray:
    """Read an instance-label file.

    Parameters
    ----------
    path : str or Path
        A ``.tif``, ``.tiff``, ``.png``, ``.jpg`` or ``.jpeg`` file holding one integer id per
        nucleus (0 = background).

    Returns
    -------
    ndarray
        ``H x W`` int32 instance map (binary masks are split, see :func:`labels_from_array`).

    Raises
    ------
    DataError
        Unreadable file, multi-channel, negative or non-integer labels.
    """
    path = Path(path)
    if path.suffix.lower() in _JPEG_EXTENSIONS:
        warnings.warn(
            f"{path}: labels stored as JPEG are lossy; ids may be corrupted (use .tif or .png)",
            UserWarning,
            stacklevel=2,
        )
    return labels_from_array(_read_array(path), source=str(path))


def collect_images(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Expand files and folders into image paths; return (images, problems)."""
    images, problems = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                problems.append(f"{path}: no images (.tif, .png, .jpg) in this folder")
            images.extend(found)
        elif path.is_file():
            images.append(path)
        else:
            problems.append(f"{path}: no such file or folder")
    return images, problems
