"""Faster, numerically equivalent forward for Segment Anything's ``Attention``.

The attention core, ``softmax(q k^T * scale + bias) v`` with SAM's decomposed relative-position
bias, lives in :mod:`.attention_core` (fused SDPA with the bias in bounded chunks; in CPU bf16
inference oneDNN bf16 products); this module switches segment_anything's modules to it.

The q/k/v and output projections (and the MLP's linears) go through
:func:`~.fast_linear.fast_linear`: oneDNN's linear, in float32 or, under CPU bf16 autocast,
with cached bf16 weights and the activation fused.

Public API
----------
``enable_fast_attention(module) -> int``
    Switch every ``Attention`` inside ``module`` to the fast forward (state_dict unchanged).
``disable_fast_attention(module) -> int``
    Switch them back.
``reference_attention()``
    Context manager: inside it, switched modules run the original forward.
``enable_fast_mlp(module) -> int`` / ``disable_fast_mlp(module) -> int``
    The same for segment_anything ``MLPBlock`` (linear + activation + linear).
``fast_attention_forward(attn, x)``
    The fast forward as a function, for modules that re-implement ``Attention`` with the
    same attributes (``qkv``, ``proj``, ``num_heads``, ``scale``, ``use_rel_pos``,
    ``rel_pos_h``, ``rel_pos_w``).
``rel_pos_attention(q, k, v, ...)``
    The attention core on ``(B, heads, N, head_dim)`` tensors (from :mod:`.attention_core`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import (
    Attention,
    Block,
    window_partition,
    window_unpartition,
)
from torch import nn

from .attention_core import (
    DEFAULT_MAX_MASK_BYTES,
    DEFAULT_MAX_MASK_BYTES_CUDA,
    rel_pos_attention,
    rel_pos_bias_terms,
)
from .fast_linear import fast_linear

__all__ = [
    "DEFAULT_MAX_MASK_BYTES",
    "DEFAULT_MAX_MASK_BYTES_CUDA",
    "FastAttention",
    "FastBlock",
    "FastMLPBlock",
    "disable_fast_attention",
    "disable_fast_mlp",
    "enable_fast_attention",
    "enable_fast_mlp",
    "fast_attention_enabled",
    "fast_attention_forward",
    "fast_mlp_forward",
    "reference_attention",
    "rel_pos_attention",
    "rel_pos_bias_terms",
    "windowed_attention",
]


# Thread-local so that a reference run in one thread (e.g. a test or a benchmark) does not
# switch the path of a worker thread running inference at the same time.
_state = threading.local()


def fast_attention_enabled() -> bool:
    """Return whether switched modules currently take the fast path (False inside
    :func:`reference_attention`)."""
    return not getattr(_state, "force_reference", False)


@contextlib.contextmanager
def reference_attention() -> Iterator[None]:
    """Run switched ``Attention`` (and ``MLPBlock``) modules with the original forward.

    Used to compare the two paths on the same weights without re-switching modules. Affects
    only the current thread.
    """
    previous = getattr(_state, "force_reference", False)
    _state.force_reference = True
    try:
        yield
    finally:
        _state.force_reference = previous


def fast_attention_forward(
    attn: nn.Module, x: torch.Tensor, max_mask_bytes: int | None = None
) -> torch.Tensor:
    """Drop-in replacement for ``Attention.forward``.

    Parameters
    ----------
    attn : nn.Module
        A segment_anything ``Attention`` (or a module with the same attributes).
    x : torch.Tensor
        Tokens ``(B, H, W, dim)`` (windows or the full grid).
    max_mask_bytes : int or None
        Bias chunk budget, see :func:`rel_pos_attention`.

    Returns
    -------
    torch.Tensor
        ``(B, H, W, dim)``, equal to the reference forward within float rounding.
    """
    batch, height, width, _ = x.shape
    heads = attn.num_heads
    # (B, N, 3, heads, C) -> three (B, heads, N, C) strided views (rel_pos_attention makes
    # them contiguous, one copy each, as the reference's reshape into (3, B*heads, N, C) does).
    qkv = fast_linear(attn.qkv, x).reshape(batch, height * width, 3, heads, -1)
    qkv = qkv.permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if attn.use_rel_pos:
        out = rel_pos_attention(
            q, k, v, attn.scale, attn.rel_pos_h, attn.rel_pos_w, (height, width), max_mask_bytes
        )
    else:
        out = rel_pos_attention(q, k, v, attn.scale, max_mask_bytes=max_mask_bytes)
    return fast_linear(attn.proj, out.reshape(batch, height, width, -1))


def _fast_windowed_attention(attn: nn.Module, x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Windowed attention that projects only the real tokens (see :func:`windowed_attention`)."""
    batch, height, width, channels = x.shape
    heads = attn.num_heads
    pad_h = (window_size - height % window_size) % window_size
    pad_w = (window_size - width % window_size) % window_size
    rows, cols = (height + pad_h) // window_size, (width + pad_w) // window_size
    qkv = fast_linear(attn.qkv, x)  # (B, H, W, 3*dim)
    if pad_h or pad_w:
        # The reference pads the normalised tokens with zeros *before* the projection, so a
        # padding token's q/k/v is the projection of zero (the bias of a plain linear); the
        # padded keys do take part in the reference attention, so they are kept here.
        pad_token = fast_linear(attn.qkv, x.new_zeros(1, channels))[0]
        padded = qkv.new_empty(batch, height + pad_h, width + pad_w, qkv.shape[-1])
        padded[:, height:] = pad_token
        padded[:, :height, width:] = pad_token
        padded[:, :height, :width] = qkv
        qkv = padded
    # (B, rows, ws, cols, ws, 3, heads, C) -> (3, B*rows*cols, heads, ws*ws, C), one copy
    qkv = qkv.view(batch, rows, window_size, cols, window_size, 3, heads, -1)
    qkv = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(
        3, batch * rows * cols, heads, window_size * window_size, -1
    )
    q, k, v = qkv.unbind(0)
    if attn.use_rel_pos:
        out = rel_pos_attention(
            q, k, v, attn.scale, attn.rel_pos_h, attn.rel_pos_w, (window_size, window_size)
        )
    else:
        out = rel_pos_attention(q, k, v, attn.scale)
    # (B*rows*cols, ws*ws, heads, C) -> (B, H, W, heads*C): unpartition, drop the padding
    out = out.reshape(batch, rows, cols, window_size, window_size, channels)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(
        batch, rows * window_size, cols * window_size, channels
    )
    out = out[:, :height, :width].contiguous()
    return fast_linear(attn.proj, out)


def windowed_attention(attn: nn.Module, x: torch.Tensor, window_size: int) -> torch.Tensor:
    """The attention step of a SAM ``Block``: ``window_partition -> attn -> unpartition``.

    On the fast path (a :class:`FastAttention` outside :func:`reference_attention`) the
    windows are cut from the projected q/k/v instead of from the tokens, so the q/k/v and
    output projections run on the ``H x W`` real tokens only, not on the zero padding (vit_b
    at 1024 px: 64 x 64 tokens padded to 70 x 70, 20 % more rows in 8 of 12 blocks). The
    result equals the reference to float rounding.

    Parameters
    ----------
    attn : nn.Module
        The block's ``Attention`` (``head_dim * num_heads == dim``).
    x : torch.Tensor
        Normalised tokens ``(B, H, W, dim)``.
    window_size : int
        0 for global attention.

    Returns
    -------
    torch.Tensor
        ``(B, H, W, dim)``.
    """
    if window_size == 0:
        return attn(x)
    if type(attn) is FastAttention and fast_attention_enabled():
        return _fast_windowed_attention(attn, x, window_size)
    height, width = x.shape[1], x.shape[2]
    windows, pad_hw = window_partition(x, window_size)
    return window_unpartition(attn(windows), window_size, pad_hw, (height, width))


class FastBlock(Block):
    """segment_anything ``Block`` whose attention step uses :func:`windowed_attention`.

    Created only by re-classing in :func:`enable_fast_attention`; state_dict unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fast_attention_enabled():
            return super().forward(x)
        x = x + windowed_attention(self.attn, self.norm1(x), self.window_size)
        return x + self.mlp(self.norm2(x))


class FastAttention(Attention):
    """segment_anything ``Attention`` whose forward takes the fast path.

    Never constructed directly: :func:`enable_fast_attention` re-classes existing modules,
    so parameters, buffers, hooks and state_dict keys stay exactly as they were.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fast_attention_enabled():
            return super().forward(x)
        return fast_attention_forward(self, x)


def _reclass(module: nn.Module, classes: tuple[type, ...], new_class: type) -> int:
    """Re-class every module in ``module`` whose class is exactly one of ``classes``.

    Exact classes only: subclasses with their own forward (e.g. a LoRA variant) are left
    alone, since re-classing them would drop their behaviour. Replacing ``attn.qkv`` by
    another module is fine. Returns the number of modules now of ``new_class`` this way.
    """
    found = [m for m in module.modules() if type(m) in classes]
    for m in found:
        m.__class__ = new_class
    return len(found)


def enable_fast_attention(module: nn.Module) -> int:
    """Switch every segment_anything ``Attention`` in ``module`` to the fast forward.

    Plain segment_anything ``Block`` modules become :class:`FastBlock` (windowed attention
    without projecting the padding); subclasses such as the adapted blocks call
    :func:`windowed_attention` themselves.

    Parameters
    ----------
    module : nn.Module
        Any module tree (an ``ImageEncoderViT``, a whole ``Sam``, a single ``Attention``).

    Returns
    -------
    int
        Number of ``Attention`` modules now on the fast path (already switched ones count).
    """
    _reclass(module, (Block, FastBlock), FastBlock)
    return _reclass(module, (Attention, FastAttention), FastAttention)


def disable_fast_attention(module: nn.Module) -> int:
    """Undo :func:`enable_fast_attention`; returns the number of ``Attention`` modules
    switched back."""
    _reclass(module, (FastBlock,), Block)
    return _reclass(module, (FastAttention,), Attention)


def _activation_name(act: nn.Module) -> str | None:
    """Name of an activation ``fast_linear`` can apply, or None for anything else."""
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    if type(act) is nn.ReLU:
        return "relu"
    return None


def fast_mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``lin2(act(lin1(x)))`` with the activation fused into ``lin1`` where possible.

    Parameters
    ----------
    mlp : nn.Module
        A segment_anything ``MLPBlock`` (``lin1``, ``act``, ``lin2``).
    x : torch.Tensor
        ``(..., embedding_dim)``.

    Returns
    -------
    torch.Tensor
        ``(..., embedding_dim)``.
    """
    activation = _activation_name(mlp.act)
    if activation is None or mlp.act._forward_hooks or mlp.act._forward_pre_hooks:
        hidden = mlp.act(fast_linear(mlp.lin1, x))
    else:
        hidden = fast_linear(mlp.lin1, x, activation)
    return fast_linear(mlp.lin2, hidden)


class FastMLPBlock(MLPBlock):
    """segment_anything ``MLPBlock`` whose forward uses :func:`fast_mlp_forward`.

    Created only by re-classing in :func:`enable_fast_mlp`; state_dict keys unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fast_attention_enabled():
            return super().forward(x)
        return fast_mlp_forward(self, x)


def enable_fast_mlp(module: nn.Module) -> int:
    """Switch every segment_anything ``MLPBlock`` in ``module`` to :class:`FastMLPBlock`.

    Returns the number of ``MLPBlock`` modules now on the fast path. Subclasses of
    ``MLPBlock`` are left alone. :func:`reference_attention` also selects the original
    MLP forward.
    """
    return _reclass(module, (MLPBlock, FastMLPBlock), FastMLPBlock)


def disable_fast_mlp(module: nn.Module) -> int:
    """Undo :func:`enable_fast_mlp`; returns the number of modules switched back."""
    return _reclass(module, (FastMLPBlock,), MLPBlock)
