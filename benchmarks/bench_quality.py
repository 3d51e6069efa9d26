"""Does a model trained on this CPU beat the classical baseline on unseen images? (issue #10)

Trains with the CLI defaults (``napari-amasam train --backbone BACKBONE``, only the data
folders, ``--mpp`` and the seed given) on ``shared/data/monuseg/train`` minus a fixed held-out
set of whole images, with TNBC as the auxiliary domain, on the CPU; then segments

- the held-out MoNuSeg images (never trained on, several organs), and
- CPM-15 (a dataset never trained on; images 01-07 are 20x, 08-15 40x: segmented at their
  microns per pixel, so both methods see nuclei at their working scale),

with the trained model (plain and with flip/rotation test-time augmentation) and with the
classical baseline, and prints one table: Dice, AJI, AJI+, PQ, F1 (mean over images, then
mean and spread over seeds), the training time and the learning curve (validation AJI per
epoch from the model folder's history.csv).

Each seed's model folder is kept under ``--out``; a finished one is reused (delete it to
retrain). Example (the README figures)::

    python benchmarks/bench_quality.py --seeds 0 1 --out bench_output/quality
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# ``../shared/data`` beside the repository (or beside its parent, for a git worktree)
DEFAULT_DATA = next((p / "shared" / "data" for p in (REPO.parent, REPO.parent.parent)
                     if (p / "shared" / "data").is_dir()), REPO.parent / "shared" / "data")
# Never trained on: 7 whole 1000x1000 images of 6 organs (kidney x2, breast, prostate,
# colon, stomach, bladder). `make demo` evaluates on the same 7 (bundled as JPEG in
# resources/demo/data/monuseg_heldout_whole); the 4 monuseg_heldout crops come from the first four.
HELD_OUT = (
    "TCGA-B0-5711-01Z-00-DX1",  # kidney
    "TCGA-HE-7128-01Z-00-DX1",  # kidney
    "TCGA-E2-A14V-01Z-00-DX1",  # breast
    "TCGA-G9-6336-01Z-00-DX1",  # prostate
    "TCGA-NH-A8F7-01A-01-TS1",  # colon
    "TCGA-RD-A8N9-01A-01-TS1",  # stomach
    "TCGA-G2-A2EK-01A-02-TSB",  # bladder
)
MONUSEG_MPP = 0.25  # 40x
CPM15_MPP = {f"image{i:02d}": (0.5 if i <= 7 else 0.25) for i in range(1, 16)}  # 20x / 40x
KEYS = ("dice", "aji", "aji_plus", "pq", "f1")


def link_split(src: Path, dst: Path, exclude: tuple[str, ...]) -> Path:
    """``dst/images`` + ``dst/labels`` with links to every pair of ``src`` not in ``exclude``."""
    for sub in ("images", "labels"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for path in sorted((src / sub).iterdir()):
            if path.stem in exclude:
                continue
            try:
                (dst / sub / path.name).symlink_to(path.resolve())
            except FileExistsError:  # made by an earlier run, or by a seed run side by side
                pass
    return dst


def evaluate(predictor, folder: Path, stems, mpp_of, tta: bool = False) -> dict[str, dict]:
    """Per-image metrics of ``predictor`` on ``folder``'s pairs named ``stems``."""
    from napari_amasam.data.io import read_image, read_labels
    from napari_amasam.metrics import evaluate_pair

    results = {}
    for stem in stems:
        image = read_image(next((folder / "images").glob(f"{stem}.*")))
        truth = read_labels(next((folder / "labels").glob(f"{stem}.*")))
        kwargs = {"input_mpp": mpp_of(stem)}
        if tta:
            kwargs["tta"] = True
        labels = predictor.segment(image, **kwargs)
        results[stem] = {k: float(v) for k, v in evaluate_pair(truth, labels).items()}
    return results


def mean_over_images(per_image: dict[str, dict]) -> dict[str, float]:
    return {k: float(np.nanmean([m[k] for m in per_image.values()])) for k in KEYS}


def train_seed(args, seed: int, primary: Path, aux: Path) -> tuple[Path, float]:
    """Train (or reuse) the model folder of ``seed``; returns it and the training seconds."""
    from napari_amasam.cli import main as cli

    model_dir = args.out / f"{args.backbone}_seed{seed}"
    marker = model_dir / "bench_train.json"
    if marker.is_file():
        return model_dir, json.loads(marker.read_text())["seconds"]
    command = ["train", "--primary", str(primary), "--aux", str(aux), "--out", str(model_dir),
               "--backbone", args.backbone, "--mpp", str(MONUSEG_MPP), "--aux-mpp", str(MONUSEG_MPP),
               "--device", "cpu", "--seed", str(seed), "--quiet", *args.train_args]
    if args.threads:
        command += ["--threads", str(args.threads)]
    print("napari-amasam " + " ".join(command), flush=True)
    t0 = time.perf_counter()
    if cli(command):
        raise SystemExit(f"training seed {seed} failed")
    seconds = time.perf_counter() - t0
    marker.write_text(json.dumps({"seconds": seconds, "command": command}))
    return model_dir, seconds


def learning_curve(model_dir: Path) -> list[float]:
    from napari_amasam.model_folder import read_history

    return [round(float(r["val_aji"]), 3) for r in read_history(model_dir) if r.get("val_aji")]


def spread(values) -> str:
    values = np.asarray(values, float)
    return f"{values.mean():.3f}±{values.std():.3f}" if len(values) > 1 else f"{values.mean():.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("bench_output/quality"))
    parser.add_argument("--backbone", default="tiny_conv")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-tta", action="store_true", help="skip the test-time-augmented rows")
    parser.add_argument("--train-only", action="store_true",
                        help="train (or reuse) the seeds' model folders and stop: run seeds in "
                             "parallel processes this way, then once more without it for the table")
    parser.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                        help="extra `napari-amasam train` flags (ablations), after everything else")
    args = parser.parse_args()
    import torch

    from napari_amasam.inference.predictor import Predictor

    if args.threads:
        torch.set_num_threads(args.threads)
    monuseg, cpm15, tnbc = args.data / "monuseg" / "train", args.data / "cpm15", args.data / "tnbc"
    for folder in (monuseg, cpm15, tnbc):
        if not (folder / "images").is_dir():
            print(f"bench_quality: {folder}: dataset not found (see --data)", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    primary = link_split(monuseg, args.out / "monuseg_train_split", HELD_OUT)
    cpm_stems = sorted(p.stem for p in (cpm15 / "images").iterdir())
    datasets = {"MoNuSeg held-out": (monuseg, HELD_OUT, lambda s: MONUSEG_MPP),
                "CPM-15": (cpm15, cpm_stems, lambda s: CPM15_MPP.get(s, MONUSEG_MPP))}

    if args.train_only:
        for seed in args.seeds:
            model_dir, seconds = train_seed(args, seed, primary, tnbc)
            print(f"seed {seed}: {model_dir} trained in {seconds / 60:.1f} min", flush=True)
        return 0

    classical = Predictor.classical()
    scores: dict[str, dict[str, list[dict]]] = {}  # method -> dataset -> per-seed means
    for name, (folder, stems, mpp_of) in datasets.items():
        scores.setdefault("classical", {})[name] = [mean_over_images(evaluate(classical, folder, stems, mpp_of))]
        print(f"classical {name}: " + " ".join(
            f"{k} {v:.4f}" for k, v in scores["classical"][name][0].items()), flush=True)

    times, curves = [], []
    variants = [("model", False)] + ([] if args.no_tta else [("model + TTA", True)])
    for seed in args.seeds:
        model_dir, seconds = train_seed(args, seed, primary, tnbc)
        times.append(seconds)
        curves.append(learning_curve(model_dir))
        predictor = Predictor.from_folder(model_dir, device="cpu")
        for method, tta in variants:
            for name, (folder, stems, mpp_of) in datasets.items():
                per_image = evaluate(predictor, folder, stems, mpp_of, tta=tta)
                scores.setdefault(method, {}).setdefault(name, []).append(mean_over_images(per_image))
                print(f"seed {seed} {method} {name}: " + " ".join(
                    f"{k} {v:.4f}" for k, v in scores[method][name][-1].items()), flush=True)
        print(f"seed {seed}: trained in {seconds / 60:.1f} min; " + "; ".join(
            f"{m} {n} AJI {scores[m][n][-1]['aji']:.3f}" for m, _ in variants for n in datasets), flush=True)

    lines = [f"Quality on unseen images: {args.backbone}, CLI defaults, trained on MoNuSeg train "
             f"minus {len(HELD_OUT)} held-out images + TNBC (auxiliary), CPU; seeds {args.seeds} "
             "(mean±std over seeds of the mean over images)", ""]
    header = f"| {'dataset':<16} | {'method':<12} | " + " | ".join(f"{k:>11}" for k in KEYS) + " |"
    lines += [header, "|" + "|".join("-" * len(c) for c in header.strip("|").split("|")) + "|"]
    for name in datasets:
        for method in scores:
            per_seed = scores[method][name]
            lines.append(f"| {name:<16} | {method:<12} | " + " | ".join(
                f"{spread([s[k] for s in per_seed]):>11}" for k in KEYS) + " |")
    lines.append("")
    lines.append(f"training time: {spread(np.array(times) / 60)} min per seed (validation included)")
    for seed, curve in zip(args.seeds, curves, strict=True):
        lines.append(f"learning curve seed {seed} (validation AJI per epoch): {curve}")
    text = "\n".join(lines)
    print("\n" + text)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "scores.json").write_text(json.dumps(
        {"scores": scores, "train_seconds": times, "curves": curves, "seeds": args.seeds,
         "backbone": args.backbone, "held_out": HELD_OUT, "train_args": args.train_args}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
