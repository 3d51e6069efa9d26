"""Conditional gradient reversal, domain discriminator and lambda schedule (method.md 1.3 B).

CGRL is the identity in the forward pass. In the backward pass the domain-loss gradient is
zeroed for primary rows (``domain == 0``: the primary features are never pushed by the domain
loss) and reversed and scaled by lambda for auxiliary rows (they learn to look primary).
A plain GRL (Ganin & Lempitsky, arXiv 1409.7495) reverses every row. The discriminator's own
weights always get the ordinary gradient, from every row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ALIGNMENT_MODES = ("cgrl", "grl", "none")


def _row_mask(domain: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) bool -> broadcastable to ``like`` (B, ...)."""
    return domain.reshape(-1, *([1] * (like.dim() - 1)))


class _ConditionalGradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, domain, lam):  # noqa: D102
        ctx.save_for_backward(domain)
        ctx.lam = float(lam)
        return features.view_as(features)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (domain,) = ctx.saved_tensors
        auxiliary = _row_mask(domain != 0, grad)
        # where(), not a 0/1 product, so primary rows are exact zeros even for inf/nan grads
        reversed_grad = torch.where(auxiliary, grad * -ctx.lam, torch.zeros_like(grad))
        return reversed_grad, None, None


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, lam):  # noqa: D102
        ctx.lam = float(lam)
        return features.view_as(features)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad * -ctx.lam, None


def conditional_gradient_reversal(
    features: torch.Tensor, domain: torch.Tensor, lam: float
) -> torch.Tensor:
    """CGRL: identity forward; backward 0 for primary rows, ``-lam * grad`` for the others.

    Parameters
    ----------
    features : Tensor
        (B, ...) features, e.g. the encoder embedding (B, 256, h, w).
    domain : Tensor
        (B,) integer domain ids, 0 = primary.
    lam : float
        Reversal strength lambda >= 0.

    Returns
    -------
    Tensor
        Same values and shape as ``features``.
    """
    if domain.dim() != 1 or domain.shape[0] != features.shape[0]:
        raise ValueError(
            f"domain must be a ({features.shape[0]},) tensor, got shape {tuple(domain.shape)}"
        )
    return _ConditionalGradientReversal.apply(features, domain.to(features.device), lam)


def gradient_reversal(features: torch.Tensor, lam: float) -> torch.Tensor:
    """Plain GRL: identity forward, ``-lam * grad`` backward for every row."""
    return _GradientReversal.apply(features, lam)


def align_features(
    features: torch.Tensor, domain: torch.Tensor, lam: float, mode: str
) -> torch.Tensor:
    """Route features to the discriminator according to the alignment ``mode``.

    ``cgrl``: :func:`conditional_gradient_reversal`; ``grl``: :func:`gradient_reversal`;
    ``none``: detached (the discriminator may still train, the encoder gets nothing).
    """
    if mode == "cgrl":
        return conditional_gradient_reversal(features, domain, lam)
    if mode == "grl":
        return gradient_reversal(features, lam)
    if mode == "none":
        return features.detach()
    raise ValueError(f"alignment must be one of {', '.join(ALIGNMENT_MODES)}, not {mode!r}")


def lambda_schedule(progress: float, lambda_max: float = 1.0, kind: str = "dann") -> float:
    """Reversal strength at training ``progress`` p in [0, 1].

    ``dann``: ``lambda_max * (2 / (1 + exp(-10 p)) - 1)`` (Ganin et al., arXiv 1505.07818),
    rising from 0 to ~lambda_max; ``constant``: ``lambda_max``.
    """
    p = min(max(float(progress), 0.0), 1.0)
    if kind == "dann":
        return lambda_max * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)
    if kind == "constant":
        return float(lambda_max)
    raise ValueError(f"lambda schedule must be dann or constant, not {kind!r}")


class DomainDiscriminator(nn.Module):
    """Classify the domain of encoder features: logit of P(primary).

    Conv3x3 s2 -> GELU -> Conv3x3 s2 -> GELU -> global average pool -> Linear -> GELU ->
    Dropout(0.5) -> Linear -> 1 logit.

    Parameters
    ----------
    in_channels : int
        Channels of the features (256 for SAM's neck).
    hidden : int
        Width of the convolutions and the hidden Linear. method.md suggests 256 (~1.25 M
        parameters); the default 128 (~0.46 M) keeps ViT-B AMA-SAM's trainable share under
        5 % (see ``AmaSam.parameter_report``).

    Forward: (B, in_channels, h, w) -> (B, 1).
    """

    def __init__(self, in_channels: int = 256, hidden: int = 128, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, h, w) features [+ (B, S, S) valid-pixel mask] -> (B, 1) logits.

        With ``valid`` (False on crop padding), padding is kept out of the evidence: feature
        positions whose patch holds any padding are zeroed, and the global pool averages only
        the positions whose receptive field lies wholly in the image. Otherwise a domain whose
        crops are padded (small auxiliary images) could be told apart by its padding, and the
        reversed gradient would teach the encoder to hide padding instead of stain.
        """
        if valid is None:
            return self.classifier(self.features(x))
        conv = self.features[:4]  # conv, GELU, conv, GELU (then pool, flatten)
        height, width = x.shape[-2:]
        invalid = 1.0 - valid.to(x.dtype).unsqueeze(1)  # B,1,S,S
        token_invalid = F.adaptive_max_pool2d(invalid, (height, width))  # any padding in patch
        y = conv(x * (1.0 - token_invalid))
        # receptive field of the two stride-2 3x3 convs: 7 tokens, stride 4
        out_invalid = F.max_pool2d(token_invalid, 7, stride=4, padding=3)
        weight = 1.0 - out_invalid[..., : y.shape[-2], : y.shape[-1]]
        if bool((weight.flatten(1).sum(1) == 0).any()):
            # an image smaller than the receptive field: weight by the valid share instead
            share = F.adaptive_avg_pool2d(1.0 - token_invalid, y.shape[-2:])
            empty = (weight.flatten(1).sum(1) == 0).view(-1, 1, 1, 1)
            weight = torch.where(empty, share, weight)
        pooled = (y * weight).flatten(2).sum(-1) / weight.flatten(2).sum(-1).clamp_min(1e-6)
        return self.classifier(pooled)
