"""Classical nuclei baseline: colour deconvolution, threshold, distance-transform watershed.

This is what a user would otherwise reach for in an afternoon (no training, no GPU), and the
yardstick a fine-tuned model has to beat. Steps on an RGB H&E image:

1. Colour deconvolution (Ruifrok & Johnston, ``skimage.color.rgb2hed``) to the haematoxylin
   channel, where nuclei are bright.
2. Gaussian smoothing, then a threshold: Otsu on the whole image, relaxed by a local
   (block mean) threshold so that faint nuclei next to dark ones are not lost. A caller
   that segments one image in pieces (a slide, region by region) passes one global
   threshold for all pieces (:func:`haematoxylin_threshold` over samples of the whole),
   since Otsu on each piece alone would shift with what the piece happens to hold.
3. Morphological cleanup: opening (removes thin stroma fibres), small objects dropped,
   small holes filled.
4. Distance-transform watershed to split touching nuclei
   (:func:`~napari_amasam.inference.postprocess.edt_watershed`), then a minimum size.

Pixel constants are for 40x (about 0.25 um/px); ``scale`` = 0.25 / (input um/px) multiplies
lengths and its square areas.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.filters import threshold_local, threshold_otsu
from skimage.morphology import disk

from napari_amasam.config import PostprocessConfig
from napari_amasam.inference.postprocess import edt_watershed, remove_small

# Watershed settings of the baseline at 40x (min_size and peak distance fit nuclei of
# roughly 8-16 px radius; tuned on MoNuSeg train images, see tests/test_classical.py).
CLASSICAL_POSTPROCESS = PostprocessConfig(
    method="edt",
    foreground_threshold=0.5,
    sigma_foreground=1.0,
    min_size=60,
    fill_holes=True,
    edt_min_distance=8,
)

# Threshold and cleanup constants at 40x.
SMOOTH_SIGMA = 1.0  # pixels, on the haematoxylin channel
LOCAL_BLOCK = 101  # pixels, window of the local threshold (odd)
LOCAL_WEIGHT = 0.5  # final threshold = global - weight * max(global - local, 0)
OPENING_RADIUS = 2  # pixels
MAX_HOLE_AREA = 60  # pixels


def _check_rgb(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(
            f"classical segmentation expects an RGB image of shape (H, W, 3), got shape "
            f"{arr.shape}; greyscale images carry no stain colour to deconvolve"
        )
    if arr.dtype != np.uint8:
        raise ValueError(
            f"classical segmentation expects a uint8 RGB image (0-255), got dtype {arr.dtype}"
        )
    return arr[..., :3]


def haematoxylin(image_rgb_uint8: np.ndarray, sigma: float = SMOOTH_SIGMA) -> np.ndarray:
    """Smoothed haematoxylin optical density of an H&E image.

    Parameters
    ----------
    image_rgb_uint8 : (H, W, 3) uint8 array
    sigma : float
        Gaussian smoothing in pixels (0 = none).

    Returns
    -------
    (H, W) float32 array; larger = more haematoxylin (nuclei).
    """
    rgb = _check_rgb(image_rgb_uint8)
    h = rgb2hed(rgb)[..., 0].astype(np.float32)
    return ndi.gaussian_filter(h, sigma) if sigma > 0 else h


def smoothing_margin(scale: float = 1.0) -> int:
    """Pixels by which the haematoxylin smoothing reaches (scipy's 4-sigma kernel radius)."""
    return int(np.ceil(4.0 * SMOOTH_SIGMA * scale))


def haematoxylin_threshold(images: list[np.ndarray], scale: float = 1.0, margin: int = 0
                           ) -> float:
    """Otsu threshold of the smoothed haematoxylin of several images pooled together.

    For one image it is the global threshold :func:`nuclei_mask` computes itself; for
    windows of a slide it is the threshold of the slide.

    Parameters
    ----------
    images : list of (H, W, 3) uint8 arrays
    scale : float
        As in :func:`nuclei_mask`.
    margin : int
        Pixels cut off each side after smoothing: windows read with
        :func:`smoothing_margin` extra pixels then pool exactly the values the whole
        image's smoothing gives there.

    Returns
    -------
    float, or NaN when the pooled haematoxylin is constant (nothing to threshold).
    """
    inner = slice(margin, -margin if margin else None)
    values = np.concatenate([haematoxylin(image, SMOOTH_SIGMA * scale)[inner, inner].ravel()
                             for image in images])
    if values.size == 0 or float(values.max() - values.min()) < 1e-6:
        return float("nan")
    return float(threshold_otsu(values))


def nuclei_mask(
    image_rgb_uint8: np.ndarray, scale: float = 1.0, min_size: int | None = None,
    threshold: float | None = None,
) -> np.ndarray:
    """Binary nuclei mask from the haematoxylin channel (steps 1-3 of the module doc).

    Parameters
    ----------
    image_rgb_uint8 : (H, W, 3) uint8 array
    scale : float
        0.25 / (input um/px): multiplies lengths, its square areas.
    min_size : int, optional
        Smallest kept component in pixels at 40x (default ``CLASSICAL_POSTPROCESS.min_size``).
    threshold : float, optional
        Global haematoxylin threshold (e.g. a slide's, :func:`haematoxylin_threshold`);
        default (or NaN): Otsu on this image.

    Returns
    -------
    (H, W) bool array.
    """
    h = haematoxylin(image_rgb_uint8, SMOOTH_SIGMA * scale)
    if float(h.max() - h.min()) < 1e-6:  # blank image: nothing to threshold
        return np.zeros(h.shape, bool)
    given = threshold is not None and np.isfinite(threshold)
    global_t = float(threshold) if given else threshold_otsu(h)
    block = max(3, int(round(LOCAL_BLOCK * scale)) | 1)
    local_t = threshold_local(h, block_size=block, method="mean")
    # Lower the global threshold where the neighbourhood is darker than the global level
    # (faint nuclei in pale regions) but never raise it (dense nuclei clusters stay whole).
    threshold = global_t - LOCAL_WEIGHT * np.maximum(global_t - local_t, 0.0)
    mask = h > threshold
    radius = max(1, int(round(OPENING_RADIUS * scale)))
    mask = ndi.binary_opening(mask, structure=disk(radius))
    if min_size is None:
        min_size = CLASSICAL_POSTPROCESS.min_size
    min_area = max(1, int(round(min_size * scale**2)))
    # (bincount-based size filters: skimage renamed their arguments across versions)
    mask = remove_small(ndi.label(mask)[0], min_area) > 0
    holes = remove_small(ndi.label(~mask)[0], int(round(MAX_HOLE_AREA * scale**2)) + 1)
    return mask | ((holes == 0) & ~mask)


def segment_classical(
    image_rgb_uint8: np.ndarray,
    scale: float = 1.0,
    cfg: PostprocessConfig | None = None,
    threshold: float | None = None,
) -> np.ndarray:
    """Segment nuclei in an H&E image without a model.

    Parameters
    ----------
    image_rgb_uint8 : (H, W, 3) uint8 array
        RGB H&E image (an RGBA image has its alpha channel dropped). Greyscale images are
        rejected: colour deconvolution needs the stain colours.
    scale : float
        0.25 / (input um/px), i.e. 1.0 at 40x and 0.5 at 20x.
    cfg : PostprocessConfig, optional
        Watershed settings (``method`` is ignored: always the EDT watershed). Defaults to
        :data:`CLASSICAL_POSTPROCESS`.
    threshold : float, optional
        Global haematoxylin threshold shared by the pieces of one larger image (see
        :func:`nuclei_mask`); default: Otsu on this image.

    Returns
    -------
    (H, W) int32 array, nuclei numbered 1..N, 0 = background.
    """
    scale = float(scale)
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive number, not {scale}")
    cfg = dataclasses.replace(cfg or CLASSICAL_POSTPROCESS, method="edt")
    mask = nuclei_mask(image_rgb_uint8, scale, cfg.min_size, threshold)
    return edt_watershed(mask.astype(np.float32), cfg, scale)
