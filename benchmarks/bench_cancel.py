"""Cancel latency of a training run (issue 15): seconds from Cancel to the saved model.

The trainer runs in a worker thread (as in the Train widget) on the bundled MoNuSeg crops
with half of them held out for validation, so that the end of an epoch (validation) and the
end of the run (threshold search) take long. Three runs side by side:

* uncancelled: how long the validation and the threshold search take;
* cancelled at the first validation record, and at the first threshold-search record:
  seconds from ``cancel.set()`` (the UI thread's click) to the ``done`` record, i.e. the
  batch of tiles or post-processing under way, plus the save.

Printed as seconds and as a share of the phase a cancel used to wait for.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_cancel.py [--backbone tiny_conv]
[--threads 2]``.
"""

from __future__ import annotations

import argparse
import queue
import tempfile
import threading
import time
from pathlib import Path

import torch

from napari_amasam.config import ModelConfig, TrainConfig, train_defaults
from napari_amasam.training.trainer import train

DATA = Path(__file__).resolve().parents[1] / "resources" / "demo" / "data" / "monuseg_train"


def run(backbone: str, out: Path, cancel_at: str | None) -> dict:
    """One short run in a worker thread; returns phase timings (seconds)."""
    defaults = train_defaults(backbone)
    cfg = TrainConfig(primary=str(DATA), out=str(out), epochs=1, steps_per_epoch=3, batch_size=2,
                      lr=defaults["lr"], val_fraction=0.5, device="cpu", seed=0)
    model_cfg = ModelConfig(backbone=backbone, image_size=defaults["image_size"])
    cancel = threading.Event()
    records: queue.Queue = queue.Queue()

    def worker():
        for record in train(cfg, model_cfg, cancel=cancel):
            records.put((time.perf_counter(), record))
        records.put((time.perf_counter(), None))

    threading.Thread(target=worker, daemon=True).start()
    first: dict[str, float] = {}
    times: dict[str, float] = {}
    while True:
        now, record = records.get()
        if record is None:
            break
        stage = record["stage"]
        if stage == "progress":
            first.setdefault(record["task"], now)
            if record["task"] == cancel_at and not cancel.is_set():
                cancel.set()
                times["cancel"] = time.perf_counter()
        elif stage == "val" and "validation" in first:
            times["validation"] = now - first["validation"]
        elif stage == "thresholds" and "thresholds" in first:
            times["thresholds"] = now - first["thresholds"]
        elif stage == "done":
            times["done"] = now
            times["cancelled"] = record["cancelled"]
    if "cancel" in times:
        times["latency"] = times["done"] - times["cancel"]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tiny_conv")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="amasam_cancel_"))
    print(f"torch {torch.__version__}, {args.threads} threads, {args.backbone}, "
          f"5 validation images of 512 px")
    full = run(args.backbone, work / "full", None)
    print(f"uncancelled: validation {full['validation']:.2f} s, threshold search "
          f"{full['thresholds']:.2f} s")
    for phase in ("validation", "thresholds"):
        result = run(args.backbone, work / f"cancel_{phase}", phase)
        assert result["cancelled"], result
        print(f"cancel during {phase}: done {result['latency']:.2f} s after Cancel "
              f"({result['latency'] / full[phase]:.0%} of the {full[phase]:.2f} s it used to "
              f"wait for)")


if __name__ == "__main__":
    main()
