"""Whole-slide segmentation: memory vs slide size, seams, throughput, tissue skipped.

Figures (printed, side by side in one run; nothing is asserted):

1. **Memory.** Peak resident memory (RSS summed over the process tree: the CLI process, the
   Dask nanny and worker) of ``napari-amasam segment SLIDE --model classical --out D`` on
   synthetic slides of ``--sizes`` pixels a side (default 10240 and 20480), and its growth
   from the smallest to the largest. Targets: < 2.5 GB, growth <= 30 %.
2. **Seams.** Whole real MoNuSeg images (1000 px, 0.25 µm/px; the shared copy, else the
   bundled 512 px tiles) as pyramidal TIFFs, segmented by the slide path in 256 px regions
   (region borders cross real nuclei) vs each image alone in one call; AJI against ground
   truth. Target: slide path within 0.01 AJI of the image alone. A third run gives every
   region a window holding the whole image, which isolates what stitching (ownership by
   centroid, overlap settling) costs from what a smaller window changes in the segmenter.
   For the classical baseline a fourth run gives the regions Otsu thresholds of their own
   windows (the behaviour before the slide-wide threshold): before vs after in one run.
   (An earlier version joined tiles of six patients into one mosaic: the joins between
   unrelated images, and the classical baseline's per-window threshold over them, made
   "slide vs per-tile" measure the mosaic rather than the seams.)
3. **Throughput** in seconds per mm² of tissue (the area left after tissue detection) at
   the model's resolution, and the share of the slide skipped as glass, for the classical
   baseline and (``--model DIR``) a trained tiny model.

The synthetic slides are tiled from the same real tiles (random flips), laid out as tissue
discs on glass, written as tiled pyramidal BigTIFFs at 0.25 µm/px without ever holding the
slide in memory.

Usage::

    PYTHONPATH=src python benchmarks/bench_slide.py --work /tmp/bench_slide \\
        [--sizes 10240 20480] [--model TINY_MODEL_DIR] [--skip-memory] [--skip-seams]
        [--seam-images 4] [--seam-images-model 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests.slide_data import MONUSEG_MPP, monuseg_tiles  # noqa: E402

SOURCE = 512  # side of the real tiles


# ------------------------------------------------------------------------ synthetic slides
def _tissue_grid(cells: int, seed: int = 0, pattern_cells: int = 20) -> np.ndarray:
    """Which 512 px cells hold tissue: two discs (~41 cells, 10.8 Mpx, 0.67 mm²) in the
    top-left ``pattern_cells`` square, glass elsewhere.

    Every slide size gets the same tissue, so the work per run is the same and the peak
    memory compares what grows with the slide itself (tissue mask, region plan, output
    pyramid strips); it also keeps a 20k x 20k run to minutes on 2 shared cores.
    """
    rng = np.random.default_rng(seed)
    n = min(cells, pattern_cells)
    yy, xx = np.mgrid[:n, :n] + 0.5
    pattern = np.zeros((n, n), bool)
    for _ in range(2):
        cy, cx = rng.uniform(0.3, 0.7, 2) * n
        radius = n * 0.13
        pattern |= (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    grid = np.zeros((cells, cells), bool)
    grid[:n, :n] = pattern
    return grid


def write_synthetic_slide(path: Path, size: int, seed: int = 0) -> float:
    """A ``size x size`` pyramidal tiled BigTIFF of real tiles on glass; returns tissue share."""
    tiles = [t[0] for t in monuseg_tiles(7)]
    cells = size // SOURCE
    grid = _tissue_grid(cells, seed)
    rng = np.random.default_rng(seed)
    choice = rng.integers(0, len(tiles), (cells, cells))
    flips = rng.integers(0, 4, (cells, cells))
    glass = np.full((SOURCE, SOURCE, 3), 240, np.uint8)

    levels = 1
    while size // 2**levels >= 1024:
        levels += 1
    # Each source tile (and glass) pre-shrunk per level: a level-k TIFF tile is
    # 2^k x 2^k cells of 512 / 2^k pixels, so no level is ever built whole.
    shrunk = {}
    for level in range(levels):
        step = 2**level
        side = SOURCE // step
        shrunk[level] = [np.rint(t.reshape(side, step, side, step, 3).mean(axis=(1, 3)))
                         .astype(np.uint8) for t in tiles + [glass]]

    def cell(r: int, c: int, level: int) -> np.ndarray:
        if not grid[r, c]:
            return shrunk[level][-1]
        tile = shrunk[level][choice[r, c]]
        f = flips[r, c]
        return tile[:: (-1 if f & 1 else 1), :: (-1 if f & 2 else 1)]

    def level_tiles(level: int):
        step = 2**level
        for r in range(0, cells, step):
            for c in range(0, cells, step):
                block = np.full((SOURCE, SOURCE, 3), 240, np.uint8)
                side = SOURCE // step
                for i in range(min(step, cells - r)):
                    for j in range(min(step, cells - c)):
                        block[i * side:(i + 1) * side, j * side:(j + 1) * side] = cell(
                            r + i, c + j, level)
                yield block

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level in range(levels):
            side = cells * SOURCE // 2**level
            options = dict(shape=(side, side, 3), dtype=np.uint8, tile=(SOURCE, SOURCE),
                           photometric="rgb", compression="zlib", metadata=None,
                           resolution=(1e4 / (MONUSEG_MPP * 2**level),) * 2,
                           resolutionunit="CENTIMETER")
            if level == 0:
                options["subifds"] = levels - 1
            else:
                options["subfiletype"] = 1
            tif.write(level_tiles(level), **options)
    return float(grid.mean())


# ---------------------------------------------------------------------------- memory
def _tree_rss(process) -> int:
    import psutil

    total = 0
    try:
        tree = [process] + process.children(recursive=True)
    except psutil.Error:  # the run ended between two polls
        return 0
    for p in tree:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_cli_measured(args: list[str]) -> tuple[float, int, str]:
    """Run the CLI; (seconds, peak tree RSS in bytes, stdout+stderr tail)."""
    import psutil

    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "napari_amasam.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    handle = psutil.Process(proc.pid)
    peak = 0
    stop = threading.Event()

    def poll():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(handle))
            stop.wait(0.2)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    output = proc.communicate()[0]
    stop.set()
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"CLI failed ({proc.returncode}): {output[-2000:]}")
    return time.perf_counter() - t0, peak, output[-600:]


def _result_line(output: str) -> str:
    return [line for line in output.splitlines() if " nuclei in " in line][-1]


def memory_and_throughput(work: Path, sizes: list[int], workers: int) -> list[dict]:
    rows = []
    for size in sizes:
        slide = work / f"synthetic_{size}.tif"
        if not slide.exists():
            share = write_synthetic_slide(slide, size)
        else:
            share = float(_tissue_grid(size // SOURCE).mean())
        out = work / f"out_{size}"
        seconds, peak, output = run_cli_measured(
            ["segment", str(slide), "--model", "classical", "--out", str(out),
             "--workers", str(workers)])
        line = _result_line(output)
        mm2 = float(line.split(" mm² to segment")[0].split(", ")[-1])
        rows.append({"size": size, "seconds": seconds, "peak_gb": peak / 1e9,
                     "tissue_mm2": mm2, "slide_mm2": (size * MONUSEG_MPP / 1e3) ** 2,
                     "tissue_cells_share": share, "line": line})
        print(f"  {size} x {size}: peak RSS {peak / 1e9:.2f} GB, {seconds:.0f} s, "
              f"{mm2:.2f} mm² to segment of {(size * MONUSEG_MPP / 1e3) ** 2:.1f} mm² "
              f"({seconds / mm2:.1f} s/mm², glass skipped {1 - mm2 / rows[-1]['slide_mm2']:.0%})",
              flush=True)
    return rows


# ----------------------------------------------------------------------------- seams
SHARED_MONUSEG = Path("/work/shared/data/monuseg/train")


def real_images(n: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, RGB image, labels) of ``n`` whole real MoNuSeg images (1000 px, 40x).

    The shared copy of the 30 training images when present, else the bundled 512 px tiles.
    """
    import imageio.v3 as iio

    images = sorted((SHARED_MONUSEG / "images").glob("*.png")) if SHARED_MONUSEG.is_dir() else []
    if not images:
        return [(f"bundled_{i}", image, labels) for i, (image, labels)
                in enumerate(monuseg_tiles(n))]
    out = []
    for path in images[:n]:
        labels = tifffile.imread(SHARED_MONUSEG / "labels" / f"{path.stem}.tif")
        out.append((path.stem, np.ascontiguousarray(iio.imread(path)[..., :3]),
                    labels.astype(np.int32)))
    return out


def seams(work: Path, model: str, n_images: int, region_size: int = 256) -> dict:
    """Region borders on real images: the slide path vs the same image segmented alone.

    Each real image is written as a pyramidal TIFF and segmented three ways by one
    predictor: (a) the image alone in one call (the reference); (b) the slide path with
    ``region_size`` regions and the default halo, so region borders cross real nuclei, as
    on a slide (no artificial joins between unrelated images); (c) the same regions with a
    halo covering the whole image, so every region's window holds exactly the pixels of (a)
    and only the region borders, ownership and overlap settling differ: (c) - (a) is what
    the stitching itself costs, (b) - (c) what a smaller window changes in the segmenter's
    own output. For the classical baseline, (d) is (b) with Otsu's threshold computed per
    region window instead of once for the slide (``slide_threshold=False``, the behaviour
    before): (b) - (d) is what the slide-wide threshold recovers.
    """
    from napari_amasam.data.dataset import rescale_labels
    from napari_amasam.inference.predictor import Predictor
    from napari_amasam.metrics import evaluate_pair
    from napari_amasam.slide.pipeline import segment_slide
    from napari_amasam.slide.worker import DEFAULT_HALO
    from tests.slide_data import write_pyramidal_tiff

    name = "classical" if model == "classical" else "tiny"
    predictor = Predictor.classical() if model == "classical" else Predictor.from_folder(
        model, device="cpu")
    rows = []
    seconds = {"alone": 0.0, "slide": 0.0}
    for stem, image, gt in real_images(n_images):
        path = work / f"real_{stem}.tif"
        if not path.exists():
            write_pyramidal_tiff(path, image, MONUSEG_MPP)
        t0 = time.perf_counter()
        alone = predictor.segment(image, input_mpp=MONUSEG_MPP)
        seconds["alone"] += time.perf_counter() - t0
        runs = {}
        kinds = [("slide", DEFAULT_HALO, True), ("whole_window", max(image.shape), True)]
        if model == "classical":
            kinds.append(("window_otsu", DEFAULT_HALO, False))
        for kind, halo, one_threshold in kinds:
            result = segment_slide(path, model, work / f"real_out_{name}_{kind}",
                                   region_size=region_size, halo=halo, scheduler="serial",
                                   tissue=False, device="cpu", slide_threshold=one_threshold)
            if kind == "slide":
                seconds["slide"] += result.seconds
            labels = tifffile.imread(result.labels_path).astype(np.int32)
            if labels.shape != gt.shape:  # written at the model's working scale (e.g. 20x)
                labels = rescale_labels(labels, gt.shape[0] / labels.shape[0])
            runs[kind] = labels
        row = {"image": stem, "alone": evaluate_pair(gt, alone)["aji"],
               "slide": evaluate_pair(gt, runs["slide"])["aji"],
               "whole_window": evaluate_pair(gt, runs["whole_window"])["aji"],
               "slide_vs_alone_agreement": evaluate_pair(alone, runs["slide"])["aji"],
               "whole_window_identical": bool(
                   evaluate_pair(alone, runs["whole_window"])["aji"] == 1.0)}
        before = ""
        if "window_otsu" in runs:
            row["window_otsu"] = evaluate_pair(gt, runs["window_otsu"])["aji"]
            before = (f", before (Otsu per region window) {row['window_otsu']:.4f} "
                      f"({row['window_otsu'] - row['alone']:+.4f})")
        rows.append(row)
        print(f"    {stem}: alone {row['alone']:.4f}, slide {row['slide']:.4f} "
              f"({row['slide'] - row['alone']:+.4f}), slide with whole-image windows "
              f"{row['whole_window']:.4f} ({row['whole_window'] - row['alone']:+.4f}){before}",
              flush=True)
    keys = ["alone", "slide", "whole_window", "slide_vs_alone_agreement"]
    if all("window_otsu" in r for r in rows):
        keys.append("window_otsu")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    figures = {"images": rows, "mean": mean, "region_size": region_size,
               "identical_with_whole_windows": sum(r["whole_window_identical"] for r in rows),
               "seconds": seconds}
    print(f"  {name}, {len(rows)} real images, {region_size} px regions: mean AJI alone "
          f"{mean['alone']:.4f}, slide path {mean['slide']:.4f} "
          f"({mean['slide'] - mean['alone']:+.4f}), slide path with whole-image windows "
          f"{mean['whole_window']:.4f} ({mean['whole_window'] - mean['alone']:+.4f}; labels "
          f"identical to alone on {figures['identical_with_whole_windows']}/{len(rows)}); "
          f"slide vs alone agreement AJI {mean['slide_vs_alone_agreement']:.4f}", flush=True)
    if "window_otsu" in mean:
        print(f"  {name}: slide path before (Otsu per region window) {mean['window_otsu']:.4f} "
              f"({mean['window_otsu'] - mean['alone']:+.4f}), after (one threshold for the "
              f"slide) {mean['slide']:.4f} ({mean['slide'] - mean['alone']:+.4f})", flush=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/bench_slide")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10240, 20480])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model", help="trained model folder (e.g. tiny) for seams/throughput")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-seams", action="store_true")
    parser.add_argument("--seam-images", type=int, default=4,
                        help="real images for the seams figure (classical; 0 = skip)")
    parser.add_argument("--seam-images-model", type=int, default=2,
                        help="real images for the seams figure (--model)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"cpu_count": os.cpu_count()}
    if not args.skip_seams:
        print("seams: whole real MoNuSeg images (0.25 µm/px) segmented alone vs by the slide "
              "path")
        report["seams"] = {}
        if args.seam_images > 0:
            report["seams"]["classical"] = seams(work, "classical", args.seam_images)
        if args.model and args.seam_images_model > 0:
            report["seams"]["tiny"] = seams(work, args.model, args.seam_images_model)
    if not args.skip_memory:
        print(f"memory and throughput: synthetic slides, classical, {args.workers} local worker(s)")
        rows = memory_and_throughput(work, sorted(args.sizes), args.workers)
        report["memory"] = rows
        if len(rows) > 1:
            growth = rows[-1]["peak_gb"] / rows[0]["peak_gb"] - 1
            print(f"  peak RSS growth {rows[0]['size']} -> {rows[-1]['size']}: {growth:+.0%} "
                  f"(slide area x{(rows[-1]['size'] / rows[0]['size']) ** 2:.0f})")
            report["growth"] = growth
    (work / "bench_slide.json").write_text(json.dumps(report, indent=1))
    print(f"figures in {work / 'bench_slide.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
