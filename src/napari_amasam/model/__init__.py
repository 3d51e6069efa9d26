"""The AMA-SAM network on Segment Anything (see ``docs/architecture.md``, Model contract)."""

from .amasam import AmaSam, AmaSamOutput, build_amasam
from .backbone import MODEL_REGISTRY, SAM_VARIANTS, build_sam_parts, load_sam_checkpoint
from .cgrl import (
    DomainDiscriminator,
    conditional_gradient_reversal,
    gradient_reversal,
    lambda_schedule,
)

__all__ = [
    "AmaSam",
    "AmaSamOutput",
    "DomainDiscriminator",
    "MODEL_REGISTRY",
    "SAM_VARIANTS",
    "build_amasam",
    "build_sam_parts",
    "conditional_gradient_reversal",
    "gradient_reversal",
    "lambda_schedule",
    "load_sam_checkpoint",
]
