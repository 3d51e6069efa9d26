"""One owner for every nucleus and every pixel where neighbouring regions' results overlap.

Each region keeps the nuclei whose centroid lies in its core (:mod:`.worker`), but it finds
them in its own window, so near a core border two neighbouring regions can disagree: each
may keep its own version of the same nucleus (the two versions' centroids fall on either
side of the border), and nuclei kept by two regions can overlap by a few pixels. Pasting
such parts "where free" hid some nuclei in the labels TIFF that the GeoJSON and CSV still
listed. This step settles every overlap with one rule before any output is written, so the
three outputs are made from the same parts and hold the same nuclei with the same pixels:

- **Same nucleus** (the overlap is more than :data:`SAME_NUCLEUS_OVERLAP` of the smaller of
  the two): it belongs to the region whose core contains the centroid of the two versions'
  union (floored, as block-wise post-processing does); the other version is dropped whole.
- **Different nuclei**: each pixel they share belongs to the nucleus of the region whose
  core contains that pixel.

Where neither of the two regions' cores contains the point, the region with the lower index
wins. A decision depends only on the two regions' original parts, so both sides make the
same one, the order of parts does not matter, and a run killed while settling settles the
remaining parts identically when resumed. A nucleus left without pixels is dropped; one
left in pieces is written as a ``MultiPolygon``.

Memory: one part and its (at most eight, for a halo smaller than the core) neighbours.
"""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .parts import (
    TABLE_COLUMNS,
    PartInfo,
    PartStore,
    load_part,
    measure_nuclei,
    part_name,
    read_geometries,
    save_part,
)

#: Overlap, as a share of the smaller nucleus, above which two regions' nuclei are taken to
#: be two versions of one nucleus (touching neighbours overlap by a rim, not by half).
SAME_NUCLEUS_OVERLAP = 0.5

Core = tuple[int, int, int, int]  # (y0, x0, y1, x1), half-open, processing pixels


class _Stats:
    """A part's labels and per-id pixel count and row / column sums (slide coordinates)."""

    def __init__(self, info: PartInfo):
        with np.load(info.path) as part:
            self.labels = part["labels"]
        flat = self.labels.ravel()
        n = info.count + 1
        h, w = self.labels.shape
        y0, x0 = info.origin
        self.area = np.bincount(flat, minlength=n).astype(np.float64)
        self.rows = np.bincount(flat, weights=np.repeat(np.arange(y0, y0 + h, dtype=np.float64),
                                                        w), minlength=n)
        self.cols = np.bincount(flat, weights=np.tile(np.arange(x0, x0 + w, dtype=np.float64), h),
                                minlength=n)


class _StatsCache:
    """The last parts used (a part and its eight neighbours fit)."""

    def __init__(self, size: int = 9):
        self.size = size
        self._items: OrderedDict[Path, _Stats] = OrderedDict()

    def get(self, info: PartInfo) -> _Stats:
        if info.path in self._items:
            self._items.move_to_end(info.path)
        else:
            self._items[info.path] = _Stats(info)
            if len(self._items) > self.size:
                self._items.popitem(last=False)
        return self._items[info.path]


def _in_core(core: Core, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    y0, x0, y1, x1 = core
    return (y >= y0) & (y < y1) & (x >= x0) & (x < x1)


def first_wins(first: int, second: int, cores: dict[int, Core], y: np.ndarray,
               x: np.ndarray) -> np.ndarray:
    """Whether region ``first`` (not ``second``) owns the points ``(y, x)`` (the rule above).

    Exactly the complement of ``first_wins(second, first, ...)``: cores do not overlap.
    """
    in_first = _in_core(cores[first], y, x)
    in_second = _in_core(cores[second], y, x)
    return in_first | (~in_second & (first < second))


def _window(info: PartInfo) -> Core:
    y0, x0 = info.origin
    return y0, x0, y0 + info.shape[0], x0 + info.shape[1]


def settle_part(info: PartInfo, neighbours: list[PartInfo], cores: dict[int, Core],
                cache: _StatsCache) -> np.ndarray | None:
    """The part's labels with its overlaps settled (ids not renumbered); None if unchanged."""
    mine = cache.get(info)
    labels = mine.labels
    py0, px0 = info.origin
    drop = np.zeros(info.count + 1, bool)
    lose = np.zeros(labels.shape, bool)
    for other in neighbours:
        ay0, ax0, ay1, ax1 = _window(info)
        by0, bx0, by1, bx1 = _window(other)
        iy0, ix0, iy1, ix1 = max(ay0, by0), max(ax0, bx0), min(ay1, by1), min(ax1, bx1)
        if iy1 <= iy0 or ix1 <= ix0:
            continue
        theirs = cache.get(other)
        qy0, qx0 = other.origin
        a = labels[iy0 - py0 : iy1 - py0, ix0 - px0 : ix1 - px0]
        b = theirs.labels[iy0 - qy0 : iy1 - qy0, ix0 - qx0 : ix1 - qx0]
        ys, xs = np.nonzero((a > 0) & (b > 0))
        if ys.size == 0:
            continue
        ida = a[ys, xs].astype(np.int64)
        idb = b[ys, xs].astype(np.int64)
        gy, gx = ys + iy0, xs + ix0
        pairs, inverse, overlap = np.unique(ida * (other.count + 1) + idb, return_inverse=True,
                                            return_counts=True)
        inverse = inverse.ravel()
        pa, pb = pairs // (other.count + 1), pairs % (other.count + 1)
        same = overlap > SAME_NUCLEUS_OVERLAP * np.minimum(mine.area[pa], theirs.area[pb])
        # Centroid of each same-nucleus pair's union (floored, like _owned_ids).
        union = mine.area[pa] + theirs.area[pb] - overlap
        uy = (mine.rows[pa] + theirs.rows[pb] - np.bincount(inverse, gy, len(pairs))) / union
        ux = (mine.cols[pa] + theirs.cols[pb] - np.bincount(inverse, gx, len(pairs))) / union
        keeps = first_wins(info.index, other.index, cores, np.floor(uy), np.floor(ux))
        drop[pa[same & ~keeps]] = True
        # Shared pixels of different nuclei, unless their nucleus there is dropped as the
        # same nucleus as one of ours (this pair's decision, which both sides make alike).
        other_dropped = np.zeros(other.count + 1, bool)
        other_dropped[pb[same & keeps]] = True
        pixel = ~same[inverse] & ~other_dropped[idb]
        lost = pixel & ~first_wins(info.index, other.index, cores, gy, gx)
        lose[ys[lost] + (iy0 - py0), xs[lost] + (ix0 - px0)] = True
    if not drop.any() and not lose.any():
        return None
    settled = np.where(lose | drop[labels], 0, labels)
    return settled


def _link_or_copy(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _save_settled(store: PartStore, info: PartInfo, settled: np.ndarray, old_area: np.ndarray,
                  read_image, downsample: float) -> None:
    """Write a changed part: nuclei that kept all their pixels keep their stored rows and
    outlines; only the changed ones are measured and outlined again (a few per part)."""
    new_area = np.bincount(settled.ravel(), minlength=info.count + 1)
    new_area[0] = 0
    survivors = np.flatnonzero(new_area)
    changed = survivors[new_area[survivors] != old_area[survivors]]
    lut = np.zeros(info.count + 1, np.uint32)
    lut[survivors] = np.arange(1, survivors.size + 1, dtype=np.uint32)
    part = load_part(info.path)
    geometries = read_geometries(part)
    table = {name: part[name][survivors - 1].copy() for name in TABLE_COLUMNS}
    kept = [geometries[i - 1] for i in survivors]
    if changed.size:
        # The changed nuclei alone (ids 1..k in ``changed`` order), measured on their box.
        sub_lut = np.zeros(info.count + 1, np.uint32)
        sub_lut[changed] = np.arange(1, changed.size + 1, dtype=np.uint32)
        sub = sub_lut[settled]
        rows_any = np.flatnonzero(sub.any(axis=1))
        cols_any = np.flatnonzero(sub.any(axis=0))
        y0, y1 = int(rows_any[0]), int(rows_any[-1]) + 1
        x0, x1 = int(cols_any[0]), int(cols_any[-1]) + 1
        oy, ox = info.origin[0] + y0, info.origin[1] + x0
        image = read_image(oy, ox, y1 - y0, x1 - x0)
        _, _, measured, outlines = measure_nuclei(sub[y0:y1, x0:x1], (oy, ox), image,
                                                  downsample)
        where = np.searchsorted(survivors, changed)
        for name in TABLE_COLUMNS:
            table[name][where] = measured[name]
        for k, position in enumerate(where):
            kept[position] = outlines[k]
    save_part(store.settled, info.index, lut[settled], info.origin, table, kept)


def settle_overlaps(store: PartStore, infos: list[PartInfo], cores: dict[int, Core],
                    read_image, downsample: float) -> Iterator[int]:
    """Write every part into ``store.settled`` with its overlaps settled; yields indices.

    Parameters
    ----------
    store : PartStore
    infos : list of PartInfo
        The original parts of every region of the plan.
    cores : dict region index -> (y0, x0, y1, x1)
    read_image : callable ``(y, x, h, w) -> (h, w, 3) uint8``
        Processing-resolution pixels (to measure the mean intensity of changed nuclei).
    downsample : float
        Level-0 pixels per processing pixel.
    """
    done = store.open_settled()
    windows = np.array([_window(i) for i in infos], np.int64).reshape(-1, 4)
    cache = _StatsCache()
    for k, info in enumerate(infos):
        if info.index in done:
            continue
        target = store.settled / part_name(info.index)
        settled = None
        if info.count:
            y0, x0, y1, x1 = windows[k]
            touching = np.flatnonzero((windows[:, 0] < y1) & (windows[:, 2] > y0) &
                                      (windows[:, 1] < x1) & (windows[:, 3] > x0))
            neighbours = [infos[j] for j in touching if j != k and infos[j].count]
            settled = settle_part(info, neighbours, cores, cache)
        if settled is None:
            _link_or_copy(info.path, target)
        else:
            _save_settled(store, info, settled, cache.get(info).area, read_image, downsample)
        yield info.index
