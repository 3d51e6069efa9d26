"""``napari-amasam segment SLIDE ...``: the slide branch of the segment command.

``cli.cmd_segment`` hands slide inputs (vendor formats, pyramidal or very large TIFFs,
OME-Zarr folders; see ``reader.is_slide_file``) to :func:`segment_slides` and keeps plain
images for itself.
Progress goes to stderr (one line per finished region, or a live line on a terminal).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import AmaSamError
from .reader import is_slide_file


def add_slide_arguments(parser) -> None:
    """The slide-only flags of ``segment`` (ignored for plain images)."""
    group = parser.add_argument_group(
        "whole-slide images (.svs, .ndpi, .mrxs, .scn, pyramidal TIFF, OME-Zarr folder)")
    group.add_argument("--roi", metavar="GEOJSON",
                       help="segment only inside these polygons (level-0 pixel coordinates)")
    group.add_argument("--no-tissue-detection", action="store_true",
                       help="segment glass too (default: only regions with tissue)")
    group.add_argument("--scheduler", metavar="ADDRESS",
                       help="Dask scheduler to run the regions on (default: a local cluster; "
                            "'serial' = this process)")
    group.add_argument("--workers", type=int, default=1,
                       help="local Dask worker processes (default 1)")
    group.add_argument("--ome-zarr", action="store_true",
                       help="also write the labels as <stem>_labels.ome.zarr (OME-Zarr 0.4)")
    group.add_argument("--region-size", type=int, default=None,
                       help="region core side in pixels at the model's resolution (default 2048)")


def split_slides(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """(slide files, other inputs) of the command line's inputs, order kept."""
    slides, others = [], []
    for item in inputs:
        # Files, or OME-Zarr folders (a plain folder is a folder of images).
        (slides if Path(item).exists() and is_slide_file(item) else others).append(item)
    return [Path(s) for s in slides], others


def _line(record: dict, name: str) -> str | None:
    stage = record["stage"]
    if stage == "plan":
        share = record["tissue_fraction"]
        tissue = "" if share is None else f", tissue {share:.0%} of the slide"
        resumed = f", {record['done']} already done (resuming)" if record["done"] else ""
        h, w = record["shape"]
        return (f"{name}: {record['regions']} of {record['regions_total']} regions to segment at "
                f"{record['mpp']:.3g} µm/px ({w} x {h} px){tissue}{resumed}")
    if stage == "region":
        return (f"{name}: region {record['done']}/{record['total']}, {record['nuclei']} nuclei, "
                f"eta {record['eta_s']:.0f}s")
    if stage == "write":
        return f"{name}: writing {record['what']}"
    return None


def segment_slides(args, slides: list[Path], thresholds: dict | None) -> int:
    """Segment each slide into ``args.out``; returns the number that failed."""
    from .pipeline import DEFAULT_REGION_SIZE, iter_segment_slide

    interactive = sys.stderr.isatty()
    failed = 0
    for path in slides:
        t0 = time.perf_counter()
        generator = iter_segment_slide(
            path, args.model, args.out, mpp=args.mpp, roi=args.roi,
            tissue=not args.no_tissue_detection,
            region_size=args.region_size or DEFAULT_REGION_SIZE,
            scheduler=args.scheduler, workers=args.workers, checkpoint=args.checkpoint,
            device=args.device, thresholds=thresholds, tile_size=args.tile_size,
            overlap=args.overlap, batch_size=args.batch_size,
            precision=getattr(args, "precision", None), ome_zarr=getattr(args, "ome_zarr", False),
        )
        try:
            while True:
                try:
                    record = next(generator)
                except StopIteration as stop:
                    result = stop.value
                    break
                line = _line(record, path.name)
                if line is None:
                    continue
                if interactive and record["stage"] == "region":
                    print("\r" + line, end="", file=sys.stderr, flush=True)
                else:
                    print(line, file=sys.stderr, flush=True)
        except AmaSamError as exc:
            if interactive:
                print(file=sys.stderr)
            print(f"skipped: {exc}", file=sys.stderr)
            failed += 1
            continue
        finally:
            generator.close()
        if interactive:
            print(file=sys.stderr)
        print(f"{path.name}: {result.nuclei} nuclei in {time.perf_counter() - t0:.1f}s "
              f"({result.regions} regions, {result.tissue_mm2:.3g} mm² to segment) -> "
              f"{result.labels_path}")
    return failed
