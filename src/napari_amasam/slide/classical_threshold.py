"""One haematoxylin threshold for the classical baseline across a whole slide.

The classical baseline thresholds the haematoxylin channel with Otsu's method
(``inference/classical.py``). Computed per region window, the threshold shifts with what
each window holds (a window of dense nuclei gets a higher one than a window of stroma), so
the same nucleus can be kept in one region and lost in the next, and a 256 px region grid
cost 0.021 AJI against the image segmented whole (``benchmarks/bench_slide.py``). Here it
is computed once, before any region runs, as Otsu's threshold of the smoothed haematoxylin
pooled over up to :data:`SAMPLE_WINDOWS` windows of the planned regions (so over tissue,
at the processing resolution, where the per-image threshold is computed too; a low
resolution would blur nuclei into stroma and shift the histogram). The value goes into the
:class:`~.worker.SlideJob`, so every region uses it and a resumed run reuses regions only
when it is the same.
"""

from __future__ import annotations

import numpy as np

from .reader import Slide
from .regions import Region

#: Windows sampled from the planned regions (spread evenly over them, row-major order).
SAMPLE_WINDOWS = 16
#: Side of a sampled window (processing pixels), centred on its region's core.
WINDOW = 512


def sample_windows(regions: list[Region], count: int = SAMPLE_WINDOWS, side: int = WINDOW
                   ) -> list[tuple[int, int, int, int]]:
    """``(y, x, h, w)`` of up to ``count`` windows spread over ``regions``.

    Each is the centred ``side`` square of a region's core (the whole core when smaller).
    """
    if not regions:
        return []
    picks = np.unique(np.linspace(0, len(regions) - 1, min(count, len(regions))).round())
    windows = []
    for i in picks.astype(int):
        region = regions[i]
        h, w = min(side, region.y1 - region.y0), min(side, region.x1 - region.x0)
        y = region.y0 + (region.y1 - region.y0 - h) // 2
        x = region.x0 + (region.x1 - region.x0 - w) // 2
        windows.append((y, x, h, w))
    return windows


def slide_threshold(slide: Slide, downsample: float, regions: list[Region],
                    scale: float = 1.0) -> float | None:
    """The classical baseline's haematoxylin threshold for the whole slide.

    Parameters
    ----------
    slide : Slide
    downsample : float
        Level-0 pixels per processing pixel (the regions' resolution).
    regions : list of Region
        The planned regions (tissue and/or the user's area).
    scale : float
        The baseline's scale at the processing resolution (1.0 at its own mpp).

    Returns
    -------
    float, or None when the samples are blank (each region then uses its own Otsu).
    """
    from ..inference.classical import haematoxylin_threshold, smoothing_margin

    # Each window is read with the smoothing's reach around it and cropped after smoothing,
    # so its values are those of the region's own (larger) window.
    m = smoothing_margin(scale)
    images = [slide.read_scaled(y - m, x - m, h + 2 * m, w + 2 * m, downsample)
              for y, x, h, w in sample_windows(regions)]
    if not images:
        return None
    value = haematoxylin_threshold(images, scale, margin=m)
    return value if np.isfinite(value) else None
