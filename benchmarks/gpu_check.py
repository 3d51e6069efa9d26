"""GPU check: do the CUDA paths run, how fast are they, and do they agree with the CPU?

The project's own machines have no GPU; a GPU machine is lent to some sessions only. This
script is the one prepared run for such a machine: one process, under 5 minutes on a
current data-centre GPU, every section reported even when another one fails.

Sections
--------
1. ``env``: torch, CUDA, GPU name, bf16 support.
2. ``encoder``: the vit_b image encoder at 1024 px, segment_anything's forward against ours
   (``model.fast_attention``), fp32 and bf16 autocast, batch 1 and ``--batch``; medians of
   CUDA-synchronised timings after warm-up; max abs difference relative to the output scale.
3. ``pipeline``: the whole vit_b AMA-SAM per-tile pipeline (``Predictor``: network + stitching
   + post-processing) on real H&E tiles from ``resources/demo/data``, fp32 against bf16:
   seconds per tile, the post-processing share, tiles/s with batched tiles, mask Dice of the
   bf16 labels against the fp32 labels.
4. ``agreement``: the same random-weight vit_b model's maps on the CPU (fp32) and the GPU
   (fp32 and bf16): max abs difference of the probability maps and label Dice.
5. ``train``: a short vit_b AMA-SAM run with AMP through the real trainer (a generated SAM
   checkpoint in the official key layout, MoNuSeg primary + TNBC auxiliary demo crops, CGRL):
   seconds per step, peak GPU memory, finite losses, the model folder loads and segments.
6. ``compile`` (skipped with ``--no-compile`` or when the time budget is spent): the encoder
   under ``torch.compile``: compile seconds and speed against eager.

Weights are random: the figures are speeds and numerical agreement, not segmentation quality.

Usage::

    PYTHONPATH=src python benchmarks/gpu_check.py [--json gpu_check.json] [--quick]

``--quick`` shrinks every section (image size 128, one repeat) so the script can be checked
on a CPU-only machine (``--device cpu``) before a GPU is lent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import statistics
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark modules
DEMO = REPO / "resources" / "demo" / "data"
RESULTS: dict[str, dict] = {}
T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


def section(name: str):
    """Decorator: run a section, print and store its figures, never let it stop the others."""

    def wrap(fn):
        def run(*args, **kwargs):
            print(f"\n== {name} (t={elapsed():.0f}s) ==", flush=True)
            RESULTS[name] = figures = {}
            try:
                fn(figures, *args, **kwargs)
                figures["ok"] = True
            except Exception as exc:  # a report, not a crash: the other sections still run
                figures["ok"] = False
                figures["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc(limit=4)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            return figures

        return run

    return wrap


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    warmup = min(warmup, repeats)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def relative_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.float().cpu(), expected.float().cpu()
    return (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-12)


def labels_dice(a: np.ndarray, b: np.ndarray) -> float:
    fa, fb = a > 0, b > 0
    total = fa.sum() + fb.sum()
    return 1.0 if total == 0 else float(2 * (fa & fb).sum() / total)


def vit_b_config(image_size: int, **overrides):
    from napari_amasam.config import ModelConfig

    return ModelConfig(backbone="vit_b", image_size=image_size, **overrides)


def random_amasam(image_size: int, seed: int = 0, **overrides):
    """A vit_b AMA-SAM with random (non-zero rel-pos) weights, eval mode, on the CPU."""
    from napari_amasam.model import build_amasam

    torch.manual_seed(seed)
    model = build_amasam(vit_b_config(image_size, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "rel_pos" in name or name.endswith("pos_embed"):
                param.normal_(0.0, 0.1)
    return model.eval()


def make_predictor(model, cfg, device: torch.device, precision: str):
    """A Predictor running ``model`` on ``device`` at ``precision`` (``fp32`` or ``bf16``)."""
    from napari_amasam.config import PostprocessConfig
    from napari_amasam.inference.predictor import Predictor

    return Predictor(model, cfg, PostprocessConfig(), mpp=None, device=device, precision=precision)


def real_tiles(size: int) -> list[np.ndarray]:
    """Real H&E images (held-out demo MoNuSeg crops), padded or cropped to ``size``."""
    from napari_amasam.data.io import read_image

    tiles = []
    for path in sorted((DEMO / "monuseg_heldout" / "images").iterdir()):
        image = read_image(path)[:size, :size]
        pad = ((0, size - image.shape[0]), (0, size - image.shape[1]), (0, 0))
        tiles.append(np.pad(image, pad, mode="reflect"))
    return tiles


# ----------------------------------------------------------------------------- sections
@section("env")
def check_env(figures, device: torch.device) -> None:
    figures["torch"] = torch.__version__
    figures["cuda"] = torch.version.cuda
    figures["device"] = str(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        figures["gpu"] = props.name
        figures["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        figures["multiprocessors"] = props.multi_processor_count
        figures["bf16_supported"] = torch.cuda.is_bf16_supported()
        figures["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    import segment_anything

    figures["segment_anything"] = getattr(segment_anything, "__file__", "?")
    for key, value in figures.items():
        print(f"{key}: {value}")


@section("encoder")
def check_encoder(figures, device: torch.device, size: int, batch: int, repeats: int) -> None:
    from bench_encoder import build_vit_b_encoder  # the official vit_b encoder, random weights

    from napari_amasam.model.fast_attention import (
        enable_fast_attention,
        enable_fast_mlp,
        reference_attention,
    )

    encoder = build_vit_b_encoder(size).to(device)
    enable_fast_attention(encoder)
    enable_fast_mlp(encoder)
    for bsz in (1, batch):
        images = torch.randn(bsz, 3, size, size, device=device)
        outputs = {}

        def run(path: str, precision: str):
            context = reference_attention() if path == "official" else contextlib.nullcontext()
            with torch.inference_mode(), context, autocast(device, precision):
                return encoder(images)

        for precision in ("fp32", "bf16"):
            for path in ("official", "ours"):
                key = f"{path}_{precision}_b{bsz}"
                outputs[key] = run(path, precision)
                seconds = median_seconds(partial(run, path, precision), device, repeats)
                figures[f"{key}_s"] = seconds
                print(f"{key:22s} {seconds * 1e3:9.2f} ms/batch  {seconds * 1e3 / bsz:8.2f} ms/image",
                      flush=True)
            speedup = figures[f"official_{precision}_b{bsz}_s"] / figures[f"ours_{precision}_b{bsz}_s"]
            figures[f"speedup_{precision}_b{bsz}"] = speedup
            print(f"ours vs official, {precision}, batch {bsz}: {speedup:.2f}x")
        exact = relative_diff(outputs[f"ours_fp32_b{bsz}"], outputs[f"official_fp32_b{bsz}"])
        bf16 = relative_diff(outputs[f"ours_bf16_b{bsz}"], outputs[f"official_fp32_b{bsz}"])
        figures[f"max_rel_diff_fp32_b{bsz}"] = exact
        figures[f"max_rel_diff_bf16_vs_fp32_b{bsz}"] = bf16
        print(f"batch {bsz}: ours fp32 vs official fp32 max rel diff {exact:.2e}; "
              f"ours bf16 vs official fp32 {bf16:.2e}")
        figures[f"bf16_vs_fp32_ours_b{bsz}"] = figures[f"ours_fp32_b{bsz}_s"] / figures[f"ours_bf16_b{bsz}_s"]
    if device.type == "cuda":
        figures["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


@section("pipeline")
def check_pipeline(figures, device: torch.device, size: int, batch: int, repeats: int) -> None:
    model = random_amasam(size)
    cfg = model.cfg
    tiles = real_tiles(size)
    labels = {}
    for precision in ("fp32", "bf16"):
        predictor = make_predictor(model, cfg, device, precision)
        network, post = [], []
        for _ in range(max(1, repeats // 2)):
            for tile in tiles:
                sync(device)
                start = time.perf_counter()
                maps = predictor.predict_maps(tile, batch_size=1)
                sync(device)
                middle = time.perf_counter()
                labels[(precision, id(tile))] = predictor.postprocess(maps)
                network.append(middle - start)
                post.append(time.perf_counter() - middle)
        per_tile = statistics.median(network) + statistics.median(post)
        share = statistics.median(post) / per_tile
        figures[f"{precision}_network_s"] = statistics.median(network)
        figures[f"{precision}_postprocess_s"] = statistics.median(post)
        figures[f"{precision}_tile_s"] = per_tile
        figures[f"{precision}_postprocess_share"] = share
        print(f"{precision}: {per_tile * 1e3:.1f} ms/tile (network {statistics.median(network) * 1e3:.1f}, "
              f"post-processing {statistics.median(post) * 1e3:.1f} = {100 * share:.0f}%)", flush=True)
        # Throughput: a 2x2 mosaic of real tiles, tiles batched.
        mosaic = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:4], 1)], 0)
        seconds = median_seconds(lambda: predictor.predict_maps(mosaic, batch_size=batch), device,
                                 max(1, repeats // 2), warmup=1)
        grid = len(predictor_tiles(predictor, mosaic))
        figures[f"{precision}_batched_tiles_per_s"] = grid / seconds
        print(f"{precision}: {grid} tiles of a {mosaic.shape[0]}x{mosaic.shape[1]} mosaic, batch {batch}: "
              f"{grid / seconds:.1f} tiles/s (network only)", flush=True)
    if "fp32_tile_s" in figures and "bf16_tile_s" in figures:
        dice = [labels_dice(labels[("bf16", id(t))], labels[("fp32", id(t))]) for t in tiles]
        figures["bf16_speedup"] = figures["fp32_tile_s"] / figures["bf16_tile_s"]
        figures["bf16_mask_dice_vs_fp32"] = float(np.mean(dice))
        print(f"bf16 speedup: {figures['bf16_speedup']:.2f}x, mask dice vs fp32 "
              f"{figures['bf16_mask_dice_vs_fp32']:.3f}")


def predictor_tiles(predictor, image: np.ndarray) -> list:
    from napari_amasam.inference.tiling import tile_grid

    tile, overlap = predictor._tile_parameters(None, None)
    return tile_grid(image.shape[0], image.shape[1], tile, overlap)


@section("agreement")
def check_agreement(figures, device: torch.device, size: int) -> None:
    model = random_amasam(size, seed=1)
    tile = real_tiles(size)[0]
    cpu = make_predictor(model, model.cfg, torch.device("cpu"), "fp32")
    reference = cpu.predict_maps(tile)
    reference_labels = cpu.postprocess(reference)
    for precision in ("fp32", "bf16"):
        predictor = make_predictor(model, model.cfg, device, precision)
        maps = predictor.predict_maps(tile)
        diff = float(np.abs(maps.foreground - reference.foreground).max())
        dice = labels_dice(predictor.postprocess(maps), reference_labels)
        figures[f"{device.type}_{precision}_vs_cpu_fp32_max_prob_diff"] = diff
        figures[f"{device.type}_{precision}_vs_cpu_fp32_label_dice"] = dice
        print(f"{device.type} {precision} vs cpu fp32: foreground probability max |diff| {diff:.2e}, "
              f"label dice {dice:.4f}", flush=True)


@section("train")
def check_training(figures, device: torch.device, size: int, steps: int, batch: int) -> None:
    from napari_amasam.config import TrainConfig
    from napari_amasam.inference.predictor import Predictor
    from napari_amasam.model.backbone import build_sam_from_config, sam_official_state_dict
    from napari_amasam.training.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "sam_vit_b_generated.pth"
        torch.manual_seed(0)
        torch.save(sam_official_state_dict(build_sam_from_config(vit_b_config(size))), checkpoint)
        cfg = TrainConfig(
            primary=str(DEMO / "monuseg_train"), aux=[str(DEMO / "tnbc_aux")], out=str(Path(tmp) / "model"),
            checkpoint=str(checkpoint), epochs=2, steps_per_epoch=max(1, steps // 2), max_steps=steps,
            batch_size=batch, device=device.type, amp=device.type == "cuda", mpp=0.25, aux_mpp=[0.25],
            tune_thresholds=False,
        )
        model_cfg = vit_b_config(size, alignment="cgrl", num_domains=2)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step_times, losses, stages = [], [], {}
        last = time.perf_counter()
        start = last
        generator = train(cfg, model_cfg)
        while True:
            try:
                record = next(generator)
            except StopIteration as stop:
                out = stop.value
                break
            now = time.perf_counter()
            stages[record["stage"]] = stages.get(record["stage"], 0.0) + now - last
            if record["stage"] == "train":
                step_times.append(now - last)
                losses.append(record["total_loss"])
            last = now
        figures["steps"] = len(step_times)
        figures["median_step_s"] = statistics.median(step_times[2:] or step_times)
        figures["images_per_s"] = batch / figures["median_step_s"]
        figures["seconds_by_stage"] = {k: round(v, 2) for k, v in stages.items()}
        figures["wall_s"] = time.perf_counter() - start
        figures["losses_finite"] = all(math.isfinite(x) for x in losses)
        figures["first_last_loss"] = [losses[0], losses[-1]] if losses else None
        if device.type == "cuda":
            figures["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        predictor = Predictor.from_folder(out, device=device)
        labels = predictor.segment(real_tiles(size)[0])
        figures["reloaded_segments"] = int(labels.max())
        for key in ("steps", "median_step_s", "images_per_s", "seconds_by_stage", "wall_s",
                    "losses_finite", "first_last_loss", "peak_memory_gib", "reloaded_segments"):
            if key in figures:
                print(f"{key}: {figures[key]}", flush=True)


@section("compile")
def check_compile(figures, device: torch.device, size: int, batch: int, repeats: int) -> None:
    model = random_amasam(size).to(device)
    encoder = model.sam.image_encoder
    images = torch.randn(batch, 3, size, size, device=device)

    def eager():
        with torch.inference_mode(), autocast(device, "bf16"):
            return encoder(images)

    compiled_encoder = torch.compile(encoder)

    def compiled():
        with torch.inference_mode(), autocast(device, "bf16"):
            return compiled_encoder(images)

    start = time.perf_counter()
    out = compiled()
    sync(device)
    figures["compile_s"] = time.perf_counter() - start
    figures["eager_bf16_s"] = median_seconds(eager, device, repeats)
    figures["compiled_bf16_s"] = median_seconds(compiled, device, repeats)
    figures["speedup"] = figures["eager_bf16_s"] / figures["compiled_bf16_s"]
    figures["max_rel_diff_vs_eager"] = relative_diff(out, eager())
    print(f"compile {figures['compile_s']:.1f} s; bf16 batch {batch}: eager {figures['eager_bf16_s'] * 1e3:.1f} ms, "
          f"compiled {figures['compiled_bf16_s'] * 1e3:.1f} ms ({figures['speedup']:.2f}x), "
          f"max rel diff {figures['max_rel_diff_vs_eager']:.2e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a CPU dry run of the script")
    parser.add_argument("--batch", type=int, default=8, help="tiles per batch for throughput figures")
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="skip torch.compile when this much time has passed before it")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the random-weights warnings are expected here
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --device cpu --quick for a dry run")
        return 2
    size, repeats = (128, 1) if args.quick else (1024, 10)
    batch = 2 if args.quick else args.batch
    steps = 4 if args.quick else args.train_steps
    check_env(device)
    check_encoder(device, size, batch, repeats)
    check_pipeline(device, size, batch, repeats)
    check_agreement(device, size)
    check_training(device, size, steps, 2 if args.quick else 4)
    if args.no_compile or elapsed() > args.budget_s:
        print(f"\n== compile skipped (t={elapsed():.0f}s) ==")
    else:
        check_compile(device, size, batch, max(2, repeats // 2))
    RESULTS["total_s"] = {"seconds": elapsed()}
    failed = [name for name, figures in RESULTS.items() if figures.get("ok") is False]
    print(f"\ngpu check done in {elapsed():.0f}s; sections failed: {', '.join(failed) or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
