"""Encoder adapters (method.md 1.3 A) and the early-feature tap (1.3 D.2).

Each SAM ViT block ``x = x + Attn(LN1(x)); x = x + MLP(LN2(x))`` becomes

    x = x + Attn(LN1(x));  h = LN2(x)
    x = x + MLP(h) + s * Adapter(h)        Adapter: Linear(C, rC) -> GELU -> Linear(rC, C)

with the adapter's last Linear zero-initialised, so an adapted encoder starts equal to SAM.
``AdaptedBlock`` subclasses segment_anything's ``Block`` and adopts the original block's
submodules, so the official keys (``blocks.i.norm1.*``, ``attn.*``, ``norm2.*``, ``mlp.*``)
are unchanged and only ``blocks.i.adapter.*`` is new.
"""

from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import Block, ImageEncoderViT
from torch import nn

from .fast_attention import windowed_attention


class MLPAdapter(nn.Module):
    """Bottleneck MLP ``Linear(C, rC) -> GELU -> Linear(rC, C)``, output zero at init.

    Parameters
    ----------
    dim : int
        Token width C.
    ratio : float
        Bottleneck width as a fraction of ``dim``.
    """

    def __init__(self, dim: int, ratio: float = 0.25):
        super().__init__()
        hidden = max(1, int(round(dim * ratio)))
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        # zero output: the adapted block is exactly SAM's block at step 0
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (..., C) -> (..., C)."""
        return self.up(self.act(self.down(x)))


class AdaptedBlock(Block):
    """segment_anything ``Block`` with a parallel MLP adapter beside its MLP.

    Build it with :meth:`from_block`; it reuses the given block's ``norm1``, ``attn``,
    ``norm2`` and ``mlp`` modules (same tensors, same state-dict keys).

    Forward: (B, H, W, C) channels-last tokens -> (B, H, W, C).
    """

    adapter: MLPAdapter
    adapter_scale: float

    @classmethod
    def from_block(cls, block: Block, ratio: float = 0.25, scale: float = 0.5) -> AdaptedBlock:
        """Wrap ``block`` (its submodules are shared, not copied)."""
        adapted = cls.__new__(cls)
        nn.Module.__init__(adapted)
        adapted.norm1 = block.norm1
        adapted.attn = block.attn
        adapted.norm2 = block.norm2
        adapted.mlp = block.mlp
        adapted.window_size = block.window_size
        dim = block.norm1.normalized_shape[0]
        ref = block.norm1.weight
        adapted.adapter = MLPAdapter(dim, ratio).to(device=ref.device, dtype=ref.dtype)
        adapted.adapter_scale = float(scale)
        adapted.train(block.training)
        return adapted

    @property
    def is_global(self) -> bool:
        """True for a global-attention block (no windows)."""
        return self.window_size == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # window_partition -> attn -> window_unpartition (projecting only the real tokens
        # when the attention is on the fast path)
        x = x + windowed_attention(self.attn, self.norm1(x), self.window_size)
        h = self.norm2(x)
        return x + self.mlp(h) + self.adapter_scale * self.adapter(h)


def insert_adapters(encoder: ImageEncoderViT, ratio: float, scale: float) -> list[MLPAdapter]:
    """Replace every block of ``encoder`` in place by an :class:`AdaptedBlock`.

    Returns
    -------
    list of MLPAdapter
        The new adapters, one per block.
    """
    for i, block in enumerate(encoder.blocks):
        if not isinstance(block, AdaptedBlock):
            encoder.blocks[i] = AdaptedBlock.from_block(block, ratio, scale)
    return [block.adapter for block in encoder.blocks]


def first_global_block(encoder: ImageEncoderViT) -> int:
    """Index of the first global-attention block (vit_b: 2, vit_h: 7)."""
    for i, block in enumerate(encoder.blocks):
        if block.window_size == 0:
            return i
    raise ValueError("the image encoder has no global-attention block")


def encode_with_early_features(
    encoder: ImageEncoderViT, x: torch.Tensor, tap_index: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the (adapted) encoder and also return the first global block's output.

    Parameters
    ----------
    encoder : ImageEncoderViT
        SAM image encoder (plain or with :class:`AdaptedBlock` blocks).
    x : Tensor
        (B, 3, S, S) normalised images.
    tap_index : int, optional
        Block whose output is F_early; default the first global-attention block.

    Returns
    -------
    E : Tensor
        (B, 256, S/16, S/16) neck output, identical to ``encoder(x)``.
    F_early : Tensor
        (B, C, S/16, S/16) tokens after block ``tap_index`` (C = embed dim).
    """
    if tap_index is None:
        tap_index = first_global_block(encoder)
    x = encoder.patch_embed(x)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    early = None
    for i, block in enumerate(encoder.blocks):
        x = block(x)
        if i == tap_index:
            early = x
    assert early is not None
    embedding = encoder.neck(x.permute(0, 3, 1, 2))
    return embedding, early.permute(0, 3, 1, 2)
