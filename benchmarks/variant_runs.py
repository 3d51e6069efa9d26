"""Shared pieces of bench_continual.py and bench_ablation.py (real data from ../shared/data).

* ``split_folder``: a reproducible train / held-out split of a dataset folder, as symlinked
  ``images/`` + ``labels/`` folders (nothing is copied).
* ``pretrained_tiny_sam``: the stand-in for a pretrained SAM. SAM-DA and CA-SAM keep SAM
  frozen, which is meaningless on random weights, and no official checkpoint may be
  downloaded here. So a ``tiny`` SAM (encoder *and* mask decoder) is first trained on nuclei
  data that no benchmark row uses (CoNSeP patches + CPM-15), with SAM's own prompt-free
  decoder output (mask tokens 0-2: nucleus, centre and boundary distance); its weights are
  then the frozen "foundation model" of every row. This measures the methods' mechanics on a
  small, weakly pretrained backbone, not the papers' claims on the real SAM.
* ``train_row`` / ``evaluate``: the project's trainer and predictor, nothing special-cased.
* ``variant_parser`` / ``prepare``: the options and the setup both benchmarks start with.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

SHARED = Path(os.environ.get("NAPARI_AMASAM_SHARED_DATA",
                             Path(__file__).resolve().parents[2] / "shared" / "data"))
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")
MONUSEG = SHARED / "monuseg" / "train"
TNBC = SHARED / "tnbc"
CPM15 = SHARED / "cpm15"
CONSEP = SHARED / "consep_patches_subset" / "test"
IMAGE_SIZE = 256
CROP = 512


def variant_parser(description: str, steps: int, out: str) -> argparse.ArgumentParser:
    """The options every variant benchmark takes (a benchmark adds its own): optimiser
    steps per training run, pretraining steps of the tiny SAM, CPU threads, output folder."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps, help="optimiser steps per training run")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=out)
    return parser


@dataclasses.dataclass
class Setup:
    """What :func:`prepare` made: the output folder, the two datasets' train / held-out
    folders and the pretrained tiny SAM's weights."""

    out: Path
    monuseg_train: Path
    monuseg_heldout: Path
    tnbc_train: Path
    tnbc_heldout: Path
    sam: Path


def prepare(args: argparse.Namespace) -> Setup:
    """Threads, the seeded MoNuSeg and TNBC splits (seed 42: the same images in every
    benchmark) and the pretrained tiny SAM (trained once, shared through ``out``'s parent)."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    monuseg = split_folder(MONUSEG, out / "data" / "monuseg", 22, 6)
    tnbc = split_folder(TNBC, out / "data" / "tnbc", 36, 8)
    sam = pretrained_tiny_sam(out.parent / "pretrained", args.pretrain_steps)
    return Setup(out, *monuseg, *tnbc, sam)


def tiny_config(kind: str = "amasam", **overrides):
    from napari_amasam.config import ModelConfig

    return ModelConfig(backbone="tiny", image_size=IMAGE_SIZE, kind=kind, **overrides)


def split_folder(source: Path, dst: Path, n_train: int, n_heldout: int, seed: int = 42,
                 crop: int = CROP) -> tuple[Path, Path]:
    """A seeded split of ``source`` into ``dst/train`` and ``dst/heldout``.

    Images larger than ``crop`` are cut to their ``crop x crop`` centre (MoNuSeg's 1000 px
    tiles -> 512 px: a 2-core CPU budget; TNBC's 512 px tiles are kept whole).
    """
    import tifffile
    from napari_amasam.data import find_pairs
    from napari_amasam.data.io import read_image, read_labels
    from napari_amasam.model_folder import atomic_write_bytes

    pairs = find_pairs(source)
    order = np.random.default_rng(seed).permutation(len(pairs))
    parts = {"train": order[:n_train], "heldout": order[n_train:n_train + n_heldout]}
    for name, idx in parts.items():
        for sub in ("images", "labels"):
            (dst / name / sub).mkdir(parents=True, exist_ok=True)
        for i in idx:
            pair = pairs[int(i)]
            image_out = dst / name / "images" / f"{pair.stem}.tif"
            label_out = dst / name / "labels" / f"{pair.stem}.tif"
            if image_out.exists() and label_out.exists():
                continue
            image, labels = read_image(pair.image), read_labels(pair.label)
            y0 = max(0, (image.shape[0] - crop) // 2)
            x0 = max(0, (image.shape[1] - crop) // 2)
            window = (slice(y0, y0 + crop), slice(x0, x0 + crop))
            for path, array in ((label_out, labels[window].astype(np.int32)),
                                (image_out, np.ascontiguousarray(image[window]))):
                buffer = io.BytesIO()
                tifffile.imwrite(buffer, array)
                atomic_write_bytes(path, buffer.getvalue())
    return dst / "train", dst / "heldout"


def pretrained_tiny_sam(out: Path, steps: int, seed: int = 0) -> Path:
    """Train a tiny SAM (encoder + decoder) on CoNSeP + CPM-15; cache ``out/tiny_sam.pt``."""
    from napari_amasam.data import DomainDataset, MultiDomainSampler, find_pairs
    from napari_amasam.model import build_amasam
    from napari_amasam.model_folder import atomic_torch_save
    from napari_amasam.training.losses import amasam_loss

    path = out / "tiny_sam.pt"
    if path.is_file():
        return path
    torch.manual_seed(seed)
    model = build_amasam(tiny_config("sam-da"))
    model.sam.requires_grad_(True)  # pretraining: SAM itself learns, the adapter is unused
    model.decoder.decoder_adapter.requires_grad_(False)
    datasets = [DomainDataset(find_pairs(CONSEP) + find_pairs(CPM15), 0)]
    sampler = MultiDomainSampler(datasets, 4, 1.0, seed=seed, crop_size=IMAGE_SIZE, augment=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-4)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        batch = sampler.batch(step)
        output = model(batch["image"])
        loss, _ = amasam_loss(output, batch["targets"], batch["valid"], batch["domain"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 10 == 0:
            print(f"  pretraining tiny SAM: step {step + 1}/{steps} loss {float(loss):.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(model.sam_state_dict(), path)
    return path


def train_row(out: Path, primary: Path, model_cfg, steps: int, seed: int, sam: Path | None,
              aux: list[Path] = (), **train_kwargs) -> Path:
    """One training run through the project's trainer (cached: skipped if weights exist)."""
    from napari_amasam.config import TrainConfig
    from napari_amasam.training.trainer import run_training

    if (out / "weights.pt").is_file() and (out / "done").is_file():
        return out
    settings = dict(epochs=1, steps_per_epoch=steps, batch_size=4, lr=1e-3, device="cpu",
                    seed=seed, amp=False, val_fraction=0.15)
    settings.update(train_kwargs)
    continuing = settings.get("continue_from") or settings.get("init_from")
    cfg = TrainConfig(primary=str(primary), aux=[str(a) for a in aux], out=str(out),
                      checkpoint=str(sam) if sam and not continuing else None, **settings)
    t0 = time.perf_counter()
    _, records = run_training(cfg, model_cfg)
    for r in records:
        if r["stage"] in ("task",) or (r["stage"] == "setup" and "trainable" in r["message"]):
            print("   ", r["message"], flush=True)
    (out / "done").write_text(f"{time.perf_counter() - t0:.1f}")
    return out


def load_heldout(folder: Path):
    from napari_amasam.data import find_pairs
    from napari_amasam.data.io import read_image, read_labels

    return [(p.stem, read_image(p.image), read_labels(p.label)) for p in find_pairs(folder)]


def evaluate(predictor, items, coarse_only: bool = False) -> dict:
    """Mean Dice/AJI/PQ over ``items`` and the routed task of each image (CA-SAM)."""
    from napari_amasam.metrics import evaluate_pair, summarize

    per_image, routed = {}, {}
    for stem, image, labels in items:
        if predictor.is_classical:  # labels only, no maps
            routed[stem] = None
            per_image[stem] = evaluate_pair(labels, predictor.segment(image))
            continue
        maps = predictor.predict_maps(image)
        routed[stem] = maps.routed_task
        per_image[stem] = evaluate_pair(labels, predictor.postprocess(maps))
    summary = summarize(per_image)
    return {"mean": summary["mean"], "images": per_image, "routed": routed}


def save_json(path: Path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=float))
