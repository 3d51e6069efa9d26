"""Rebuild the bundled demo and sample data from the shared datasets (repository tool).

Not needed to run anything: the outputs are committed. It documents exactly which files and
crops were taken, so the data can be re-derived and its provenance checked.

    python resources/demo/make_demo_data.py --shared ../shared/data
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile
from skimage.segmentation import relabel_sequential

HERE = Path(__file__).resolve().parent
PACKAGE_SAMPLES = HERE.parents[1] / "src" / "napari_amasam" / "_sample_data"

# MoNuSeg 2018 training tiles (1000x1000, 40x). The official test split is never used here.
MONUSEG_TRAIN = [
    "TCGA-18-5592-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1", "TCGA-21-5786-01Z-00-DX1",
    "TCGA-38-6178-01Z-00-DX1", "TCGA-49-4488-01Z-00-DX1", "TCGA-50-5931-01Z-00-DX1",
    "TCGA-A7-A13E-01Z-00-DX1", "TCGA-A7-A13F-01Z-00-DX1", "TCGA-AR-A1AK-01Z-00-DX1",
    "TCGA-AR-A1AS-01Z-00-DX1",
]
# Held out from demo training: 512-px centre crops used by tests, benchmarks and the widgets'
# screenshots (the demo itself evaluates on the whole held-out tiles, BENCH_HELDOUT).
MONUSEG_HELDOUT = [
    "TCGA-B0-5711-01Z-00-DX1", "TCGA-E2-A14V-01Z-00-DX1", "TCGA-G9-6336-01Z-00-DX1",
    "TCGA-HE-7128-01Z-00-DX1",
]
TNBC_AUX = ["01_1", "02_1", "03_1", "04_1", "05_1", "06_1", "07_1", "08_1"]
# The demo's training set: every MoNuSeg training tile outside benchmarks/bench_quality.py's
# held-out set (which contains MONUSEG_HELDOUT), whole, at 20x (0.5 µm/px: the tiny*
# backbones' working scale) as JPEG (quality 90): four times the tissue of a 40x crop per
# file, and the network would shrink 40x data to 20x anyway. Downscaled as training does it
# (data.dataset.rescale_image / rescale_labels). TCGA slides are JPEG-compressed at source.
BENCH_HELDOUT = {
    "TCGA-B0-5711-01Z-00-DX1", "TCGA-HE-7128-01Z-00-DX1", "TCGA-E2-A14V-01Z-00-DX1",
    "TCGA-G9-6336-01Z-00-DX1", "TCGA-NH-A8F7-01A-01-TS1", "TCGA-RD-A8N9-01A-01-TS1",
    "TCGA-G2-A2EK-01A-02-TSB",
}
JPEG_QUALITY = 90
CROP = 512
# Package sample data: two crops of held-out tiles (so the widgets' demo never shows training data).
SAMPLES = [("TCGA-B0-5711-01Z-00-DX1", "monuseg_breast"), ("TCGA-G9-6336-01Z-00-DX1", "monuseg_prostate")]


def crop_pair(image: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre crop; nuclei cut by the crop border stay as partial instances (as in tiling)."""
    h, w = labels.shape
    top, left = (h - size) // 2, (w - size) // 2
    img = image[top : top + size, left : left + size, :3]
    lab = relabel_sequential(labels[top : top + size, left : left + size])[0]
    return np.ascontiguousarray(img), lab.astype(np.uint16)


def save_pair(image, labels, folder: Path, stem: str) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    iio.imwrite(folder / "images" / f"{stem}.png", image)
    tifffile.imwrite(folder / "labels" / f"{stem}.tif", labels, compression="zlib")


def save_monuseg_20x(monuseg: Path, folder: Path) -> None:
    """Whole MoNuSeg training tiles outside the benchmark's held-out set, at 20x."""
    from napari_amasam.data.dataset import rescale_image, rescale_labels

    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    for path in sorted((monuseg / "images").iterdir()):
        if path.stem in BENCH_HELDOUT:
            continue
        image = rescale_image(iio.imread(path)[..., :3], 0.5)
        labels = rescale_labels(tifffile.imread(monuseg / "labels" / f"{path.stem}.tif"), 0.5)
        iio.imwrite(folder / "images" / f"{path.stem}.jpg", image, quality=JPEG_QUALITY)
        labels = relabel_sequential(labels)[0].astype(np.uint16)
        tifffile.imwrite(folder / "labels" / f"{path.stem}.tif", labels, compression="zlib")


def save_monuseg_heldout_whole(monuseg: Path, folder: Path) -> None:
    """The demo's evaluation set: benchmarks/bench_quality.py's 7 held-out tiles, whole, at
    their own 40x (segmented at 0.25 µm/px as the benchmark does), images as JPEG."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    for stem in sorted(BENCH_HELDOUT):
        image = iio.imread(monuseg / "images" / f"{stem}.png")[..., :3]
        labels = relabel_sequential(tifffile.imread(monuseg / "labels" / f"{stem}.tif"))[0]
        iio.imwrite(folder / "images" / f"{stem}.jpg", image, quality=JPEG_QUALITY)
        tifffile.imwrite(folder / "labels" / f"{stem}.tif", labels.astype(np.uint16),
                         compression="zlib")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default=str(HERE.parents[2] / "shared" / "data"))
    args = parser.parse_args()
    shared = Path(args.shared)
    mon = shared / "monuseg" / "train"
    out = HERE / "data"
    if out.exists():
        shutil.rmtree(out)
    for names, split in ((MONUSEG_TRAIN, "monuseg_train"), (MONUSEG_HELDOUT, "monuseg_heldout")):
        for name in names:
            img = iio.imread(mon / "images" / f"{name}.png")
            lab = tifffile.imread(mon / "labels" / f"{name}.tif")
            save_pair(*crop_pair(img, lab, CROP), out / split, name)
    save_monuseg_20x(mon, out / "monuseg_train_20x")
    save_monuseg_heldout_whole(mon, out / "monuseg_heldout_whole")
    for name in TNBC_AUX:
        img = iio.imread(shared / "tnbc" / "images" / f"{name}.png")[..., :3]
        lab = tifffile.imread(shared / "tnbc" / "labels" / f"{name}.tif").astype(np.uint16)
        save_pair(img, lab, out / "tnbc_aux", name)
    for name, stem in SAMPLES:
        img = iio.imread(mon / "images" / f"{name}.png")
        lab = tifffile.imread(mon / "labels" / f"{name}.tif")
        img, lab = crop_pair(img, lab, CROP)
        iio.imwrite(PACKAGE_SAMPLES / f"{stem}.png", img)
        tifffile.imwrite(PACKAGE_SAMPLES / f"{stem}_labels.tif", lab, compression="zlib")


if __name__ == "__main__":
    main()
