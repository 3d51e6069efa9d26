"""Instance post-processing: probability maps -> an instance label map (method.md section 5).

Two paths:

- :func:`watershed_from_distances` (default, 5.1): seeds where both the normalised centre
  distance and the inverted boundary distance are small, then a watershed on the boundary
  distance inside the foreground (torch-em / micro-sam style).
- :func:`edt_watershed` (fallback, 5.3): a watershed on the Euclidean distance transform of
  the foreground alone, seeded at its local maxima.

:func:`instances_from_maps` dispatches between them; :func:`instances_from_maps_tiled` runs
it in overlapping blocks and stitches, so large images need memory for one block only. Pixel constants of
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


def _smooth_within(
    image: np.ndarray, mask: np.ndarray, sigma: float, denominator: np.ndarray | None = None
) -> np.ndarray:
    """Gaussian smoothing that averages over ``mask`` pixels only (normalised convolution).

    The distance heads are unconstrained outside the foreground (their loss is masked there)
    and the targets are 0 outside, so plain smoothing pulls rim values towards whatever lies
    outside and can create spurious seeds along object borders. Inside ``mask`` this is a
    weighted mean of inside pixels only; outside it is left at 1 (far from any centre).
    ``denominator`` (the smoothed mask) may be passed in when maps share mask and sigma.
    """
    if sigma <= 0:
        return np.where(mask, image, 1.0).astype(np.float32)
    weight = mask.astype(np.float32)
    numerator = ndi.gaussian_filter(image * weight, sigma)
    if denominator is None:
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

    Notes
    -----
    An object's holes are background enclosed by it, hence also holes of the whole
    foreground (background not 4-connected to the image border, as ``binary_fill_holes``
    defines them); objects whose bounding box holds no such pixel are skipped, which
    leaves the result unchanged and the loop short.
    """
    background, _ = ndi.label(labels == 0)  # 4-connected components
    border = np.unique(np.concatenate(
        [background[0], background[-1], background[:, 0], background[:, -1]]
    ))
    enclosed = (background > 0) & ~np.isin(background, border)
    if not enclosed.any():
        return labels
    for obj_id, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None or not enclosed[box].any():
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
    # one smoothed mask serves both maps (normalised convolution's denominator)
    denominator = ndi.gaussian_filter(fg_mask.astype(np.float32), sigma) if sigma > 0 else None
    cdist_s = _smooth_within(cdist, fg_mask, sigma, denominator)
    bdist_s = _smooth_within(bdist, fg_mask, sigma, denominator)
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


# Halo of each block in :func:`instances_from_maps_tiled` (pixels at the training
# resolution). It must exceed the distance from a nucleus's centroid to its farthest pixel
# plus the reach of the smoothing, so every object owned by a block's core lies wholly inside
# the block's window: MoNuSeg nuclei (0.25 um/px) are at most ~90 px across (99.9th
# percentile), i.e. under ~60 px from centroid to rim.
TILED_HALO = 96


def _owned_ids(labels: np.ndarray, core: tuple[int, int, int, int]) -> np.ndarray:
    """Ids of ``labels`` whose integer centroid lies in ``core``.

    Parameters
    ----------
    labels : (h, w) int32 array
        Sequential labels 1..n of one window.
    core : (row0, row1, col0, col1)
        Half-open core rectangle in the window's coordinates.

    Returns
    -------
    (n + 1,) bool array indexed by id (entry 0 is False).
    """
    flat = labels.ravel()
    n = int(labels.max())
    counts = np.bincount(flat, minlength=n + 1).astype(np.float64)
    counts[0] = 1.0  # background: avoids 0/0, its entry is discarded below
    height, width = labels.shape
    # Row and column sums per id without materialising an (h, w) index grid per axis twice.
    row_sum = np.bincount(flat, weights=np.repeat(np.arange(height, dtype=np.float64), width),
                          minlength=n + 1)
    col_sum = np.bincount(flat, weights=np.tile(np.arange(width, dtype=np.float64), height),
                          minlength=n + 1)
    # floor(mean) is the integer centroid; any fixed rule works as long as every window uses
    # the same one, so that an object seen by two windows is owned by exactly one core.
    rows = np.floor(row_sum / counts).astype(np.int64)
    cols = np.floor(col_sum / counts).astype(np.int64)
    row0, row1, col0, col1 = core
    owned = (rows >= row0) & (rows < row1) & (cols >= col0) & (cols < col1)
    owned[0] = False
    return owned


def instances_from_maps_tiled(
    fg: np.ndarray,
    cdist: np.ndarray | None = None,
    bdist: np.ndarray | None = None,
    cfg: PostprocessConfig | None = None,
    scale: float = 1.0,
    block: int = 1024,
    halo: int | None = None,
) -> np.ndarray:
    """:func:`instances_from_maps` in overlapping blocks, for memory bounded by the block size.

    Parameters
    ----------
    fg : (H, W) float array in [0, 1]
        Foreground probability.
    cdist, bdist : (H, W) float arrays in [0, 1] or None
        As in :func:`instances_from_maps` (None, or ``cfg.method == "edt"``: EDT watershed).
    cfg : PostprocessConfig, optional
    scale : float
        mpp_train / mpp_input; also scales the default halo.
    block : int
        Side of the square core blocks (pixels at the input resolution).
    halo : int, optional
        Context added on every side of a block; default ``ceil(TILED_HALO * scale)``. It
        must exceed the centroid-to-rim distance of the largest nucleus plus the smoothing
        reach, or large nuclei on block borders may come out cut.

    Returns
    -------
    (H, W) int32 array, objects numbered 1..N.

    Each block plus its halo (the window) is post-processed on its own. An object belongs
    to the block whose core holds its integer centroid; with a large enough halo such an
    object lies wholly inside the window and far from the window's edge, so it comes out as
    in the whole-image result. Owned objects are pasted where the output is still 0, so
    objects from different blocks never overwrite each other. Images no larger than one
    block go straight to :func:`instances_from_maps` (identical result).
    """
    cfg = cfg or PostprocessConfig()
    scale = _check_scale(scale)
    block = int(block)
    if block < 1:
        raise ValueError(f"block must be a positive number of pixels, not {block}")
    halo = int(np.ceil(TILED_HALO * scale)) if halo is None else int(halo)
    if halo < 0:
        raise ValueError(f"halo must be >= 0, not {halo}")
    # Validate shapes without converting: a float32 copy of a whole-slide map is what the
    # tiling is meant to avoid; each window is converted on its own.
    fg = np.asarray(fg)
    if fg.ndim != 2:
        raise ValueError(f"foreground map must be 2-D (H, W), got shape {fg.shape}")
    use_distances = cdist is not None and bdist is not None and cfg.method != "edt"
    if use_distances:
        cdist, bdist = np.asarray(cdist), np.asarray(bdist)
        for name, arr in (("centre distance", cdist), ("boundary distance", bdist)):
            if arr.shape != fg.shape:
                raise ValueError(f"{name} map shape {arr.shape} differs from foreground "
                                 f"shape {fg.shape}")
    height, width = fg.shape
    if height <= block and width <= block:
        return instances_from_maps(fg, cdist if use_distances else None,
                                   bdist if use_distances else None, cfg, scale)

    out = np.zeros((height, width), np.int32)
    next_id = 0
    for row0 in range(0, height, block):
        row1 = min(row0 + block, height)
        win_row0, win_row1 = max(0, row0 - halo), min(height, row1 + halo)
        for col0 in range(0, width, block):
            col1 = min(col0 + block, width)
            win_col0, win_col1 = max(0, col0 - halo), min(width, col1 + halo)
            window = (slice(win_row0, win_row1), slice(win_col0, win_col1))
            if use_distances:
                labels = watershed_from_distances(fg[window], cdist[window], bdist[window],
                                                  cfg, scale)
            else:
                labels = edt_watershed(fg[window], cfg, scale)
            if not labels.any():
                continue
            core = (row0 - win_row0, row1 - win_row0, col0 - win_col0, col1 - win_col0)
            owned = _owned_ids(labels, core)
            n_owned = int(owned.sum())
            if n_owned == 0:
                continue
            new_ids = np.zeros(owned.size, np.int32)
            new_ids[owned] = np.arange(next_id + 1, next_id + n_owned + 1, dtype=np.int32)
            next_id += n_owned
            pasted = new_ids[labels]
            target = out[window]  # a view: writes land in ``out``
            free = (pasted > 0) & (target == 0)
            target[free] = pasted[free]

    # Where blocks disagreed, paste-where-free can leave fragments or drop ids entirely:
    # drop the fragments under min_size and renumber 1..N. Done in row strips because a
    # whole-image bincount (int32 -> intp) or fancy-index would cost 2-3 output sizes.
    strips = [slice(row0, min(row0 + block, height)) for row0 in range(0, height, block)]
    sizes = np.zeros(next_id + 1, np.int64)
    for strip in strips:
        sizes += np.bincount(out[strip].ravel(), minlength=next_id + 1)
    keep = sizes >= max(1, scaled_min_size(cfg, scale))
    keep[0] = False
    if keep.sum() < next_id:
        lut = np.zeros(next_id + 1, np.int32)
        lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        for strip in strips:
            out[strip] = lut[out[strip]]
    return out
