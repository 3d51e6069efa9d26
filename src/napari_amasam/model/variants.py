"""Optional variants: SAM-DA decoder adapter (method.md 3.1), CA-SAM alignment layer (3.2).

Both start as (near) identity so a fresh model behaves like plain AMA-SAM:

* :class:`DecoderAdapter` (``ModelConfig.decoder_adapter``): P learnable prompt tokens join the
  queries before each two-way block of SAM's decoder transformer and are dropped afterwards; a
  zero-initialised residual adapter (256 -> 32 -> 256) follows each block on the token stream
  (whose last update in a block is the MLP) and on the image stream. The frozen transformer's
  own modules are called unchanged. Deviation from method.md: no prompt tokens before the final
  token->image attention, because there each query attends to the image independently, so
  extra queries could not change the kept tokens (70,784 instead of ~72 k parameters).
* :class:`AlignmentLayer` (``ModelConfig.alignment_layer_blocks``): residual blocks
  ``y = x + SE(Conv3x3(GELU(Conv3x3(x))))`` on E, last conv zero-initialised (identity at
  start). CA-SAM's per-task VAE routing is not implemented.
"""

from __future__ import annotations

import torch
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import nn

from .adapters import MLPAdapter


class ResidualAdapter(MLPAdapter):
    """``x + up(GELU(down(x)))`` on the last dim: the encoder's zero-initialised MLP adapter
    with its own residual (identity at start), sized by a hidden width.

    Forward: (..., dim) -> (..., dim).
    """

    def __init__(self, dim: int = 256, hidden: int = 32):
        super().__init__(dim, ratio=hidden / dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class DecoderAdapter(nn.Module):
    """SAM-DA style adapter around a (frozen) SAM ``TwoWayTransformer``.

    Parameters
    ----------
    depth : int
        Number of two-way blocks (SAM: 2).
    dim : int
        Token width (256).
    num_prompts : int
        Learnable prompt tokens per block (method.md: 8).
    hidden : int
        Bottleneck of the residual adapters.
    """

    def __init__(self, depth: int = 2, dim: int = 256, num_prompts: int = 8, hidden: int = 32):
        super().__init__()
        self.prompts = nn.Parameter(0.02 * torch.randn(depth, num_prompts, dim))
        self.token_adapters = nn.ModuleList(ResidualAdapter(dim, hidden) for _ in range(depth))
        self.image_adapters = nn.ModuleList(ResidualAdapter(dim, hidden) for _ in range(depth))

    def forward(
        self,
        transformer: TwoWayTransformer,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as ``TwoWayTransformer.forward``.

        Parameters
        ----------
        transformer : TwoWayTransformer
            SAM's transformer whose blocks are run.
        image_embedding, image_pe : Tensor
            (B, C, h, w).
        point_embedding : Tensor
            (B, N, C) output tokens.

        Returns
        -------
        queries : Tensor
            (B, N, C) processed tokens.
        keys : Tensor
            (B, h*w, C) processed image tokens.
        """
        if len(transformer.layers) != self.prompts.shape[0]:
            raise ValueError(
                f"decoder adapter built for {self.prompts.shape[0]} blocks, the transformer "
                f"has {len(transformer.layers)}"
            )
        batch, n_tokens = point_embedding.shape[:2]
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for i, layer in enumerate(transformer.layers):
            prompts = self.prompts[i].unsqueeze(0).expand(batch, -1, -1)
            # the prompts act as their own positional embedding, like SAM's output tokens
            queries, keys = layer(
                queries=torch.cat([queries, prompts], dim=1),
                keys=keys,
                query_pe=torch.cat([point_embedding, prompts], dim=1),
                key_pe=key_pe,
            )
            queries = self.token_adapters[i](queries[:, :n_tokens])
            keys = self.image_adapters[i](keys)
        q = queries + point_embedding
        k = keys + key_pe
        queries = queries + transformer.final_attn_token_to_image(q=q, k=k, v=keys)
        return transformer.norm_final_attn(queries), keys


class SqueezeExcitation(nn.Module):
    """Channel attention ``x * sigmoid(W2 relu(W1 GAP(x)))``; (B, C, h, w) -> same."""

    def __init__(self, channels: int = 256, reduced: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(weights)


class AlignmentBlock(nn.Module):
    """``y = x + SE(Conv3x3(GELU(Conv3x3(x))))``, second conv zero-initialised."""

    def __init__(self, channels: int = 256):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.se = SqueezeExcitation(channels, 16)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.se(self.conv2(self.act(self.conv1(x))))


class AlignmentLayer(nn.Sequential):
    """CA-SAM alignment layer A_t on the image embedding: (B, 256, h, w) -> same.

    Parameters
    ----------
    num_blocks : int
        Number of :class:`AlignmentBlock` (method.md: 2-4; ~1.2 M parameters each).
    channels : int
        Embedding channels (256).
    """

    def __init__(self, num_blocks: int, channels: int = 256):
        super().__init__(*(AlignmentBlock(channels) for _ in range(num_blocks)))
