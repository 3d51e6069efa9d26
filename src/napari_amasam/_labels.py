"""Instance label maps: the checks shared by everything that takes one (metrics, export) and
the dtype they are stored in."""

from __future__ import annotations

import numpy as np


def check_label_map(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """Check one instance map: 2-D, integer (or bool), no negative ids.

    Parameters
    ----------
    labels : (H, W) array
        Instance map, 0 = background.
    name : str
        What to call it in error messages.

    Returns
    -------
    The map as an ndarray (a bool mask becomes uint8 0/1; others are returned unchanged).

    Raises
    ------
    ValueError
        If it is not 2-D, not integer/bool, or has negative ids.
    """
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) instance map, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an integer instance map, got dtype {arr.dtype}")
    if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
        raise ValueError(f"{name} has negative ids (min {arr.min()}); 0 must be background")
    return arr


#: Unsigned dtypes a label map is stored in, smallest first (uint32 at most: 4 billion
#: nuclei is beyond any slide, and uint64 TIFFs do not open in ImageJ/QuPath).
LABEL_DTYPES = (np.uint8, np.uint16, np.uint32)


def smallest_label_dtype(max_label: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids ``0..max_label``: uint8 up to 255 nuclei,
    uint16 up to 65,535, else uint32.

    A 2048 px tile with 1,500 nuclei takes 8 MB in uint16 instead of 16 MB in int32, in
    napari's layer as in a TIFF.
    """
    for dtype in LABEL_DTYPES:
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"label id {max_label} does not fit in uint32")


def compact_labels(labels: np.ndarray) -> np.ndarray:
    """``labels`` (non-negative integer ids) in :func:`smallest_label_dtype` of its largest
    id; the array itself when it already has that dtype."""
    arr = np.asarray(labels)
    dtype = smallest_label_dtype(int(arr.max()) if arr.size else 0)
    return arr if arr.dtype == dtype else arr.astype(dtype)
