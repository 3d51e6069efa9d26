"""Interactive prompt latency: seconds per prompt on a cached image embedding.

For the tiny model (256 px) and vit_b (1024 px, random weights: speed does not depend on
them) it prints the one-off encoder time of a window and, for point, box and
point+negative prompts on that window, the median time of the prompt-encoder + decoder
pass and of the whole ``PromptSession.segment`` (decoder + local post-processing + mask).
Target (issue 15): vit_b under 0.3 s per prompt on the 2-core CPU.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_prompts.py [--repeats 5]
[--threads 2] [--skip-vit-b]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from napari_amasam._sample_data import load_sample
from napari_amasam.config import ModelConfig
from napari_amasam.inference.prompting import Prompt, PromptSession
from napari_amasam.model import build_amasam


def _median_time(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(label: str, cfg: ModelConfig, repeats: int) -> None:
    torch.manual_seed(0)
    model = build_amasam(cfg).eval()
    image, _ = load_sample("monuseg_breast")
    size = cfg.image_size
    tiled = np.tile(image, (max(1, size // 512 + 1), max(1, size // 512 + 1), 1))[:size, :size]
    session = PromptSession(model, tiled)
    c = size // 2
    prompts = {
        "point": Prompt([[c, c]], [True]),
        "box": Prompt(box=[c - 20, c - 20, c + 20, c + 20]),
        "point + negative": Prompt([[c, c], [c + 6, c + 6]], [True, False]),
    }
    start = time.perf_counter()
    cached = session.prepare(prompts["point"])
    encode = time.perf_counter() - start
    print(f"{label}: window {size}x{size}, encoder once {encode:.3f} s")
    print(f"  {'prompt':<18}{'decoder s':>11}{'segment s':>11}{'vs encoder':>12}")
    for name, prompt in prompts.items():
        session.decode(prompt, cached)  # warm-up
        decoder = _median_time(lambda: session.decode(prompt, cached), repeats)
        whole = _median_time(lambda: session.segment(prompt), repeats)
        print(f"  {name:<18}{decoder:>11.3f}{whole:>11.3f}{encode / whole:>11.1f}x")
    assert session.encoder_runs == 1, "a prompt re-ran the encoder"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-vit-b", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}")
    bench("tiny (embed 96, depth 4)", ModelConfig(backbone="tiny", image_size=256), args.repeats)
    if not args.skip_vit_b:
        bench("vit_b", ModelConfig(backbone="vit_b"), args.repeats)


if __name__ == "__main__":
    main()
