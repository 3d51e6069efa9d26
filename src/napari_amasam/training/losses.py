"""Training losses (method.md 1.3 "Losses" and 5.1).

``L = L_fine + 0.5 L_coarse + L_dist + L_dom`` where
``L_fine = 0.8 Dice + 0.2 focal`` on the full-resolution logits, ``L_coarse`` is BCE on the
1/4-resolution logits against the foreground downsampled (nearest), ``L_dist`` is the soft
Dice of the centre- and boundary-distance maps inside the true foreground, and ``L_dom`` is
BCE of the discriminator's P(primary) logit. Padding pixels (``valid == 0``) never count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-6


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice over the whole batch. All tensors B,1,H,W (or broadcastable)."""
    prob, target = prob * weight, target * weight
    inter = (prob * target).sum()
    denom = (prob * prob).sum() + (target * target).sum()
    return 1.0 - (2.0 * inter + EPS) / (denom + EPS)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
               alpha: float = 0.8, gamma: float = 2.0) -> torch.Tensor:
    """UN-SAM's focal form ``alpha (1 - e^-BCE)^gamma BCE``, averaged over valid pixels."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    focal = alpha * (1.0 - torch.exp(-bce)) ** gamma * bce
    return (focal * weight).sum() / weight.sum().clamp_min(1.0)


def masked_bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * weight).sum() / weight.sum().clamp_min(1.0)


@dataclass
class LossWeights:
    fine_dice: float = 0.8
    fine_focal: float = 0.2
    coarse: float = 0.5
    distance: float = 1.0
    domain: float = 1.0


def amasam_loss(output, targets: torch.Tensor, valid: torch.Tensor, domain: torch.Tensor,
                weights: LossWeights | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts.

    Parameters
    ----------
    output : AmaSamOutput
        ``fine_logits`` B,1,S,S; ``coarse_logits`` B,1,S/4,S/4; ``distance_logits`` B,2,S,S
        or None; ``domain_logits`` B,1 or None.
    targets : B,3,S,S float
        Foreground, centre distance, boundary distance (``data.targets.instance_targets``).
    valid : B,S,S bool or float
        1 where the crop holds real image pixels, 0 on padding.
    domain : B long
        0 = primary, >0 auxiliary.
    """
    weights = weights or LossWeights()
    fine = output.fine_logits.float()
    valid = valid.float().unsqueeze(1)
    fg = targets[:, :1].float()
    parts: dict[str, torch.Tensor] = {}
    parts["fine_dice"] = soft_dice_loss(torch.sigmoid(fine), fg, valid)
    parts["fine_focal"] = focal_loss(fine, fg, valid)
    total = weights.fine_dice * parts["fine_dice"] + weights.fine_focal * parts["fine_focal"]

    coarse = output.coarse_logits.float()
    factor = fine.shape[-1] // coarse.shape[-1]
    # Nearest downsampling: take the centre-ish pixel of every factor x factor block.
    fg_small = fg[..., factor // 2 :: factor, factor // 2 :: factor]
    valid_small = valid[..., factor // 2 :: factor, factor // 2 :: factor]
    parts["coarse"] = masked_bce(coarse, fg_small, valid_small)
    total = total + weights.coarse * parts["coarse"]

    if output.distance_logits is not None:
        dist = torch.sigmoid(output.distance_logits.float())
        inside = fg * valid  # distances are only defined inside nuclei
        parts["center"] = soft_dice_loss(dist[:, :1], targets[:, 1:2].float(), inside)
        parts["boundary"] = soft_dice_loss(dist[:, 1:2], targets[:, 2:3].float(), inside)
        total = total + weights.distance * (parts["center"] + parts["boundary"])

    if output.domain_logits is not None:
        is_primary = (domain == 0).float().view(-1, 1)
        parts["domain"] = F.binary_cross_entropy_with_logits(output.domain_logits.float(), is_primary)
        total = total + weights.domain * parts["domain"]

    return total, {k: float(v.detach()) for k, v in parts.items()}
