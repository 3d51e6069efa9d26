"""Benchmark SAM's vit_b image encoder: reference attention vs ``fast_attention``.

Builds a random-weight ``ImageEncoderViT`` with the official vit_b hyper-parameters (as in
``segment_anything.build_sam._build_sam``; image encoder only), then runs the reference and
the fast paths interleaved (ref, fast, ref, fast, ...) in one process so that all see the
same machine load, checks that the outputs match, and prints per-run seconds, medians, the
speed-ups and a per-block breakdown. Paths: ``reference`` (segment_anything as is),
``fast_attn`` (fast attention only: SDPA + chunked bias + oneDNN qkv/proj, windows cut from
the projected q/k/v so the padding is never projected), ``fast`` (plus the fast MLP: oneDNN
linears with fused GELU, and the neck's LayerNorm2d as one ``F.layer_norm``), and with
``--bf16`` ``fast_bf16`` (``fast`` under CPU bf16 autocast; not exact).

The last line reads ``encoder speedup vs segment_anything: X.XXx (max abs diff D)``: the
median wall-time ratio of ``reference`` over ``fast``, and the largest deviation of the
``fast`` output divided by the largest absolute reference output.

Usage::

    PYTHONPATH=src python benchmarks/bench_encoder.py [--size 1024] [--repeats 2]
        [--threads 2] [--bf16] [--no-breakdown] [--max-mask-mib 64]

Times are wall-clock seconds; the process CPU seconds are printed too because on a shared
machine wall time also counts other programs (compare the load average printed at the end).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from functools import partial

import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT

from napari_amasam.model.fast_layers import enable_fast_layers
from napari_amasam.model.fast_attention import (
    DEFAULT_MAX_MASK_BYTES,
    disable_fast_mlp,
    enable_fast_attention,
    enable_fast_mlp,
    fast_attention_forward,
    reference_attention,
)

VIT_B = dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11))


def build_vit_b_encoder(image_size: int, seed: int = 0) -> ImageEncoderViT:
    """Random-weight vit_b image encoder; rel-pos tables and pos_embed made non-zero
    (SAM zero-initialises them, which would make the bias trivially zero)."""
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(
        depth=VIT_B["depth"],
        embed_dim=VIT_B["embed_dim"],
        img_size=image_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=VIT_B["num_heads"],
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=VIT_B["global_attn_indexes"],
        window_size=14,
        out_chans=256,
    )
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                param.normal_(0.0, 0.1)
    return encoder.eval()


class BlockTimer:
    """Forward hooks that accumulate wall seconds per encoder stage under a label."""

    def __init__(self, encoder: ImageEncoderViT):
        self.label = "none"
        self.seconds: dict[tuple[str, str], list[float]] = defaultdict(list)
        self._start: dict[str, float] = {}
        stages = [("patch_embed", encoder.patch_embed), ("neck", encoder.neck)]
        for index, block in enumerate(encoder.blocks):
            kind = "global" if block.window_size == 0 else "window"
            stages.append((f"block{index:02d}_{kind}", block))
            stages.append((f"block{index:02d}_{kind}.attn", block.attn))
        for name, stage in stages:
            stage.register_forward_pre_hook(partial(self._pre, name))
            stage.register_forward_hook(partial(self._post, name))

    def _pre(self, name, module, args):
        self._start[name] = time.perf_counter()

    def _post(self, name, module, args, output):
        self.seconds[(self.label, name)].append(time.perf_counter() - self._start[name])


def timed(fn) -> tuple[torch.Tensor, float, float]:
    """Run ``fn`` once; return its output, wall seconds and process CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """Max abs difference, and that divided by the max abs expected value."""
    diff = (actual.float() - expected.float()).abs().max().item()
    return diff, diff / max(expected.abs().max().item(), 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="input image size (px)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per path (>= 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--bf16", action="store_true", help="also time fast path in bf16 autocast")
    parser.add_argument("--no-breakdown", action="store_true", help="skip per-block timing")
    parser.add_argument(
        "--max-mask-mib",
        type=float,
        default=DEFAULT_MAX_MASK_BYTES / 2**20,
        help="bias chunk budget of the fast path's global blocks (MiB)",
    )
    args = parser.parse_args()
    if args.size % 16 or args.size < 16:
        parser.error(f"--size {args.size}: must be a positive multiple of 16")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be >= 1")

    torch.set_num_threads(args.threads)
    encoder = build_vit_b_encoder(args.size)
    enable_fast_attention(encoder)
    enable_fast_mlp(encoder)
    enable_fast_layers(encoder)
    max_mask_bytes = int(args.max_mask_mib * 2**20)
    if max_mask_bytes != DEFAULT_MAX_MASK_BYTES:
        for block in encoder.blocks:
            block.attn.forward = partial(
                fast_attention_forward, block.attn, max_mask_bytes=max_mask_bytes
            )
    timer = None if args.no_breakdown else BlockTimer(encoder)
    image = torch.randn(1, 3, args.size, args.size)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"vit_b encoder {args.size}x{args.size}, repeats {args.repeats}, "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )

    def run_reference():
        with reference_attention():
            return encoder(image)

    def run_fast_attention_only():
        disable_fast_mlp(encoder)
        try:
            return encoder(image)
        finally:
            enable_fast_mlp(encoder)

    paths = {
        "reference": run_reference,
        "fast_attn": run_fast_attention_only,
        "fast": lambda: encoder(image),
    }
    if args.bf16:

        def run_bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return encoder(image)

        paths["fast_bf16"] = run_bf16

    wall: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for repeat in range(args.repeats):
            for name, fn in paths.items():
                if timer is not None:
                    timer.label = name
                out, seconds, cpu_seconds = timed(fn)
                outputs.setdefault(name, out)
                wall[name].append(seconds)
                cpu[name].append(cpu_seconds)
                print(
                    f"run {repeat + 1} {name:10s} {seconds:7.2f} s wall  {cpu_seconds:7.2f} s cpu",
                    flush=True,
                )

    reference = outputs["reference"]
    print("\naccuracy vs reference (max abs diff, relative to max |output|):")
    for name in paths:
        if name != "reference":
            diff, rel = relative_error(outputs[name], reference)
            print(f"  {name:10s} {diff:.3e}  ({rel:.2e} relative)")

    print("\nmedian wall s / median cpu s:")
    for name in paths:
        print(
            f"  {name:10s} {statistics.median(wall[name]):7.2f} / {statistics.median(cpu[name]):7.2f}"
        )
    ref_wall = statistics.median(wall["reference"])
    for name in paths:
        if name != "reference":
            print(
                f"speed-up {name} vs reference: {ref_wall / statistics.median(wall[name]):.2f}x wall, "
                f"{statistics.median(cpu['reference']) / statistics.median(cpu[name]):.2f}x cpu"
            )

    if timer is not None:
        print(
            "\nper-stage median wall s (reference | "
            + " | ".join(n for n in paths if n != "reference")
            + "):"
        )
        stages = sorted({stage for _, stage in timer.seconds})
        totals = defaultdict(float)
        for stage in stages:
            cells = []
            for name in paths:
                runs = timer.seconds.get((name, stage))
                if not runs:  # the fast windowed blocks call no Attention.forward
                    cells.append(f"{'-':>6s}")
                    continue
                median = statistics.median(runs)
                cells.append(f"{median:6.3f}")
                if stage.endswith(".attn"):
                    totals[name] += median
            print(f"  {stage:22s} " + " | ".join(cells))
        print("  attention total (global blocks only on fast paths) "
              + " | ".join(f"{totals[n]:6.3f}" for n in paths))
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")
    _, fast_rel = relative_error(outputs["fast"], reference)
    print(
        f"encoder speedup vs segment_anything: "
        f"{ref_wall / statistics.median(wall['fast']):.2f}x (max abs diff {fast_rel:.1e})"
    )


if __name__ == "__main__":
    main()
