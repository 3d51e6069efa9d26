"""Ablation: AMA-SAM parts, SAM-DA, CA-SAM and the classical baseline on held-out MoNuSeg.

Every trained row uses the same frozen backbone (the pretrained tiny SAM of
``variant_runs.pretrained_tiny_sam``; no row trains SAM's own weights), the same primary data
(a seeded MoNuSeg split), the same optimiser step budget and batch, and at least two seeds.
Auxiliary data (the "+aux" rows) is a TNBC training split. Held-out: MoNuSeg images never
used in training (512 px centre crops). Every model is post-processed with the default
thresholds (distance watershed; no per-run tuning, to keep the CPU budget). Printed: mean and spread (sample std over seeds) of Dice, AJI and PQ,
as a Markdown table; results also go to ``OUT/ablation.json``.

Rows:
* AMA-SAM alignment none / grl / cgrl (primary + aux), AMA-SAM primary only;
* "coarse upsampled": the cgrl models' coarse-head logits upsampled bilinearly to full
  resolution (EDT watershed, as there are no distance maps) instead of the HR-Decoder output;
* SAM-DA (primary only), CA-SAM (primary only, one task);
* classical colour-deconvolution baseline (no training; one value).

    nice -n 5 .venv/bin/python benchmarks/bench_ablation.py [--steps 150] [--seeds 0 1]

Seeds can run in parallel processes (``--seeds 0`` and ``--seeds 1``); trained runs and their
evaluations are cached in OUT, so a final ``--seeds 0 1`` only tabulates.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from torch import nn

from variant_runs import evaluate, load_heldout, prepare, save_json, tiny_config, train_row, variant_parser

METRICS = ("dice", "aji", "pq")


class CoarseUpsampled(nn.Module):
    """A trained AMA-SAM whose output is its coarse head, upsampled (no HR-Decoder)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        from napari_amasam.model import AmaSamOutput

        out = self.model(images)
        fine = F.interpolate(out.coarse_logits, size=images.shape[-2:], mode="bilinear",
                             align_corners=False)
        return AmaSamOutput(fine, out.coarse_logits, None, None)


def cached_eval(path: Path, make_predictor, held) -> dict:
    """Mean metrics of a trained run on the held-out images (cached next to the run, so
    seeds run in separate processes can be tabulated together by a final run)."""
    import json

    if path.is_file():
        return json.loads(path.read_text())
    mean = evaluate(make_predictor(), held)["mean"]
    save_json(path, mean)
    return mean


def main() -> None:
    from napari_amasam.inference.predictor import Predictor
    from napari_amasam.model_folder import load_model

    parser = variant_parser(__doc__.splitlines()[0], steps=150, out="benchmarks/output/ablation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--tabulate-only", action="store_true",
                        help="no training: tabulate the runs already evaluated in OUT")
    parser.add_argument("--rows", nargs="*", default=None, metavar="ROW",
                        help="train/evaluate only the rows whose slug is given (cgrl grl none "
                             "primary sam-da ca-sam): split the work over processes")
    args = parser.parse_args()
    t0 = time.perf_counter()
    setup = prepare(args)  # the same seeded splits as bench_continual
    out, mon_train, tnbc_train, sam = setup.out, setup.monuseg_train, setup.tnbc_train, setup.sam
    held = load_heldout(setup.monuseg_heldout)

    runs = {
        "AMA-SAM cgrl (+aux)": (tiny_config(alignment="cgrl"), [tnbc_train]),
        "AMA-SAM grl (+aux)": (tiny_config(alignment="grl"), [tnbc_train]),
        "AMA-SAM none (+aux)": (tiny_config(alignment="none"), [tnbc_train]),
        "AMA-SAM primary only": (tiny_config(alignment="none"), []),
        "SAM-DA": (tiny_config("sam-da"), []),
        "CA-SAM": (tiny_config("ca-sam"), []),
    }
    slugs = {"AMA-SAM cgrl (+aux)": "cgrl", "AMA-SAM grl (+aux)": "grl",
             "AMA-SAM none (+aux)": "none", "AMA-SAM primary only": "primary",
             "SAM-DA": "sam-da", "CA-SAM": "ca-sam"}
    if args.rows:
        runs = {name: run for name, run in runs.items() if slugs[name] in args.rows}
    scores: dict[str, list[dict]] = {name: [] for name in runs}
    if "AMA-SAM cgrl (+aux)" in runs:
        scores["AMA-SAM cgrl, coarse upsampled (no HR-Decoder)"] = []
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for seed in args.seeds:
        for name, (model_cfg, aux) in runs.items():
            slug = name.split(" (")[0].lower().replace(" ", "_").replace("-", "")
            folder = out / f"{slug}{'_aux' if aux else ''}_seed{seed}"
            if args.tabulate_only and not (folder / "eval.json").is_file():
                continue
            # one post-processing for every row (defaults, no per-run tuning: CPU budget)
            train_row(folder, mon_train, model_cfg, args.steps, seed, sam, aux=aux,
                      val_fraction=0.0, tune_thresholds=False)
            seconds[name].append(float((folder / "done").read_text()))
            scores[name].append(cached_eval(folder / "eval.json",
                                            lambda: Predictor.from_folder(folder, device="cpu"), held))
            print(f"{name} seed {seed}: " + " ".join(f"{k} {scores[name][-1][k]:.4f}" for k in METRICS)
                  + f" (trained in {seconds[name][-1]:.0f}s; {time.perf_counter() - t0:.0f}s total)",
                  flush=True)
            if name == "AMA-SAM cgrl (+aux)":
                def coarse_predictor():
                    model, info = load_model(folder, device="cpu")
                    return Predictor(CoarseUpsampled(model), info.model,
                                     dataclasses.replace(info.thresholds, method="edt"), info.mpp, "cpu")

                scores["AMA-SAM cgrl, coarse upsampled (no HR-Decoder)"].append(
                    cached_eval(folder / "eval_coarse.json", coarse_predictor, held))

    classical = evaluate(Predictor.classical(), held)["mean"]
    scores["classical baseline"] = [classical]

    print(f"\nHeld-out MoNuSeg: {len(held)} images; {args.steps} steps x batch 4 per run; "
          f"seeds {args.seeds}; frozen pretrained tiny SAM ({tiny_config().image_size} px)")
    print("| row | Dice | AJI | PQ | runs |")
    print("|---|---|---|---|---|")
    table = {}
    for name, rows in scores.items():
        if not rows:
            continue
        cells = []
        table[name] = {}
        for k in METRICS:
            values = np.array([r[k] for r in rows], dtype=float)
            mean = float(np.nanmean(values))
            spread = float(np.nanstd(values, ddof=1)) if len(values) > 1 else float("nan")
            table[name][k] = {"mean": mean, "std": spread, "values": values.tolist()}
            cells.append(f"{mean:.3f} ± {spread:.3f}" if len(values) > 1 else f"{mean:.3f}")
        print(f"| {name} | " + " | ".join(cells) + f" | {len(rows)} |")
    print(f"total {time.perf_counter() - t0:.0f}s")
    save_json(out / "ablation.json", {"steps": args.steps, "seeds": args.seeds, "table": table,
                                      "train_seconds": seconds})


if __name__ == "__main__":
    main()
