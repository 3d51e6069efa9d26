"""Trainable share of each model kind on the real SAM shapes (built on the meta device: no
weights are allocated and nothing runs at 1024 px).

    .venv/bin/python benchmarks/bench_kind_parameters.py [--backbones vit_b vit_l vit_h]
"""

from __future__ import annotations

import argparse
import logging

import torch


def main() -> None:
    from napari_amasam.config import ModelConfig
    from napari_amasam.model import build_amasam
    from napari_amasam.training.continual import prepare_model_for_training

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["vit_b"])
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # "no checkpoint" warnings: shapes only here
    print("| backbone | kind | total | trained | share | stored per CA-SAM task |")
    print("|---|---|---|---|---|---|")
    for backbone in args.backbones:
        for kind, extra in (("amasam", {}), ("amasam", {"num_domains": 4}), ("sam-da", {}),
                            ("ca-sam", {}), ("ca-sam", {"num_tasks": 3})):
            with torch.device("meta"):
                model = build_amasam(ModelConfig(backbone=backbone, kind=kind, **extra))
            prepare_model_for_training(model)  # a later CA-SAM task trains its layer only
            r = model.parameter_report()
            label = kind + "".join(f", {k} {v}" for k, v in extra.items())
            per_task = f"{r['per_task'] / 1e6:.3f} M" if "per_task" in r else "-"
            print(f"| {backbone} | {label} | {r['total'] / 1e6:.2f} M | {r['trainable'] / 1e6:.3f} M "
                  f"| {100 * r['share']:.3f} % | {per_task} |")


if __name__ == "__main__":
    main()
