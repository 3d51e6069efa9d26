"""One region of a slide, segmented where it runs (a Dask worker or the calling process).

:func:`segment_region` is the task Dask runs: it reads the region's core plus a halo at the
processing resolution, segments it with the existing :class:`~napari_amasam.inference.
Predictor` (network tiles, then block-wise post-processing inside), keeps the nuclei whose
centroid lies in the core (and in the user's area, if any), and writes them as a part file
(:mod:`.parts`). The halo is wider than any nucleus, so a nucleus cut by the core border is
whole in the window of the region that owns it and absent from its neighbours' results
(where two windows disagree about a nucleus near a border, :mod:`.ownership` settles it
once every region is done).

The slide handle and the predictor are cached per process, so a worker loads the model once
for all the regions it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .regions import Area, Region

#: Context around a region core (processing pixels): the post-processing halo (96 px, more
#: than a nucleus's centroid-to-rim distance plus smoothing) and room for the network's
#: tile context, so owned nuclei near the core border see the same maps as inside.
DEFAULT_HALO = 128


@dataclass(frozen=True)
class SlideJob:
    """Everything a worker needs to segment any region of one slide (picklable).

    Attributes
    ----------
    slide_path : str
    slide_mpp : float
        Microns per level-0 pixel (resolved in the main process, metadata or ``--mpp``).
    downsample : float
        Level-0 pixels per processing pixel (``processing mpp / slide mpp``).
    model : str
        Model folder, or ``"classical"``.
    checkpoint, device : str or None, str
    thresholds : dict or None
        ``PostprocessConfig`` fields overriding the model's.
    tile_size, overlap, batch_size : predictor settings.
    halo : int
    polygons : list of (k, 2) float lists or None
        The user's area (level-0 ``x, y``); None keeps every nucleus of a region.
    parts_dir : str
    threads : int
        Torch CPU threads in the worker (0 = leave torch's default).
    precision : str or None
        ``fp32``, ``bf16``, ``auto`` or None (the model folder's).
    classical_threshold : float or None
        The classical baseline's haematoxylin threshold for every region (computed once
        for the slide, :mod:`.classical_threshold`); None: Otsu per region window.
    """

    slide_path: str
    slide_mpp: float
    downsample: float
    model: str
    parts_dir: str
    checkpoint: str | None = None
    device: str = "auto"
    thresholds: dict | None = None
    tile_size: int | None = None
    overlap: int | None = None
    batch_size: int = 4
    halo: int = DEFAULT_HALO
    polygons: list | None = field(default=None, hash=False)
    threads: int = 0
    precision: str | None = None
    classical_threshold: float | None = None


_CACHE: dict[str, Any] = {}


def _slide(job: SlideJob):
    from .reader import open_slide

    key = (job.slide_path, job.slide_mpp)
    if _CACHE.get("slide_key") != key:
        old = _CACHE.pop("slide", None)
        if old is not None:
            old.close()
        _CACHE["slide"] = open_slide(job.slide_path, mpp=job.slide_mpp)
        _CACHE["slide_key"] = key
    return _CACHE["slide"]


def _predictor(job: SlideJob):
    from ..inference.predictor import Predictor

    key = (job.model, job.checkpoint, job.device, job.precision, job.classical_threshold)
    if _CACHE.get("predictor_key") != key:
        if job.threads > 0:
            import torch

            torch.set_num_threads(job.threads)
        if job.model == "classical":
            predictor = Predictor.classical(threshold=job.classical_threshold)
        else:
            predictor = Predictor.from_folder(job.model, checkpoint=job.checkpoint,
                                              device=job.device, precision=job.precision)
        _CACHE["predictor"] = predictor
        _CACHE["predictor_key"] = key
    return _CACHE["predictor"]


def clear_cache() -> None:
    """Close the cached slide and drop the predictor (the calling process's cache)."""
    slide = _CACHE.pop("slide", None)
    if slide is not None:
        slide.close()
    _CACHE.clear()


def _centroids(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean row and column of ids ``0..n`` (entry 0 meaningless)."""
    flat = labels.ravel()
    counts = np.maximum(np.bincount(flat, minlength=n + 1), 1).astype(np.float64)
    h, w = labels.shape
    rows = np.bincount(flat, weights=np.repeat(np.arange(h, dtype=np.float64), w), minlength=n + 1)
    cols = np.bincount(flat, weights=np.tile(np.arange(w, dtype=np.float64), h), minlength=n + 1)
    return rows / counts, cols / counts


def segment_region(job: SlideJob, region: Region) -> dict:
    """Segment one region and write its part file.

    Returns
    -------
    dict ``{"index": region index, "nuclei": owned nuclei written}``.
    """
    from ..config import PostprocessConfig
    from ..inference.postprocess import _owned_ids
    from .parts import save_nuclei

    slide = _slide(job)
    predictor = _predictor(job)
    height, width = slide.scaled_shape(job.downsample)
    halo = int(job.halo)
    wy0, wx0 = max(0, region.y0 - halo), max(0, region.x0 - halo)
    wy1, wx1 = min(height, region.y1 + halo), min(width, region.x1 + halo)
    image = slide.read_scaled(wy0, wx0, wy1 - wy0, wx1 - wx0, job.downsample)
    thresholds = PostprocessConfig.from_dict(job.thresholds) if job.thresholds else None
    # The window is already at the model's resolution: say so (scale 1), or the predictor
    # would take it to be at the training data's scale and rescale it once more.
    labels = predictor.segment(image, tile_size=job.tile_size, overlap=job.overlap,
                               batch_size=job.batch_size, thresholds=thresholds,
                               input_mpp=predictor.mpp)
    n = int(labels.max())
    core = (region.y0 - wy0, region.y1 - wy0, region.x0 - wx0, region.x1 - wx0)
    owned = _owned_ids(labels, core) if n else np.zeros(1, bool)
    if job.polygons is not None and owned.any():
        rows, cols = _centroids(labels, n)
        ids = np.flatnonzero(owned)
        area = Area([np.asarray(p, float) for p in job.polygons])
        # Processing pixel centre (i + 0.5) * d in level-0 edge coordinates.
        inside = area.contains((wx0 + cols[ids] + 0.5) * job.downsample,
                               (wy0 + rows[ids] + 0.5) * job.downsample)
        owned[ids[~inside]] = False
    keep = np.flatnonzero(owned)
    lut = np.zeros(n + 1, np.uint32)
    lut[keep] = np.arange(1, keep.size + 1, dtype=np.uint32)
    local = lut[labels]
    del labels
    save_nuclei(job.parts_dir, region.index, local, (wy0, wx0), image, job.downsample)
    return {"index": region.index, "nuclei": int(keep.size)}
