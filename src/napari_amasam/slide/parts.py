"""Finished regions on disk: one compressed ``.npz`` part file per region, and resume.

A run writes its parts into ``<out>/<stem>.parts/`` next to a ``plan.json`` that records
everything the results depend on (slide, resolution, model, thresholds, regions, area). A
part is written to a temporary name and renamed when complete, so a part file that exists
is a finished region: a killed run restarted with the same plan skips those regions; a
different plan (other model, settings or slide) clears the folder first. Once every region
is done, each part is rewritten with its overlaps with the neighbouring parts settled
(:mod:`.ownership`) into ``settled/``, the same way; the outputs are written from there and
the folder is removed afterwards.

Part file contents (``n`` nuclei owned by the region, local ids ``1..n``)::

    labels        (h, w) uint32   owned nuclei only, cropped to their bounding box
    origin        (2,) int64      processing-resolution (row, col) of labels[0, 0]
    area, perimeter, eccentricity, mean_intensity, centroid_y, centroid_x
                  (n,) float64    processing pixels; centroids in slide-wide coordinates
    geometries    (k,) uint8      JSON: n GeoJSON geometries (a ``Polygon`` with its holes as
                                  inner rings, or a ``MultiPolygon`` for a nucleus in
                                  pieces), level-0 (x, y) pixel-edge coordinates
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TABLE_COLUMNS = ("area", "perimeter", "eccentricity", "mean_intensity", "centroid_y", "centroid_x")
PLAN_FILE = "plan.json"
#: Subfolder of the settled parts (:mod:`.ownership`).
SETTLED_DIR = "settled"
#: Part file layout version (in the plan: parts of an older layout are not reused).
PART_FORMAT = 2


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def part_name(index: int) -> str:
    return f"region_{index:07d}.npz"


def save_part(folder: str | Path, index: int, labels: np.ndarray, origin: tuple[int, int],
              table: dict[str, np.ndarray], geometries: list[dict]) -> Path:
    """Write one region's result atomically; returns the part's path."""
    path = Path(folder) / part_name(index)
    arrays = {name: np.asarray(table[name], np.float64) for name in TABLE_COLUMNS}
    arrays["labels"] = np.asarray(labels, np.uint32)
    arrays["origin"] = np.asarray(origin, np.int64)
    arrays["geometries"] = np.frombuffer(json.dumps(geometries).encode(), np.uint8)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    _atomic(path, write)
    return path


def measure_nuclei(labels: np.ndarray, origin: tuple[int, int], image: np.ndarray,
                   downsample: float) -> tuple[np.ndarray, tuple[int, int], dict, list[dict]]:
    """Crop, measure and outline nuclei: what a part stores about them.

    Parameters
    ----------
    labels : (h, w) integer array
        Nuclei with ids ``1..n`` (consecutive), 0 elsewhere; ``n >= 1``.
    origin : (row, col)
        Processing-resolution position of ``labels[0, 0]`` in the slide.
    image : (h, w, 3) uint8 array
        The pixels under ``labels`` (for the mean intensity).
    downsample : float
        Level-0 pixels per processing pixel (outlines are written in level-0 pixels).

    Returns
    -------
    (labels cropped to the nuclei, the crop's origin, measurement columns (centroids in
    slide-wide processing pixels), GeoJSON geometries in id order)
    """
    from ..export import labels_to_geojson, nucleus_measurements

    rows_any = np.flatnonzero(labels.any(axis=1))
    cols_any = np.flatnonzero(labels.any(axis=0))
    by0, by1 = int(rows_any[0]), int(rows_any[-1]) + 1
    bx0, bx1 = int(cols_any[0]), int(cols_any[-1]) + 1
    crop = np.ascontiguousarray(labels[by0:by1, bx0:bx1], np.uint32)
    oy, ox = origin[0] + by0, origin[1] + bx0
    table = nucleus_measurements(crop, image[by0:by1, bx0:bx1])
    table["centroid_y"] = table["centroid_y"] + oy
    table["centroid_x"] = table["centroid_x"] + ox
    collection = labels_to_geojson(crop, offset=(oy * downsample, ox * downsample),
                                   downsample=downsample)
    # The whole geometry: holes (a ring-shaped nucleus) and pieces stay what they are.
    geometries = [feature["geometry"] for feature in collection["features"]]
    return crop, (oy, ox), table, geometries


def save_nuclei(folder: str | Path, index: int, labels: np.ndarray, origin: tuple[int, int],
                image: np.ndarray, downsample: float) -> int:
    """Measure, outline and save a region's nuclei as its part; returns how many.

    Parameters as :func:`measure_nuclei` (``labels`` may hold no nucleus).
    """
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        save_part(folder, index, np.zeros((0, 0), np.uint32), origin,
                  {name: np.zeros(0) for name in TABLE_COLUMNS}, [])
        return 0
    crop, crop_origin, table, geometries = measure_nuclei(labels, origin, image, downsample)
    save_part(folder, index, crop, crop_origin, table, geometries)
    return n


def read_geometries(part: dict[str, np.ndarray]) -> list[dict]:
    """The GeoJSON geometries of a loaded part (:func:`load_part`), in id order."""
    return json.loads(part["geometries"].tobytes().decode())


@dataclass
class PartInfo:
    """Where a finished part's labels sit, without its pixels.

    Attributes
    ----------
    index : int
    path : Path
    origin : (row, col)
    shape : (h, w)
    count : int
        Nuclei in the part.
    first_id : int
        Slide-wide id of its nucleus 1 is ``first_id + 1``.
    """

    index: int
    path: Path
    origin: tuple[int, int]
    shape: tuple[int, int]
    count: int
    first_id: int = 0


def read_part_info(path: Path) -> PartInfo:
    with np.load(path) as part:
        origin = tuple(int(v) for v in part["origin"])
        count = int(part["area"].shape[0])
        labels_shape = part["labels"].shape
    index = int(path.stem.split("_")[1])
    return PartInfo(index, path, origin, tuple(labels_shape), count)


def load_part(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as part:
        return {name: part[name] for name in part.files}


class PartCache:
    """A few parts' label crops in memory (least recently used dropped first)."""

    def __init__(self, size: int = 16):
        self.size = size
        self._items: OrderedDict[Path, np.ndarray] = OrderedDict()

    def labels(self, info: PartInfo) -> np.ndarray:
        if info.path in self._items:
            self._items.move_to_end(info.path)
            return self._items[info.path]
        with np.load(info.path) as part:
            labels = part["labels"]
        self._items[info.path] = labels
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return labels


class PartStore:
    """The parts folder of one output: plan check, finished regions, cleanup.

    Parameters
    ----------
    folder : Path
        ``<out>/<stem>.parts``.
    plan : dict
        JSON-serialisable description of everything the results depend on.
    """

    def __init__(self, folder: str | Path, plan: dict):
        self.folder = Path(folder)
        self.plan = plan
        self.plan_hash = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()

    def open(self) -> set[int]:
        """Prepare the folder; returns the indices of regions already finished.

        A folder left by a different plan is emptied; stray temporary files are removed.
        """
        plan_path = self.folder / PLAN_FILE
        same = False
        if plan_path.is_file():
            try:
                same = json.loads(plan_path.read_text()).get("hash") == self.plan_hash
            except (OSError, json.JSONDecodeError):
                same = False
        if not same and self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for stray in self.folder.glob(".*.tmp"):
            stray.unlink(missing_ok=True)
        if not same:
            text = json.dumps({"hash": self.plan_hash, "plan": self.plan}, indent=1)
            _atomic(plan_path, lambda tmp: tmp.write_text(text))
        return {int(p.stem.split("_")[1]) for p in self.folder.glob("region_*.npz")}

    @property
    def settled(self) -> Path:
        """Folder of the parts with their overlaps settled."""
        return self.folder / SETTLED_DIR

    def open_settled(self) -> set[int]:
        """Prepare ``settled/``; returns the indices of parts already settled there."""
        self.settled.mkdir(parents=True, exist_ok=True)
        for stray in self.settled.glob(".*.tmp"):
            stray.unlink(missing_ok=True)
        return {int(p.stem.split("_")[1]) for p in self.settled.glob("region_*.npz")}

    def infos(self, indices: list[int], settled: bool = False) -> list[PartInfo]:
        """Part infos in ``indices`` order, with slide-wide id offsets assigned.

        ``settled``: of the parts in ``settled/`` (what the outputs are written from).
        """
        folder = self.settled if settled else self.folder
        infos = []
        next_id = 0
        for index in indices:
            info = read_part_info(folder / part_name(index))
            info.first_id = next_id
            next_id += info.count
            infos.append(info)
        return infos

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
