"""Speed of the data-side steps the tests used to time (timings belong here, not in tests).

Prints, for the shared MoNuSeg training folder (30 images of 1000 x 1000):

1. ``check_folder`` on the dataset root (reads every image and label once);
2. ``instance_targets`` on one full label map (foreground, centre and boundary distances);
3. ``evaluate_pair`` (all metrics) of that label against a copy shifted by 3 pixels.

Each figure is the median of ``--repeat`` runs, next to the per-image time.

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_data.py [--data ../shared/data/monuseg]
        [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from napari_amasam.data.folders import check_folder
from napari_amasam.data.io import read_labels
from napari_amasam.data.targets import instance_targets
from napari_amasam.metrics import evaluate_pair

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "monuseg"


def median_seconds(function, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="MoNuSeg dataset root (with train/images and train/labels)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    check = check_folder(args.data)
    if not check.pairs:
        parser.error(f"{args.data}: no MoNuSeg image/label pairs ({'; '.join(check.problems)})")
    n = check.n_pairs
    seconds = median_seconds(lambda: check_folder(args.data), args.repeat)
    print(f"check_folder: {n} pairs {dict(check.image_sizes)} in {seconds:.2f} s "
          f"({seconds / max(n, 1) * 1000:.0f} ms per pair)")

    label_path = check.pairs[0].label
    labels = read_labels(label_path)
    n_nuclei = int(labels.max())
    seconds = median_seconds(lambda: instance_targets(labels), args.repeat)
    print(f"instance_targets: {labels.shape[0]}x{labels.shape[1]}, {n_nuclei} nuclei "
          f"({label_path.name}) in {seconds * 1000:.0f} ms")

    shifted = np.roll(labels, 3, axis=1)
    seconds = median_seconds(lambda: evaluate_pair(labels, shifted), args.repeat)
    print(f"evaluate_pair (all metrics): same label vs shifted by 3 px in {seconds * 1000:.0f} ms")


if __name__ == "__main__":
    main()
