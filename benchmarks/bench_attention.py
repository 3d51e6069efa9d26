"""One vit_b attention core, the three ways the encoder can compute it, on the CPU.

For a global block (1 image, 12 heads, 64 x 64 = 4096 tokens, head width 64) and a windowed
block (25 windows of 14 x 14 tokens), with random q, k, v and relative-position tables
(seed 0), times interleaved repeats (medians) of:

``fp32 fused``
    ``rel_pos_attention`` in float32: SDPA's fused kernel with the bias as a mask, in chunks.
``bf16 fused``
    the same in bf16 (what CPU bf16 inference ran until 2026-12-08).
``bf16 products``
    ``_gemm_softmax_attention``: bias + ``scale * q k^T`` by ``baddbmm``, in-place softmax,
    ``bmm`` (what CPU bf16 inference runs where the CPU computes bf16 natively).

and prints the RMS and max deviation of each bf16 output from the float32 one (all paths get
the same bf16-representable inputs), relative to the output's largest value. q/k/v projections are not included (see
``bench_encoder.py`` for whole blocks).

Usage::

    PYTHONPATH=src python benchmarks/bench_attention.py [--repeats 5] [--threads 2]

The last line reads ``bf16 products vs fused (global block): X.XXx``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from napari_amasam.model import attention_core as core

CASES = {"global": (1, 64), "windowed": (25, 14)}  # (items, grid side)
HEADS, WIDTH = 12, 64


def _inputs(items: int, side: int) -> tuple[torch.Tensor, ...]:
    """q, k, v and the two tables, float32 holding bf16 values, so that every path sees
    the same numbers and the deviations are the attention's own."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(items, HEADS, side * side, WIDTH, generator=gen) for _ in range(3))
    tables = [torch.randn(2 * side - 1, WIDTH, generator=gen) * 0.3 for _ in range(2)]
    return tuple(t.bfloat16().float() for t in (q, k, v, *tables))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}, repeats {args.repeats}, "
          f"native bf16 {core.cpu_has_native_bf16()}")
    ratio = None
    for case, (items, side) in CASES.items():
        q, k, v, table_h, table_w = _inputs(items, side)
        q16, k16, v16 = q.bfloat16(), k.bfloat16(), v.bfloat16()
        scale, size = WIDTH**-0.5, (side, side)
        rel_h, rel_w = core.rel_pos_bias_terms(q16, table_h, table_w, size)
        row_bytes = HEADS * side * side * side * 2  # one grid row of bf16 bias
        chunks = core._query_chunks(items, side, row_bytes, core.DEFAULT_MAX_MASK_BYTES)
        paths = {
            "fp32 fused": partial(core.rel_pos_attention, q, k, v, scale, table_h, table_w, size),
            "bf16 fused": partial(core._fused_attention, q16, k16, v16, scale, rel_h, rel_w, chunks),
            "bf16 products": partial(core._gemm_softmax_attention, q16, k16, v16, scale, rel_h, rel_w),
        }
        times: dict[str, list[float]] = {name: [] for name in paths}
        with torch.inference_mode():
            outputs = {name: run() for name, run in paths.items()}  # warm-up
            expected = outputs["fp32 fused"]
            for _ in range(args.repeats):
                for name, run in paths.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
        top = expected.abs().max().item()
        print(f"\n{case} block: {items} x {HEADS} heads x {side * side} tokens x {WIDTH}")
        for name, out in outputs.items():
            error = out.float() - expected
            deviation = (f"deviation from fp32: rms {error.pow(2).mean().sqrt().item() / top:.2e}, "
                         f"max {error.abs().max().item() / top:.2e}") if out is not expected else ""
            print(f"  {name:14s} {statistics.median(times[name]):7.3f} s   {deviation}")
        if case == "global":
            ratio = statistics.median(times["bf16 fused"]) / statistics.median(
                times["bf16 products"])
    print(f"\nbf16 products vs fused (global block): {ratio:.2f}x")


if __name__ == "__main__":
    main()
