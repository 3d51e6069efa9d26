"""Model size and CPU speed: the ViT-B parameter table and forward times.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_model.py [--skip-vit-b]``.
The ViT-B forward (1024 px, random weights) takes about a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from napari_amasam.config import ModelConfig
from napari_amasam.model import build_amasam
from napari_amasam.model.cgrl import DomainDiscriminator
from napari_amasam.model.hr_decoder import HRDecoder


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def parameter_table() -> None:
    print("ViT-B AMA-SAM parameters (M = 1e6)")
    print(f"{'configuration':<44}{'total':>10}{'trainable':>11}{'share':>8}")
    for label, cfg in [
        ("single domain (no discriminator)", ModelConfig(backbone="vit_b", num_domains=1)),
        ("4 domains, CGRL + discriminator", ModelConfig(backbone="vit_b", num_domains=4)),
        ("4 domains + SAM-DA decoder adapter",
         ModelConfig(backbone="vit_b", num_domains=4, decoder_adapter=True)),
        ("4 domains + CA-SAM alignment (2 blocks)",
         ModelConfig(backbone="vit_b", num_domains=4, alignment_layer_blocks=2)),
    ]:
        model = build_amasam(cfg)
        r = model.parameter_report()
        print(f"{label:<44}{r['total'] / 1e6:>9.2f}M{r['trainable'] / 1e6:>10.3f}M"
              f"{100 * r['share']:>7.2f}%")
        if cfg.num_domains == 4 and not cfg.decoder_adapter and not cfg.alignment_layer_blocks:
            for name, n in r["modules"].items():
                print(f"    {name:<40}{n / 1e6:>20.3f}M")
            # what method.md's widths would cost (discriminator 256, F_early convT 256)
            wide_disc = _count(DomainDiscriminator(256, hidden=256))
            wide_hr = _count(HRDecoder(model.sam.mask_decoder, 768, early_hidden=256))
            extra = wide_disc - r["modules"]["discriminator"] + wide_hr - r["modules"]["hr_decoder"]
            share = (r["trainable"] + extra) / (r["total"] + extra)
            print(f"    (method.md widths: discriminator {wide_disc / 1e6:.3f}M, HR-Decoder "
                  f"{wide_hr / 1e6:.3f}M -> trainable {(r['trainable'] + extra) / 1e6:.3f}M, "
                  f"share {100 * share:.2f}%)")


def time_forward(cfg: ModelConfig, repeats: int) -> float:
    model = build_amasam(cfg).eval()
    images = torch.rand(1, 3, cfg.image_size, cfg.image_size) * 255
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-vit-b", action="store_true", help="skip the ~1 min ViT-B forward")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # hide the random-weights warning
    torch.set_num_threads(args.threads)
    parameter_table()
    print(f"\nforward, 1 image, {args.threads} threads, fp32, torch.inference_mode")
    tiny = ModelConfig(backbone="tiny", image_size=256)
    print(f"tiny (embed {tiny.tiny_embed_dim}, depth {tiny.tiny_depth}) 256 px: "
          f"{time_forward(tiny, 5):.3f} s (best of 5)")
    if not args.skip_vit_b:
        print(f"vit_b 1024 px (random weights): {time_forward(ModelConfig(backbone='vit_b'), 1):.1f} s")


if __name__ == "__main__":
    main()
