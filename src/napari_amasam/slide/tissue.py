"""Tissue detection on a low-resolution copy of a slide, so glass is never segmented.

Glass is bright and grey; H&E-stained tissue is coloured. At :data:`TISSUE_MPP` microns per
pixel (a 100k-pixel slide at 0.25 µm/px becomes ~3000 pixels a side) a pixel is tissue where
its saturation ``(max - min) / max`` of RGB exceeds a threshold: Otsu's on the slide's
saturation histogram, kept within :data:`SATURATION_RANGE` so an all-tissue slide (Otsu then
splits pale from dark tissue) and an all-glass one both come out right. The mask is then
closed, small specks are dropped, holes are filled and it is dilated by a margin of
:data:`MARGIN_UM` so nuclei at the tissue edge are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .reader import Slide

#: Resolution of the tissue mask (microns per mask pixel).
TISSUE_MPP = 8.0
#: Saturation threshold bounds: glass is below ~0.04, pale eosin stroma above ~0.10.
SATURATION_RANGE = (0.05, 0.10)
#: Components smaller than this (a 100 µm square) are dust or debris (square microns).
MIN_TISSUE_UM2 = 10_000.0
#: Dilation of the mask (microns), so cells at the edge of tissue are not cut off.
MARGIN_UM = 50.0


@dataclass
class TissueMask:
    """A boolean mask over the slide at a low resolution.

    Attributes
    ----------
    mask : (h, w) bool array
    downsample : float
        Level-0 pixels per mask pixel.
    """

    mask: np.ndarray
    downsample: float

    @property
    def fraction(self) -> float:
        """Share of the slide covered by the mask."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def saturation(rgb: np.ndarray) -> np.ndarray:
    """``(max - min) / max`` of RGB per pixel, ``(h, w) float32`` in [0, 1] (0 for black)."""
    arr = rgb[..., :3].astype(np.float32)
    high = arr.max(axis=-1)
    low = arr.min(axis=-1)
    return np.where(high > 0, (high - low) / np.maximum(high, 1.0), 0.0).astype(np.float32)


def tissue_from_rgb(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """Tissue mask of a low-resolution RGB image (see module doc).

    Parameters
    ----------
    rgb : (h, w, 3) uint8 array
    mpp : float
        Microns per pixel of ``rgb``.

    Returns
    -------
    (h, w) bool array.
    """
    from skimage.filters import threshold_otsu

    sat = saturation(rgb)
    if float(sat.max() - sat.min()) < 1e-6:
        threshold = SATURATION_RANGE[0]
    else:
        threshold = float(np.clip(threshold_otsu(sat), *SATURATION_RANGE))
    mask = sat > threshold
    mask = ndi.binary_closing(mask, structure=np.ones((3, 3), bool), iterations=2)
    labels, n = ndi.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes * mpp * mpp >= MIN_TISSUE_UM2
        keep[0] = False
        mask = keep[labels]
    mask = ndi.binary_fill_holes(mask)
    margin = int(np.ceil(MARGIN_UM / mpp))
    if margin > 0 and mask.any():
        mask = ndi.binary_dilation(mask, iterations=margin)
    return mask


def detect_tissue(slide: Slide, mask_mpp: float = TISSUE_MPP) -> TissueMask:
    """Tissue mask of a slide at ``mask_mpp`` (or level 0 if the slide is coarser).

    Reads the slide in strips at the low resolution: memory is that of the mask.
    """
    downsample = max(1.0, mask_mpp / slide.mpp)
    rgb = slide.thumbnail(downsample)
    return TissueMask(tissue_from_rgb(rgb, slide.mpp * downsample), downsample)
