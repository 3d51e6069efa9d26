"""Inference speed and memory of the tiled predictor.

Two measurements, printed as plain text:

1. Time per megapixel on a real 1000 x 1000 MoNuSeg image with the random-weight ``tiny``
   model at 256-pixel tiles, split into the network part (tiling, forward passes, blending)
   and post-processing (watershed at native resolution); the classical baseline for
   reference.
2. Peak resident-memory growth (``resource.getrusage``) while predicting maps for a large
   image (default 4000 x 4000, the MoNuSeg image repeated), next to the size of the output
   maps themselves: the stitcher keeps only the (C, H, W) float32 maps and one batch of tile
   outputs, so the growth should be close to the maps' size and not grow with the tile count.

Usage::

    .venv/bin/python benchmarks/bench_inference.py [--image PATH] [--large-size 4000]
        [--tile 256] [--batch-size 4] [--skip-large] [--threads N]
"""

from __future__ import annotations

import argparse
import glob
import resource
import sys
import time

import numpy as np
import torch

from napari_amasam.config import ModelConfig
from napari_amasam.data.io import read_image
from napari_amasam.inference.predictor import Predictor
from napari_amasam.inference.tiling import tile_grid
from napari_amasam.model import build_amasam

DEFAULT_IMAGE_GLOB = "/work/shared/data/monuseg/train/images/*.png"


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB; ru_maxrss is KiB on Linux)."""
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=None, help="H&E image (default: first MoNuSeg train image)")
    parser.add_argument("--tile", type=int, default=256, help="tiny model input / tile size")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--large-size", type=int, default=4000)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.image or sorted(glob.glob(DEFAULT_IMAGE_GLOB))[0]
    image = read_image(path)[:1000, :1000]
    height, width = image.shape[:2]
    megapixels = height * width / 1e6

    torch.manual_seed(0)
    config = ModelConfig(backbone="tiny", image_size=args.tile)
    predictor = Predictor(build_amasam(config), config, device="cpu")
    overlap = predictor._tile_parameters(None, None)[1]
    n_tiles = len(tile_grid(height, width, args.tile, overlap))
    print(f"device cpu, torch threads {torch.get_num_threads()}, tiny model, tile {args.tile}, "
          f"overlap {overlap}, batch {args.batch_size}")

    # Warm-up (first-call allocations and kernel selection are not part of the figures).
    predictor.predict_maps(image[:args.tile, :args.tile], batch_size=1)

    maps, network_s = timed(predictor.predict_maps, image, batch_size=args.batch_size)
    labels, post_s = timed(predictor.postprocess, maps)
    print(f"\n{path.split('/')[-1]} {height}x{width} ({megapixels:.2f} MP, {n_tiles} tiles):")
    print(f"  network (tiles + blending): {network_s:7.2f} s  = {network_s / megapixels:7.2f} s/MP"
          f"  ({network_s / n_tiles:.3f} s/tile)")
    print(f"  post-processing           : {post_s:7.2f} s  = {post_s / megapixels:7.2f} s/MP"
          f"  ({int(labels.max())} objects from random weights)")
    classical = Predictor.classical()
    classical_labels, classical_s = timed(classical.segment, image)
    print(f"  classical baseline        : {classical_s:7.2f} s  = {classical_s / megapixels:7.2f} s/MP"
          f"  ({int(classical_labels.max())} nuclei)")
    del maps, labels, classical_labels

    if args.skip_large:
        return 0
    side = args.large_size
    repeats = -(-side // height), -(-side // width)
    large = np.ascontiguousarray(np.tile(image, (*repeats, 1))[:side, :side])
    large_tiles = len(tile_grid(side, side, args.tile, overlap))
    maps_mib = 3 * side * side * 4 / 2**20
    all_tiles_mib = large_tiles * 3 * args.tile * args.tile * 4 / 2**20
    before = peak_rss_mib()
    start = time.perf_counter()
    maps = predictor.predict_maps(large, batch_size=args.batch_size)
    network_s = time.perf_counter() - start
    after_maps = peak_rss_mib()
    labels, post_s = timed(predictor.postprocess, maps)
    after_post = peak_rss_mib()
    print(f"\nlarge image {side}x{side} ({side * side / 1e6:.0f} MP, {large_tiles} tiles):")
    print(f"  network {network_s:.1f} s ({network_s / (side * side / 1e6):.2f} s/MP), "
          f"post-processing {post_s:.1f} s ({post_s / (side * side / 1e6):.2f} s/MP)")
    print(f"  peak RSS before {before:.0f} MiB; growth during maps {after_maps - before:.0f} MiB "
          f"(output maps alone {maps_mib:.0f} MiB; every tile's logits held would be "
          f"{all_tiles_mib:.0f} MiB more)")
    print(f"  further growth during post-processing {after_post - after_maps:.0f} MiB "
          f"({int(labels.max())} objects)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
