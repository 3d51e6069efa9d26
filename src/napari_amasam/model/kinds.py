"""Build the network of a model kind (``ModelConfig.kind``) on already-built SAM parts.

``amasam`` is :class:`model.amasam.AmaSam`; ``sam-da`` is :class:`model.sam_da.SamDa`;
``ca-sam`` is :class:`model.ca_sam.CaSam`. All three share the forward contract (images
B,3,S,S 0-255 -> ``AmaSamOutput``) and the weight bookkeeping, so training, the model folder,
the predictor, the CLI and the widgets treat them alike.
"""

from __future__ import annotations

from segment_anything.modeling import Sam

from ..config import ModelConfig


def build_variant_model(cfg: ModelConfig, sam: Sam):
    """The ``sam-da`` or ``ca-sam`` network for ``cfg`` on ``sam``."""
    if cfg.kind == "sam-da":
        from .sam_da import SamDa

        return SamDa(cfg, sam)
    if cfg.kind == "ca-sam":
        from .ca_sam import CaSam

        return CaSam(cfg, sam)
    raise ValueError(f"no variant model for kind {cfg.kind!r}")


def parameter_summary(model) -> str:
    """One line: kind, trainable / total parameters and the trainable share."""
    report = model.parameter_report()
    line = (f"{model.cfg.kind} ({model.cfg.backbone}): {report['trainable'] / 1e6:.3f} M of "
            f"{report['total'] / 1e6:.2f} M parameters trainable ({100 * report['share']:.3f} %)")
    if "per_task" in report:
        line += f"; {report['per_task'] / 1e6:.3f} M per CA-SAM task"
    return line
