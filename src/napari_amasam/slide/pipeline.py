"""Segment a whole slide region by region, with progress, cancel and resume.

::

    slide file -> open (mpp) -> area (tissue at low resolution, and/or user polygons)
      -> regions (core squares at the model's mpp)                      [regions.py]
      -> each region: read core + halo, Predictor, keep owned nuclei
         -> part file (atomic)                 [worker.py, run by Dask: scheduler.py]
      -> overlaps between neighbouring parts settled, one rule    [ownership.py]
      -> <stem>_labels.tif (pyramidal BigTIFF), <stem>.geojson, <stem>.csv  [writers.py]

Memory is that of one region per worker plus one strip of the output, whatever the slide
size. :func:`iter_segment_slide` is a generator of progress records; closing it cancels the
run (finished regions stay on disk and a later run with the same settings resumes from them).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AmaSamError
from .classical_threshold import slide_threshold as classical_threshold
from .ome_zarr import stamp_file
from .ownership import settle_overlaps
from .parts import PART_FORMAT, PartStore
from .reader import SlideError, open_slide, slide_stem
from .regions import Area, check_inside, plan_regions, read_roi
from .scheduler import SERIAL, default_threads, run_tasks
from .tissue import TISSUE_MPP, detect_tissue
from .worker import DEFAULT_HALO, SlideJob, clear_cache, segment_region

#: Region core side at the processing resolution (pixels): ~2.3k x 2.3k windows keep a
#: worker's memory near 1 GB with the network maps, and make tasks of seconds to a minute.
DEFAULT_REGION_SIZE = 2048

Record = dict[str, Any]


@dataclass
class SlideResult:
    """What a finished slide run wrote and measured.

    Attributes
    ----------
    labels_path, geojson_path, csv_path, ome_zarr_path : Path or None
    nuclei : int
    shape : (height, width)
        Labels size at the processing resolution.
    mpp : float
        Microns per labels pixel; ``downsample`` level-0 pixels per labels pixel.
    regions, regions_total : int
        Regions segmented / in the full grid.
    area_mm2 : float
        Area of the regions' cores that lie in the slide (what was segmented).
    tissue_fraction : float or None
        Share of the slide detected as tissue (None without tissue detection).
    tissue_mm2 : float
        Area that was to be segmented (tissue and/or user area; the whole slide without
        either), the denominator of seconds per mm².
    seconds : float
        Wall time of this call (resumed regions not included).
    """

    labels_path: Path | None
    geojson_path: Path | None
    csv_path: Path | None
    nuclei: int
    shape: tuple[int, int]
    mpp: float
    downsample: float
    regions: int
    regions_total: int
    area_mm2: float
    tissue_fraction: float | None
    tissue_mm2: float
    seconds: float
    ome_zarr_path: Path | None = None


def model_mpp(model: str) -> float | None:
    """Microns per pixel a model (folder, or ``"classical"``) was trained at."""
    if model == "classical":
        from ..inference.predictor import CLASSICAL_MPP

        return CLASSICAL_MPP
    from ..model_folder import read_model_folder

    return read_model_folder(model).mpp


def _plan_key(slide_path: Path, job: SlideJob, regions: list[int], shape, extra: dict) -> dict:
    # An OME-Zarr folder is stamped by its metadata file (the folder's own time changes
    # only when entries come or go).
    stat = (stamp_file(slide_path) if slide_path.is_dir() else slide_path).stat()
    model = Path(job.model)
    model_stamp = None
    if job.model != "classical":
        weights = [p for p in model.glob("*.pt")] + [p for p in model.glob("*.json")]
        model_stamp = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights)
    fields = dataclasses.asdict(job)
    for volatile in ("parts_dir", "threads", "device", "batch_size"):
        fields.pop(volatile)
    return {"slide": [str(slide_path.resolve()), stat.st_size, stat.st_mtime_ns],
            "model_files": model_stamp, "job": fields, "regions": regions,
            "shape": list(shape), "part_format": PART_FORMAT, **extra}


def iter_segment_slide(
    slide_path: str | Path,
    model: str,
    out_dir: str | Path,
    *,
    mpp: float | None = None,
    process_mpp: float | None = None,
    roi: str | Path | Area | None = None,
    tissue: bool = True,
    region_size: int = DEFAULT_REGION_SIZE,
    halo: int = DEFAULT_HALO,
    scheduler: str | None = None,
    workers: int = 1,
    checkpoint: str | None = None,
    device: str = "auto",
    thresholds: dict | None = None,
    tile_size: int | None = None,
    overlap: int | None = None,
    batch_size: int = 4,
    precision: str | None = None,
    geojson: bool = True,
    csv: bool = True,
    ome_zarr: bool = False,
    stem: str | None = None,
    slide_threshold: bool = True,
) -> Generator[Record, None, SlideResult]:
    """Segment a slide; yields progress records, returns a :class:`SlideResult`.

    Parameters
    ----------
    slide_path : str or Path
        A vendor slide, a (pyramidal) TIFF or an OME-Zarr folder.
    model : str
        Model folder or ``"classical"``.
    out_dir : str or Path
        Receives ``<stem>_labels.tif``, ``<stem>.geojson``, ``<stem>.csv``.
    mpp : float, optional
        Microns per level-0 pixel, overriding (or standing in for) the metadata.
    process_mpp : float, optional
        Processing resolution (default: the model's mpp, else the slide's).
    roi : path or Area, optional
        GeoJSON polygons (level-0 pixels) or an :class:`Area`; only nuclei with their
        centroid inside are kept. Combined with tissue detection when ``tissue``.
    tissue : bool
        Skip regions without tissue (low-resolution detection).
    region_size, halo : int
        Region core side and context, processing pixels.
    scheduler : str or None
        None: a local Dask cluster with ``workers`` processes; an address: that cluster;
        ``"serial"``: this process, no Dask.
    checkpoint, device, thresholds, tile_size, overlap, batch_size, precision
        Predictor settings (see ``Predictor``).
    geojson, csv : bool
        Also write those outputs.
    ome_zarr : bool
        Also write the labels as ``<stem>_labels.ome.zarr`` (OME-Zarr, NGFF 0.4).
    stem : str, optional
        Output name stem (default: the slide's file stem).
    slide_threshold : bool
        Classical baseline only: one haematoxylin threshold for the whole slide (default;
        :mod:`.classical_threshold`), or False for Otsu per region window (the old
        behaviour, kept for ``benchmarks/bench_slide.py``'s before/after figure).

    Yields
    ------
    dict
        ``{"stage": "plan", "regions", "regions_total", "done", "tissue_fraction",
        "classical_threshold"}``, then
        ``{"stage": "region", "done", "total", "nuclei", "eta_s"}`` per finished region,
        then ``{"stage": "write", "what"}`` per output file.
    """
    started = time.monotonic()
    slide_path = Path(slide_path)
    out_dir = Path(out_dir)
    stem = stem or slide_stem(slide_path)
    with open_slide(slide_path, mpp=mpp) as slide:
        slide_mpp = slide.mpp
        target = process_mpp or model_mpp(model) or slide_mpp
        downsample = target / slide_mpp
        shape = slide.scaled_shape(downsample)
        area: Area | None = None
        if roi is not None:
            area = roi if isinstance(roi, Area) else read_roi(roi)
            check_inside(area, slide.shape, roi if not isinstance(roi, Area) else slide_path)
        # What to segment, as a low-resolution mask: tissue, the user's polygons, or both.
        mask_downsample = max(1.0, TISSUE_MPP / slide_mpp)
        include = None
        tissue_fraction = None
        if tissue:
            detected = detect_tissue(slide)
            include, mask_downsample = detected.mask, detected.downsample
            tissue_fraction = detected.fraction
        if area is not None:
            drawn = area.rasterize(slide.scaled_shape(mask_downsample), mask_downsample)
            include = drawn if include is None else include & drawn
        if include is not None:
            tissue_mm2 = float(include.sum()) * (mask_downsample * slide_mpp) ** 2 / 1e6
        else:
            tissue_mm2 = slide.shape[0] * slide.shape[1] * slide_mpp**2 / 1e6
    include_downsample = mask_downsample / downsample
    regions, total = plan_regions(shape, region_size, include, include_downsample)
    threshold = None
    if model == "classical" and slide_threshold:
        # Windows at the processing resolution, which the worker hands to the baseline as
        # its own (scale 1), as here.
        with open_slide(slide_path, mpp=slide_mpp) as slide:
            threshold = classical_threshold(slide, downsample, regions)
    job = SlideJob(
        slide_path=str(slide_path), slide_mpp=slide_mpp, downsample=downsample, model=str(model),
        parts_dir=str(out_dir / f"{stem}.parts"), checkpoint=checkpoint, device=device,
        thresholds=thresholds, tile_size=tile_size, overlap=overlap, batch_size=batch_size,
        halo=halo, polygons=None if area is None else [p.tolist() for p in area.polygons],
        threads=0 if scheduler == SERIAL else default_threads(workers), precision=precision,
        classical_threshold=threshold,
    )
    store = PartStore(out_dir / f"{stem}.parts",
                      _plan_key(slide_path, job, [r.index for r in regions], shape,
                                {"process_mpp": target}))
    out_dir.mkdir(parents=True, exist_ok=True)
    finished = store.open() & {r.index for r in regions}
    pending = [r for r in regions if r.index not in finished]
    yield {"stage": "plan", "regions": len(regions), "regions_total": total,
           "done": len(finished), "tissue_fraction": tissue_fraction, "mpp": target,
           "shape": shape, "classical_threshold": threshold}

    nuclei = sum(info.count for info in store.infos(sorted(finished)))
    done = len(finished)
    run_started = time.monotonic()
    results = run_tasks(segment_region, job, pending, scheduler=scheduler, workers=workers)
    try:
        for summary in results:
            done += 1
            nuclei += summary["nuclei"]
            ran = done - len(finished)
            elapsed = time.monotonic() - run_started
            eta = elapsed / ran * (len(regions) - done)
            yield {"stage": "region", "done": done, "total": len(regions), "nuclei": nuclei,
                   "eta_s": eta, "elapsed_s": elapsed}
    finally:
        results.close()
        if scheduler == SERIAL:
            clear_cache()

    # One owner per nucleus and per pixel where regions' results overlap, decided once for
    # the TIFF, the GeoJSON and the CSV alike (resumable: settled parts are files too).
    yield {"stage": "write", "what": "overlap-free regions"}
    indices = sorted(r.index for r in regions)
    cores = {r.index: (r.y0, r.x0, r.y1, r.x1) for r in regions}
    with open_slide(slide_path, mpp=slide_mpp) as slide:
        for _ in settle_overlaps(store, store.infos(indices), cores,
                                 lambda y, x, h, w: slide.read_scaled(y, x, h, w, downsample),
                                 downsample):
            pass
    infos = store.infos(indices, settled=True)
    from .writers import write_csv, write_geojson, write_labels_ome_zarr, write_labels_pyramid

    yield {"stage": "write", "what": "labels"}
    labels_path = write_labels_pyramid(out_dir / f"{stem}_labels.tif", shape, infos, target)
    zarr_path = None
    if ome_zarr:
        yield {"stage": "write", "what": "OME-Zarr labels"}
        zarr_path = write_labels_ome_zarr(out_dir / f"{stem}_labels.ome.zarr", shape, infos,
                                          target)
    geojson_path = csv_path = None
    if geojson:
        yield {"stage": "write", "what": "geojson"}
        geojson_path = write_geojson(out_dir / f"{stem}.geojson", infos, target, downsample)
    if csv:
        yield {"stage": "write", "what": "csv"}
        csv_path = write_csv(out_dir / f"{stem}.csv", infos, target, downsample)
    store.remove()
    area_px = sum((r.y1 - r.y0) * (r.x1 - r.x0) for r in regions)
    return SlideResult(
        labels_path=labels_path, geojson_path=geojson_path, csv_path=csv_path,
        ome_zarr_path=zarr_path, nuclei=sum(i.count for i in infos), shape=shape, mpp=target,
        downsample=downsample,
        regions=len(regions), regions_total=total, area_mm2=area_px * target * target / 1e6,
        tissue_fraction=tissue_fraction, tissue_mm2=tissue_mm2, seconds=time.monotonic() - started,
    )


def segment_slide(*args: Any, **kwargs: Any) -> SlideResult:
    """:func:`iter_segment_slide` run to the end."""
    generator = iter_segment_slide(*args, **kwargs)
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value


__all__ = ["SlideResult", "iter_segment_slide", "segment_slide", "SlideError", "AmaSamError"]
