"""The whole vit_b per-tile pipeline against the official encoder alone, fp32 and bf16.

On real H&E tiles (1024 x 1024 mosaics of four 512 x 512 MoNuSeg crops from
``resources/demo/data``, a different mosaic per repeat; each is exactly one network tile),
three paths run interleaved in one process (official, fp32, bf16, official, fp32, bf16, ...)
so that all see the same machine load:

``official``
    segment_anything's ``ImageEncoderViT`` (vit_b, reference forward) on the padded tile:
    the encoder alone, no decoder, no post-processing.
``fp32``
    ``Predictor.predict_maps`` with a vit_b AMA-SAM (``precision="fp32"``): tiling, the
    whole network (encoder with the fast path, coarse head, HR-Decoder at full resolution,
    distance heads), blending, sigmoid (*maps*), then ``Predictor.postprocess``, the seeded
    watershed (*postprocess*).
``bf16``
    The same predictor with ``precision="bf16"`` (CPU or CUDA autocast).

The network has random weights (no SAM checkpoint can be downloaded; ``--model DIR`` uses a
trained vit_b model folder instead). Random maps are no nuclei: thresholded they cover
almost the whole tile and the watershed cuts them into thousands of fragments, a workload
no real model produces. So, without ``--model``, *postprocess* is timed on the maps a
perfect model would give for the same tile (the training targets of its ground-truth
labels, smoothed with sigma 1 px); with ``--model``, on the model's own maps. The network
time is the same whatever the weights.

Mask Dice (bf16 vs fp32): the foreground probability of each precision thresholded at the
median of the fp32 map (half of the tile is foreground, so decision boundaries run
everywhere: harder than a real model's masks; with ``--model`` its foreground threshold).

Also printed: a per-stage breakdown of one fp32 forward (encoder blocks, neck, coarse head,
prompt encoder, HR-Decoder parts), measured with forward hooks in a separate pass after the
timed runs.

Usage::

    PYTHONPATH=src python benchmarks/bench_pipeline.py [--repeats 2] [--threads 2]
        [--no-bf16] [--no-breakdown] [--device cpu] [--model DIR]

The last line reads ``pipeline vs official encoder: X.XXx (postprocess share P%)``, the
fp32 pipeline time divided by the official encoder time (medians); lower is better.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encoder import build_vit_b_encoder  # noqa: E402

from napari_amasam.config import ModelConfig, PostprocessConfig  # noqa: E402
from napari_amasam.data.io import read_image, read_labels  # noqa: E402
from napari_amasam.data.targets import instance_targets  # noqa: E402
from napari_amasam.inference.predictor import Maps, Predictor  # noqa: E402
from napari_amasam.model import build_amasam  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "resources" / "demo" / "data"
TILE_DIRS = [DEMO / "monuseg_heldout" / "images", DEMO / "monuseg_train" / "images"]
TILE = 1024


def mosaic(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """A TILE x TILE x 3 uint8 H&E tile from four images (each cropped to TILE/2 square)
    and its TILE x TILE int32 ground-truth instance labels (``../labels/<stem>.tif``)."""
    half = TILE // 2
    canvas = np.zeros((TILE, TILE, 3), np.uint8)
    truth = np.zeros((TILE, TILE), np.int32)
    for index, path in enumerate(paths[:4]):
        image = read_image(path)[:half, :half]
        labels = read_labels(path.parent.parent / "labels" / f"{path.stem}.tif")[:half, :half]
        row, col = divmod(index, 2)
        top, left = row * half, col * half
        window = np.s_[top : top + image.shape[0], left : left + image.shape[1]]
        canvas[window] = image
        truth[window] = np.where(labels > 0, labels + truth.max(), 0)
    return canvas, truth


def oracle_maps(truth: np.ndarray) -> Maps:
    """The maps a perfect model would predict for ``truth`` (smoothed training targets)."""
    targets = instance_targets(truth)
    channels = [np.clip(ndi.gaussian_filter(c, 1.0), 0.0, 1.0).astype(np.float32) for c in targets]
    return Maps(channels[0], channels[1], channels[2])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Forward hooks summing wall seconds per named module (for the breakdown pass)."""

    def __init__(self, stages: dict[str, torch.nn.Module], device: torch.device):
        self.seconds: dict[str, float] = defaultdict(float)
        self._start: dict[str, float] = {}
        self._handles = []
        self.device = device
        for name, module in stages.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(module, args):
            sync(self.device)
            self._start[name] = time.perf_counter()

        return hook

    def _post(self, name):
        def hook(module, args, output):
            sync(self.device)
            self.seconds[name] += time.perf_counter() - self._start[name]

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def breakdown(model, image: np.ndarray, predictor: Predictor) -> None:
    """One fp32 forward with hooks; prints seconds per stage and their share."""
    encoder = model.sam.image_encoder
    stages: dict[str, torch.nn.Module] = {"encoder.patch_embed": encoder.patch_embed}
    for index, block in enumerate(encoder.blocks):
        kind = "global" if block.window_size == 0 else "window"
        stages[f"encoder.block{index:02d}.{kind}"] = block
    stages["encoder.neck"] = encoder.neck
    stages["coarse_head"] = model.coarse_head
    stages["prompt_encoder"] = model.sam.prompt_encoder
    hr = model.hr_decoder
    stages["hr_decoder"] = hr
    stages["hr_decoder.transformer"] = hr.transformer
    stages["hr_decoder.sam_output_upscaling"] = hr.sam_decoder.output_upscaling
    for name in ("upscaled_proj", "embedding_up", "early_up", "hypernetwork", "feature_proj",
                 "refine"):
        stages[f"hr_decoder.{name}"] = getattr(hr, name)
    timer = StageTimer(stages, predictor.device)
    start = time.perf_counter()
    predictor.predict_maps(image)
    total = time.perf_counter() - start
    timer.remove()
    seconds = timer.seconds
    groups = defaultdict(float)
    for name, value in seconds.items():
        if name.startswith("encoder.block"):
            groups[f"encoder blocks ({name.rsplit('.', 1)[1]})"] += value
    rows = [("encoder.patch_embed", seconds["encoder.patch_embed"])]
    rows += sorted(groups.items())
    rows += [(n, seconds[n]) for n in ("encoder.neck", "coarse_head", "prompt_encoder")]
    hr_parts = [n for n in seconds if n.startswith("hr_decoder.")]
    rows += [(n, seconds[n]) for n in hr_parts]
    rows.append(("hr_decoder rest (full-res fusion + fused refine)",
                 seconds["hr_decoder"] - sum(seconds[n] for n in hr_parts)))
    accounted = sum(v for n, v in seconds.items() if not n.startswith("hr_decoder"))
    accounted += seconds["hr_decoder"]
    rows.append(("rest (preprocess, tiling, blending, sigmoid)", total - accounted))
    print(f"\nper-stage breakdown of one fp32 tile ({total:.2f} s, hooks on):")
    for name, value in rows:
        print(f"  {name:46s} {value:7.3f} s  {100 * value / total:5.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="tiles (runs per path), >= 1")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 path")
    parser.add_argument("--bf16-repeats", type=int, default=None,
                        help="tiles for the bf16 path (default --repeats; fewer where bf16 is "
                             "emulated and slow, e.g. CPUs without AVX-512 BF16)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-stage pass")
    parser.add_argument("--model", default=None, help="trained vit_b model folder (optional)")
    parser.add_argument("--tiles", nargs="+", default=[str(d) for d in TILE_DIRS],
                        help="folders of H&E images (four per tile)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    logging.basicConfig(level=logging.ERROR)  # hide the random-weights warning
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    sources = sorted(p for folder in args.tiles for p in Path(folder).glob("*.png"))
    if not sources:
        parser.error(f"no .png images in {' '.join(args.tiles)}")
    tiles = [
        mosaic([sources[(4 * i + j) % len(sources)] for j in range(4)]) for i in range(args.repeats)
    ]
    images = [image for image, _ in tiles]
    oracles = [oracle_maps(truth) for _, truth in tiles]

    if args.model:
        fp32 = Predictor.from_folder(args.model, device=device, precision="fp32")
        model = fp32.model
        if model.cfg.backbone != "vit_b" or model.cfg.image_size != 1024:
            parser.error(f"{args.model}: not a vit_b 1024 model")
    else:
        torch.manual_seed(0)
        model = build_amasam(ModelConfig(backbone="vit_b"))
        fp32 = Predictor(model, model.cfg, PostprocessConfig(), device=device, precision="fp32")
    paths: dict[str, Predictor | None] = {"official": None, "fp32": fp32}
    if not args.no_bf16:
        paths["bf16"] = Predictor(model, model.cfg, fp32.thresholds, fp32.mpp, device, "bf16")
    official = build_vit_b_encoder(TILE).to(device)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"{len(images)} tile(s) of {TILE} px (mosaics of {len(sources)} MoNuSeg crops), weights "
        f"{args.model or 'random (seed 0)'}, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )

    maps_s: dict[str, list[float]] = defaultdict(list)
    post_s: dict[str, list[float]] = defaultdict(list)
    labels: dict[tuple[str, int], np.ndarray] = {}
    foreground: dict[tuple[str, int], np.ndarray] = {}
    post_source = "" if args.model else " (oracle maps)"
    bf16_repeats = args.repeats if args.bf16_repeats is None else max(1, args.bf16_repeats)
    for index, image in enumerate(images):
        for name, predictor in paths.items():
            if name == "bf16" and index >= bf16_repeats:
                continue
            if predictor is None:
                x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None].to(device)
                x = (x - model.pixel_mean) / model.pixel_std
                sync(device)
                start = time.perf_counter()
                with torch.inference_mode():
                    official(x)
                sync(device)
                maps_s[name].append(time.perf_counter() - start)
                post_s[name].append(0.0)
                print(f"tile {index + 1} {name:8s} encoder {maps_s[name][-1]:7.2f} s", flush=True)
                continue
            start = time.perf_counter()
            maps = predictor.predict_maps(image)
            middle = time.perf_counter()
            labels[(name, index)] = predictor.postprocess(maps if args.model else oracles[index])
            end = time.perf_counter()
            foreground[(name, index)] = maps.foreground
            maps_s[name].append(middle - start)
            post_s[name].append(end - middle)
            print(
                f"tile {index + 1} {name:8s} maps {middle - start:7.2f} s  "
                f"postprocess{post_source} "
                f"{end - middle:6.3f} s  ({int(labels[(name, index)].max())} objects, "
                f"foreground {100 * (labels[(name, index)] > 0).mean():.1f}%)",
                flush=True,
            )

    print("\nmedian seconds per tile (maps | postprocess | total):")
    total = {}
    for name in paths:
        m, p = statistics.median(maps_s[name]), statistics.median(post_s[name])
        total[name] = statistics.median([a + b for a, b in zip(maps_s[name], post_s[name])])
        # bf16 against the fp32 runs of the same tiles only
        if name == "fp32" and "bf16" in paths:
            runs = len(maps_s["bf16"])
            total["fp32_same_tiles"] = statistics.median(
                [a + b for a, b in zip(maps_s[name][:runs], post_s[name][:runs])]
            )
        print(f"  {name:8s} {m:7.2f} | {p:6.3f} | {total[name]:7.2f}")

    if not args.no_breakdown:
        breakdown(model, images[0], fp32)

    if "bf16" in paths:
        dices = []
        for i in range(len(maps_s["bf16"])):
            fp32_map, bf16_map = foreground[("fp32", i)], foreground[("bf16", i)]
            threshold = (
                fp32.thresholds.foreground_threshold if args.model else float(np.median(fp32_map))
            )
            dices.append(dice(fp32_map > threshold, bf16_map > threshold))
            print(f"tile {i + 1}: bf16 vs fp32 foreground max abs diff "
                  f"{np.abs(fp32_map - bf16_map).max():.4f}, mask dice {dices[-1]:.4f} "
                  f"(threshold {threshold:.3f}, "
                  f"{100 * (fp32_map > threshold).mean():.1f}% foreground)")
        print(f"bf16 speedup: {total['fp32_same_tiles'] / total['bf16']:.2f}x, "
              f"mask dice vs fp32 {statistics.mean(dices):.3f}")
    share = statistics.median(
        [p / (m + p) for m, p in zip(maps_s["fp32"], post_s["fp32"])]
    )
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print(f"pipeline vs official encoder: {total['fp32'] / total['official']:.2f}x "
          f"(postprocess share {100 * share:.1f}%)")


if __name__ == "__main__":
    main()
