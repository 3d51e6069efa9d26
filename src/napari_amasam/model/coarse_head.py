"""SPGen-style coarse head (method.md 1.3 C, UN-SAM's self-prompt generator, section 2).

Four branches on the image embedding E (B, 256, h, w), each giving one logit map at 4h x 4w,
summed into the coarse logits:

1. max-pool to h/2 -> 1x1 conv -> bilinear x8 (global, blob-level context);
2. 1x1 conv -> bilinear x4;
3. transposed conv to 2h (64 channels) -> 1x1 conv -> bilinear x2;
4. two transposed convs (LayerNorm2d, GELU) to 4h (64, then 16 channels) -> 1x1 conv.

The coarse logits are supervised against the ground truth downsampled 4x and, detached and
thresholded, become SAM's dense mask prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn


class CoarseHead(nn.Module):
    """Four-branch coarse mask head.

    Parameters
    ----------
    in_channels : int
        Channels of E (256).

    Forward: E (B, C, h, w) -> coarse logits (B, 1, 4h, 4w).
    """

    def __init__(self, in_channels: int = 256):
        super().__init__()
        self.pooled = nn.Conv2d(in_channels, 1, 1)
        self.direct = nn.Conv2d(in_channels, 1, 1)
        self.up2 = nn.Sequential(
            nn.ConvTranspose2d(in_channels, 64, 2, stride=2), nn.GELU(), nn.Conv2d(64, 1, 1)
        )
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(in_channels, 64, 2, stride=2),
            LayerNorm2d(64),
            nn.GELU(),
            nn.ConvTranspose2d(64, 16, 2, stride=2),
            LayerNorm2d(16),
            nn.GELU(),
            nn.Conv2d(16, 1, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        h, w = embedding.shape[-2:]
        size = (4 * h, 4 * w)

        def upsample(x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

        pooled = F.adaptive_max_pool2d(embedding, (max(1, h // 2), max(1, w // 2)))
        return (
            upsample(self.pooled(pooled))
            + upsample(self.direct(embedding))
            + upsample(self.up2(embedding))
            + self.up4(embedding)
        )
