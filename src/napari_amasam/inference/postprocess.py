"""Instance post-processing: probability maps -> an instance label map (method.md section 5).

Two paths:

- :func:`watershed_from_distances` (default, 5.1): seeds where both the normalised centre
  distance and the inverted boundary distance are small, then a watershed on the boundary
  distance inside the foreground (torch-em / micro-sam style).
- :func:`edt_watershed` (fallback, 5.3): a watershed on the Euclidean distance transform of
  the foreground alone, seeded at its local maxima.

:func:`instances_from_maps` dispatches between them. Pixel constants of
:class:`~napari_amasam.config.PostprocessConfig` are at the training resolution; ``scale``
(= mpp_train / mpp_input) multiplies lengths (sigmas, peak distance) and its square areas.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.segmentation import relabel_sequential, watershed

from napari_amasam.config import PostprocessConfig

# Smoothing of the distance transform before peak finding (pixels at the training resolution;
# method.md 5.3 step 3). It removes the ridges of single-pixel boundary notches.
EDT_SIGMA = 1.0


def _check_map(name: str, array: np.ndarray | None, shape: tuple[int, ...] | None) -> np.ndarray:
    arr = np.asarray(array, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} map must be 2-D (H, W), got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name} map shape {arr.shape} differs from foreground shape {shape}")
    return arr


def _check_scale(scale: float) -> float:
    scale = float(scale)
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive number, not {scale}")
    return scale


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    return ndi.gaussian_filter(image, sigma) if sigma > 0 else image


def _smooth_within(image: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing that averages over ``mask`` pixels only (normalised convolution).

    The distance heads are unconstrained outside the foreground (their loss is masked there)
    and the targets are 0 outside, so plain smoothing pulls rim values towards whatever lies
    outside and can create spurious seeds along object borders. Inside ``mask`` this is a
    weighted mean of inside pixels only; outside it is left at 1 (far from any centre).
    """
    if sigma <= 0:
        return np.where(mask, image, 1.0).astype(np.float32)
    weight = mask.astype(np.float32)
    numerator = ndi.gaussian_filter(image * weight, sigma)
    denominator = ndi.gaussian_filter(weight, sigma)
    out = np.ones_like(image)
    out[mask] = numerator[mask] / np.maximum(denominator[mask], 1e-6)
    return out


def scaled_min_size(cfg: PostprocessConfig, scale: float) -> int:
    """``cfg.min_size`` (pixels at the training resolution) at the input resolution."""
    return max(0, int(round(cfg.min_size * scale * scale)))


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Set objects with fewer than ``min_size`` pixels to 0 (in place; returns ``labels``).

    Parameters
    ----------
    labels : (H, W) integer array
    min_size : int
    """
    if min_size <= 1 or labels.max() == 0:
        return labels
    sizes = np.bincount(labels.ravel())
    too_small = sizes < min_size
    too_small[0] = False
    if too_small.any():
        labels[too_small[labels]] = 0
    return labels


def fill_holes_per_object(labels: np.ndarray) -> np.ndarray:
    """Fill holes inside each object (in place; returns ``labels``).

    Only background pixels are filled, so an object enclosed by another keeps its id.

    Parameters
    ----------
    labels : (H, W) integer array
    """
    for obj_id, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        crop = labels[box]
        mask = crop == obj_id
        holes = ndi.binary_fill_holes(mask) & ~mask & (crop == 0)
        if holes.any():
            crop[holes] = obj_id
    return labels


def _finish(labels: np.ndarray, cfg: PostprocessConfig, scale: float) -> np.ndarray:
    """Shared last steps: fill holes, drop small objects, sequential int32 ids."""
    if cfg.fill_holes:
        fill_holes_per_object(labels)
    remove_small(labels, scaled_min_size(cfg, scale))
    return relabel_sequential(labels)[0].astype(np.int32, copy=False)


def _seed_orphans(markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Give every foreground component without a seed a seed of its own (in place).

    The watershed only floods from seeds, so such a component (e.g. a small nucleus whose
    predicted distances never fall below the thresholds) would otherwise vanish.
    """
    components, n = ndi.label(mask)
    if n == 0:
        return markers
    seeded = np.zeros(n + 1, bool)
    seeded[components[markers > 0]] = True
    seeded[0] = True
    orphan = ~seeded[components]
    if orphan.any():
        # Renumber the orphan components after the existing seeds.
        _, orphan_ids = np.unique(components[orphan], return_inverse=True)
        markers[orphan] = markers.max() + 1 + orphan_ids.ravel()
    return markers


def watershed_from_distances(
    fg: np.ndarray,
    cdist: np.ndarray,
    bdist: np.ndarray,
    cfg: PostprocessConfig | None = None,
    scale: float = 1.0,
) -> np.ndarray:
    """Seeded watershed from centre and boundary distances (method.md 5.1).

    Parameters
    ----------
    fg : (H, W) float array in [0, 1]
        Foreground probability.
    cdist : (H, W) float array in [0, 1]
        Normalised distance to the object centre (0 at the centre, 1 at the far edge).
    bdist : (H, W) float array in [0, 1]
        Inverted normalised boundary distance (0 at the deepest pixel, 1 at the border).
    cfg : PostprocessConfig, optional
        Thresholds, sigmas, min_size, fill_holes (defaults if None).
    scale : float
        mpp_train / mpp_input: multiplies the sigmas, and its square min_size.

    Returns
    -------
    (H, W) int32 array, objects numbered 1..N.

    Steps: smooth fg (sigma_foreground) and threshold it; smooth the distances
    (sigma_distance) within the foreground only (see ``_smooth_within``; torch-em smooths
    the whole map, which lets background values leak into object rims);
    seeds = connected components of (cdist < t_c) & (bdist < t_b) & fg; foreground
    components that hold no seed become seeds themselves; watershed on bdist from the seeds
    within fg; fill holes per object; drop objects under min_size.
    """
    cfg = cfg or PostprocessConfig()
    scale = _check_scale(scale)
    fg = _check_map("foreground", fg, None)
    cdist = _check_map("centre distance", cdist, fg.shape)
    bdist = _check_map("boundary distance", bdist, fg.shape)
    fg_mask = _smooth(fg, cfg.sigma_foreground * scale) > cfg.foreground_threshold
    if not fg_mask.any():
        return np.zeros(fg.shape, np.int32)
    sigma = cfg.sigma_distance * scale
    cdist_s = _smooth_within(cdist, fg_mask, sigma)
    bdist_s = _smooth_within(bdist, fg_mask, sigma)
    seed_mask = (
        (cdist_s < cfg.center_distance_threshold)
        & (bdist_s < cfg.boundary_distance_threshold)
        & fg_mask
    )
    markers = ndi.label(seed_mask)[0]
    _seed_orphans(markers, fg_mask)
    labels = watershed(bdist_s, markers, mask=fg_mask)
    return _finish(labels, cfg, scale)


def edt_watershed(
    fg: np.ndarray, cfg: PostprocessConfig | None = None, scale: float = 1.0
) -> np.ndarray:
    """Distance-transform watershed on the foreground alone (method.md 5.3).

    Parameters
    ----------
    fg : (H, W) float array in [0, 1] (or bool)
        Foreground probability (a binary mask works too).
    cfg : PostprocessConfig, optional
        Uses foreground_threshold, sigma_foreground, min_size, fill_holes, edt_min_distance.
    scale : float
        mpp_train / mpp_input: multiplies sigmas and edt_min_distance, its square min_size.

    Returns
    -------
    (H, W) int32 array, objects numbered 1..N.

    Steps: smooth fg (sigma_foreground) and threshold; drop small components and fill holes;
    EDT smoothed with sigma 1; one seed per local maximum at least edt_min_distance apart
    (per connected component, plus one for any component without a maximum); watershed on
    -EDT within fg; fill holes per object; drop objects under min_size.
    """
    cfg = cfg or PostprocessConfig()
    scale = _check_scale(scale)
    fg = _check_map("foreground", fg, None)
    fg_mask = _smooth(fg, cfg.sigma_foreground * scale) > cfg.foreground_threshold
    components, n = ndi.label(fg_mask)
    if n == 0:
        return np.zeros(fg.shape, np.int32)
    remove_small(components, scaled_min_size(cfg, scale))
    fg_mask = components > 0
    if cfg.fill_holes:
        fg_mask = ndi.binary_fill_holes(fg_mask)
    components, n = ndi.label(fg_mask)
    if n == 0:
        return np.zeros(fg.shape, np.int32)
    edt = _smooth(ndi.distance_transform_edt(fg_mask).astype(np.float32), EDT_SIGMA * scale)
    min_distance = max(1, int(round(cfg.edt_min_distance * scale)))
    peaks = peak_local_max(
        edt, min_distance=min_distance, labels=components, exclude_border=False
    )
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    _seed_orphans(markers, fg_mask)
    labels = watershed(-edt, markers, mask=fg_mask)
    return _finish(labels, cfg, scale)


def instances_from_maps(
    fg: np.ndarray,
    cdist: np.ndarray | None = None,
    bdist: np.ndarray | None = None,
    cfg: PostprocessConfig | None = None,
    scale: float = 1.0,
) -> np.ndarray:
    """Instance labels from the model's maps, by the method ``cfg`` names.

    Parameters
    ----------
    fg : (H, W) float array in [0, 1]
        Foreground probability.
    cdist, bdist : (H, W) float arrays in [0, 1] or None
        Centre and boundary distance maps; if either is None, or ``cfg.method == "edt"``,
        the EDT watershed on ``fg`` alone is used.
    cfg : PostprocessConfig, optional
    scale : float
        mpp_train / mpp_input.

    Returns
    -------
    (H, W) int32 array, objects numbered 1..N.
    """
    cfg = cfg or PostprocessConfig()
    if cdist is None or bdist is None or cfg.method == "edt":
        return edt_watershed(fg, cfg, scale)
    return watershed_from_distances(fg, cdist, bdist, cfg, scale)
