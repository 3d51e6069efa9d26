"""Alignment ablation (method.md 1.2 acceptance check 2): does CGRL help the primary domain?

Trains the tiny backbone with the same seed, data and step budget four ways: primary only,
primary + auxiliary with no alignment, with a plain GRL and with CGRL; then segments the
held-out primary images with each model's tuned post-processing and prints Dice/AJI/PQ.

Primary: the bundled MoNuSeg training crops; auxiliary: the bundled TNBC tiles; held-out:
the bundled MoNuSeg held-out crops (never seen in training). On a random-weight tiny
backbone and a few CPU minutes per run this measures the mechanics, not the paper's claim,
which concerns a pretrained SAM.

    .venv/bin/python benchmarks/bench_alignment.py [--steps 600] [--out /tmp/ablation]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / "resources" / "demo" / "data"


def main() -> None:
    from napari_amasam.config import ModelConfig, TrainConfig
    from napari_amasam.data import find_pairs, read_image, read_labels
    from napari_amasam.inference.predictor import Predictor
    from napari_amasam.metrics import evaluate_pair, summarize
    from napari_amasam.training.trainer import run_training

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lambda-max", type=float, default=0.1)
    parser.add_argument("--out", default="benchmarks/output/alignment")
    args = parser.parse_args()

    runs = [("primary only", [], "none"), ("+aux, none", [DATA / "tnbc_aux"], "none"),
            ("+aux, grl", [DATA / "tnbc_aux"], "grl"), ("+aux, cgrl", [DATA / "tnbc_aux"], "cgrl")]
    heldout = [(read_image(p.image), read_labels(p.label)) for p in find_pairs(DATA / "monuseg_heldout")]
    rows = []
    for name, aux, alignment in runs:
        t0 = time.perf_counter()
        cfg = TrainConfig(primary=str(DATA / "monuseg_train"), aux=[str(a) for a in aux],
                          aux_mpp=[0.25] * len(aux), mpp=0.25, out=f"{args.out}/{alignment}_{len(aux)}",
                          epochs=1, steps_per_epoch=args.steps, batch_size=4, lr=1e-3, device="cpu", seed=0)
        model_cfg = ModelConfig(backbone="tiny", image_size=256, trainable_backbone=True,
                                alignment=alignment, lambda_max=args.lambda_max)
        out, _ = run_training(cfg, model_cfg)
        predictor = Predictor.from_folder(out, device="cpu")
        per_image = {i: evaluate_pair(gt, predictor.segment(image)) for i, (image, gt) in enumerate(heldout)}
        mean = summarize(per_image)["mean"]
        rows.append((name, mean, time.perf_counter() - t0, predictor.thresholds.method))
        print(f"{name:<14} dice {mean['dice']:.4f} aji {mean['aji']:.4f} pq {mean['pq']:.4f} "
              f"({rows[-1][2]:.0f}s, {rows[-1][3]} post-processing)", flush=True)
    best = max(rows, key=lambda r: r[1]["dice"])
    print(f"\nbest held-out primary Dice: {best[0]} ({best[1]['dice']:.4f}); "
          f"spread {np.ptp([r[1]['dice'] for r in rows]):.4f}")


if __name__ == "__main__":
    main()
