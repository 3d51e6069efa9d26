"""Checks shared by everything that takes an instance label map (metrics, export)."""

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
