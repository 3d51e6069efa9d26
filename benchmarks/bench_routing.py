"""CA-SAM routing on real H&E of two domains: MoNuSeg (task 0) vs TNBC (task 1).

Each task's VAE is fitted and calibrated as ``train`` does (``calibrate_task_vae``: cross-
fitted by image, threshold = 0.99 quantile of the held-out scores) on the pooled frozen-
encoder features of its training images' tiles. Printed: each task's threshold and the
acceptance of its own training tiles, then where held-out images of both datasets go (an
image counts as routed where most of its tiles went), for the two-task router and for each
one-task router (the other domain should take the base path).

Encoder: a frozen ``tiny`` SAM at 128 px with random weights (as the tests): the routing
machinery, not a pretrained SAM's features.
Data: 512-px centre crops of ``../shared/data`` (MoNuSeg train, TNBC).

    nice -n 5 .venv/bin/python benchmarks/bench_routing.py [--train 8] [--held 8]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import imageio.v3 as iio
import numpy as np
import torch

from variant_runs import MONUSEG, TNBC


def crops(folder, names) -> list[np.ndarray]:
    out = []
    for path in names:
        image = iio.imread(path)[..., :3]
        top, left = max(0, (image.shape[0] - 512) // 2), max(0, (image.shape[1] - 512) // 2)
        out.append(np.ascontiguousarray(image[top:top + 512, left:left + 512]))
    return out


def main() -> None:
    from napari_amasam.config import ModelConfig
    from napari_amasam.model import build_amasam
    from napari_amasam.model.adapters import encode_with_early_features
    from napari_amasam.model.task_router import BASE_PATH
    from napari_amasam.training.continual import calibrate_task_vae, tile_features

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=8, help="training images per dataset")
    parser.add_argument("--held", type=int, default=8, help="held-out images per dataset")
    parser.add_argument("--steps", type=int, default=400, help="Adam steps per VAE fit")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    cfg = ModelConfig(kind="ca-sam", num_tasks=2, backbone="tiny", image_size=128,
                      tiny_embed_dim=32, tiny_depth=2, tiny_heads=2, tiny_global_attn=(1,),
                      tiny_window_size=4, trainable_backbone=False)
    model = build_amasam(cfg).eval()
    rng = np.random.default_rng(0)
    data = {}
    for task, folder in enumerate((MONUSEG, TNBC)):
        names = sorted((folder / "images").iterdir())
        order = rng.permutation(len(names))
        data[task] = (crops(folder, [names[i] for i in order[:args.train]]),
                      crops(folder, [names[i] for i in order[args.train:args.train + args.held]]))
    device = torch.device("cpu")
    for task, (train, _) in data.items():
        report = calibrate_task_vae(model.router.vaes[task], tile_features(model, train, device),
                                    0.99, seed=task, steps=args.steps)
        print(f"task {task} ({('MoNuSeg', 'TNBC')[task]}): threshold {report['threshold']:.3f} "
              f"(held-out score median {report['held_out_score_median']:.3f}, "
              f"{report['folds']} folds, {report['fit_tiles']} tiles); own training tiles "
              f"accepted {report['fit_tiles_accepted']:.3f}", flush=True)

    def majority(image) -> int:
        size = cfg.image_size
        tiles = [image[r:r + size, c:c + size] for r in range(0, 512, size)
                 for c in range(0, 512, size)]
        x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float()
        with torch.no_grad():
            e, _ = encode_with_early_features(model.sam.image_encoder, model.preprocess(x),
                                              model.early_index)
        return Counter(model.router.route(e).tolist()).most_common(1)[0][0]

    def table(label: str) -> None:
        for task, (_, held) in data.items():
            routes = [majority(image) for image in held]
            print(f"  {label}: held-out {('MoNuSeg', 'TNBC')[task]} ({len(held)}) -> "
                  f"{dict(Counter(routes))}")

    print("two tasks (expected: MoNuSeg -> 0, TNBC -> 1):")
    table("both calibrated")
    for off in (0, 1):
        saved = model.router.vaes[off].threshold.clone()
        model.router.vaes[off].threshold.fill_(float("inf"))
        print(f"only task {1 - off} calibrated (expected: the other dataset -> {BASE_PATH}):")
        table(f"task {1 - off} only")
        model.router.vaes[off].threshold.copy_(saved)
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
