"""SAM's relative-position attention core: ``softmax(q k^T * scale + bias) v``.

The official ``segment_anything.modeling.image_encoder.Attention`` materialises the
``(B*heads, N, N)`` logits, adds the decomposed relative-position bias with a broadcast
(one more full read and write), runs softmax (another) and a second ``bmm``. On a 2-core CPU
that is most of the vit_b encoder's time.

:func:`rel_pos_attention` computes the same result with
:func:`torch.nn.functional.scaled_dot_product_attention` (a fused, blocked kernel on CPU and
CUDA), passing the bias ``rel_h[n, kh] + rel_w[n, kw]`` as an additive float ``attn_mask``.
To keep memory bounded (a global vit_b block has a ``12 x 4096 x 4096`` bias, 805 MB in
float32) the queries are processed in chunks whose bias fits in ``max_mask_bytes``; in
inference the chunk buffer is allocated once per call and reused, which also avoids the
page-fault cost of touching a fresh 805 MB allocation.

In bf16 inference on a CPU that computes bf16 natively, where that fused kernel is no
faster than in float32, the same result comes from oneDNN's bf16 matrix products instead
(:func:`_gemm_softmax_attention`, 1.6x faster for a global vit_b block).

Public API
----------
``rel_pos_attention(q, k, v, scale, rel_pos_h, rel_pos_w, size, max_mask_bytes)``
    The attention core on ``(B, heads, N, head_dim)`` tensors.
``rel_pos_bias_terms(q, rel_pos_h, rel_pos_w, size)``
    The decomposed bias terms of ``add_decomposed_rel_pos``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import get_rel_pos

from ..device import cpu_has_native_bf16

__all__ = [
    "DEFAULT_MAX_MASK_BYTES",
    "DEFAULT_MAX_MASK_BYTES_CUDA",
    "rel_pos_attention",
    "rel_pos_bias_terms",
]

#: Largest relative-position bias chunk (bytes) built at once on CPU. 64 MiB keeps a global
#: vit_b block at 5 query rows per chunk and the 25 windows of a windowed block in one chunk.
DEFAULT_MAX_MASK_BYTES = 64 * 2**20
#: The same on CUDA, where small chunks would leave the GPU idle: one global vit_b image
#: (805 MB in float32) per chunk.
DEFAULT_MAX_MASK_BYTES_CUDA = 1 * 2**30


def rel_pos_bias_terms(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decomposed relative-position bias terms of ``add_decomposed_rel_pos``.

    Parameters
    ----------
    q : torch.Tensor
        Queries, shape ``(B, heads, H*W, C)`` (unscaled, as in the reference).
    rel_pos_h, rel_pos_w : torch.Tensor
        Relative-position tables, shapes ``(Lh, C)`` and ``(Lw, C)``; resized as in
        ``get_rel_pos`` when ``L != 2*size-1``.
    size : tuple of int
        Token grid ``(H, W)``; queries and keys share it (self-attention).

    Returns
    -------
    rel_h : torch.Tensor
        ``(B, heads, H, W, H)``: ``rel_h[..., qh, qw, kh] = q[qh, qw] . Rh[qh, kh]``.
    rel_w : torch.Tensor
        ``(B, heads, H, W, W)``: ``rel_w[..., qh, qw, kw] = q[qh, qw] . Rw[qw, kw]``.
        The bias of key ``(kh, kw)`` is ``rel_h[..., kh] + rel_w[..., kw]``.
    """
    height, width = size
    batch, heads, _, channels = q.shape
    table_h = get_rel_pos(height, height, rel_pos_h).to(q.dtype)  # (H, H, C)
    table_w = get_rel_pos(width, width, rel_pos_w).to(q.dtype)  # (W, W, C)
    q_grid = q.reshape(batch, heads, height, width, channels)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, table_h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, table_w)
    return rel_h, rel_w


def _query_chunks(
    batch: int, rows: int, bytes_per_row: int, max_bytes: int
) -> list[tuple[int, int, int, int]]:
    """Split ``batch`` items x ``rows`` query rows into chunks of bias at most ``max_bytes``.

    Returns ``(b0, b1, r0, r1)`` tuples: either several whole items (``r0, r1 = 0, rows``)
    or a range of query rows of one item. Chunks never straddle items partially, so every
    chunk is a plain slice of the ``(B, heads, N, C)`` queries.
    """
    bytes_per_item = bytes_per_row * rows
    if bytes_per_item <= max_bytes:
        items = max(1, max_bytes // bytes_per_item)
        return [(b0, min(batch, b0 + items), 0, rows) for b0 in range(0, batch, items)]
    rows_per_chunk = max(1, max_bytes // bytes_per_row)
    return [
        (b, b + 1, r0, min(rows, r0 + rows_per_chunk))
        for b in range(batch)
        for r0 in range(0, rows, rows_per_chunk)
    ]


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rel_pos_h: torch.Tensor | None = None,
    rel_pos_w: torch.Tensor | None = None,
    size: tuple[int, int] | None = None,
    max_mask_bytes: int | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + rel_h + rel_w) v`` without materialising all logits.

    Parameters
    ----------
    q, k, v : torch.Tensor
        Shape ``(B, heads, N, C)`` with ``N = H*W``; may be strided views.
    scale : float
        Logit scale (``head_dim ** -0.5`` in SAM); the bias terms are not scaled, as in the
        reference.
    rel_pos_h, rel_pos_w : torch.Tensor or None
        Relative-position tables ``(Lh, C)``, ``(Lw, C)``; None for plain attention.
    size : tuple of int or None
        Token grid ``(H, W)``, required with relative positions.
    max_mask_bytes : int or None
        Upper bound on the bias chunk built at once; None: ``DEFAULT_MAX_MASK_BYTES`` on
        CPU, ``DEFAULT_MAX_MASK_BYTES_CUDA`` on other devices.

    Returns
    -------
    torch.Tensor
        Shape ``(B, N, heads, C)``, the layout the output projection needs (so the caller
        reshapes without another permute).
    """
    batch, heads, tokens, channels = q.shape
    # The fused CPU kernel reads strided q/k/v (views into the qkv projection) much more
    # slowly than contiguous ones, in bf16 above all (a global vit_b block: 0.93 s strided,
    # 0.56 s contiguous, for three 6 MB copies); no-ops where they are contiguous already.
    if q.device.type == "cpu":
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if rel_pos_h is None or rel_pos_w is None:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return out.transpose(1, 2)
    if size is None or size[0] * size[1] != tokens:
        raise ValueError(f"rel_pos_attention: size {size} does not match {tokens} tokens")
    height, width = size

    rel_h, rel_w = rel_pos_bias_terms(q, rel_pos_h, rel_pos_w, size)
    # The fused CPU kernel only accepts a bias that needs no gradient; with a gradient SDPA
    # falls back to the reference math (still exact). Reusing one buffer (and writing with
    # ``out=``) is only safe when autograd records nothing: none of q, k, v or the tables
    # needs a gradient.
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, rel_h, rel_w)
    )
    bytes_per_row = heads * width * tokens * rel_h.element_size()
    if max_mask_bytes is None:
        cpu = q.device.type == "cpu"
        max_mask_bytes = DEFAULT_MAX_MASK_BYTES if cpu else DEFAULT_MAX_MASK_BYTES_CUDA
    chunks = _query_chunks(batch, height, bytes_per_row, max_mask_bytes)

    if needs_grad:
        pieces = []
        for b0, b1, r0, r1 in chunks:
            bias = rel_h[b0:b1, :, r0:r1, :, :, None] + rel_w[b0:b1, :, r0:r1, :, None, :]
            pieces.append(_chunk_attention(q, k, v, bias, scale, (b0, b1, r0, r1), width))
        if len(pieces) == 1:
            return pieces[0]
        if chunks[0][2:] == (0, height):  # each chunk holds whole items
            return torch.cat(pieces, dim=0)
        # Row chunks of one item follow each other: concatenate rows, then items.
        per_item = len(chunks) // batch
        items = [torch.cat(pieces[i * per_item : (i + 1) * per_item], dim=1) for i in range(batch)]
        return torch.cat(items, dim=0)

    if _use_gemm_softmax(q):
        return _gemm_softmax_attention(q, k, v, scale, rel_h, rel_w)
    return _fused_attention(q, k, v, scale, rel_h, rel_w, chunks)


def _fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    chunks: list[tuple[int, int, int, int]],
) -> torch.Tensor:
    """Inference attention through SDPA's fused kernel, the bias written chunk by chunk
    (:func:`_blocked_attention`). Shapes as in :func:`_gemm_softmax_attention`; ``chunks``
    from :func:`_query_chunks`."""
    width = rel_h.shape[3]
    return _blocked_attention(
        q, rel_h, rel_w, chunks,
        lambda bias, chunk: _chunk_attention(q, k, v, bias, scale, chunk, width),
    )


def _blocked_attention(
    q: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    chunks: list[tuple[int, int, int, int]],
    attend: Callable[[torch.Tensor, tuple[int, int, int, int]], torch.Tensor],
) -> torch.Tensor:
    """The chunk loop both inference paths share.

    For each chunk ``(b0, b1, r0, r1)`` the bias ``(b1-b0, heads, r1-r0, W, H, W)`` is
    written into one flat buffer reused by every chunk (a leading slice of it is a
    contiguous chunk even when the last chunk is smaller), ``attend(bias, chunk)`` returns
    the chunk's output ``(b1-b0, (r1-r0)*W, heads, C)`` (it may overwrite the bias), and the
    result goes into one output in the ``(B, N, heads, C)`` layout, so the only copy of the
    result is the transpose the reference also makes.
    """
    batch, heads, tokens, channels = q.shape
    height, width = rel_h.shape[2], rel_h.shape[3]
    b0, b1, r0, r1 = chunks[0]
    buffer = q.new_empty((b1 - b0) * heads * (r1 - r0) * width * tokens)
    out = q.new_empty((batch, tokens, heads, channels))
    for chunk in chunks:
        b0, b1, r0, r1 = chunk
        shape = (b1 - b0, heads, r1 - r0, width, height, width)
        if torch.compiler.is_compiling():
            # Inductor cannot lower an ``out=`` into a view of a buffer: let it plan memory.
            bias = rel_h[b0:b1, :, r0:r1, :, :, None] + rel_w[b0:b1, :, r0:r1, :, None, :]
        else:
            bias = buffer[: (b1 - b0) * heads * (r1 - r0) * width * tokens].view(shape)
            _write_bias(rel_h[b0:b1, :, r0:r1], rel_w[b0:b1, :, r0:r1], bias)
        out[b0:b1, r0 * width : r1 * width].copy_(attend(bias, chunk))
    return out


#: Below this key-grid width a bf16/fp16 bias on the CPU is built with a matrix product:
#: the broadcast add of reduced-precision rows that short is not vectorised (a windowed
#: vit_b block, 14 x 14 keys: 19 ms in bf16 vs 4 ms in float32, 4 ms as a bf16 product);
#: float32 and wide grids (a global block's 64 x 64) add faster.
_SELECTOR_BIAS_MAX_WIDTH = 32


def _write_bias(rel_h: torch.Tensor, rel_w: torch.Tensor, bias: torch.Tensor) -> None:
    """``bias[..., kh, kw] = rel_h[..., kh] + rel_w[..., kw]`` in place.

    ``rel_h`` ``(..., H)``, ``rel_w`` ``(..., W)``, ``bias`` contiguous ``(..., H, W)``. For
    reduced precision on narrow grids on the CPU as ``[rel_h | rel_w] @ S`` with the 0/1
    selector ``S`` (``(H+W, H*W)``: row ``kh`` and row ``H+kw`` pick key ``(kh, kw)``): each
    output is the same two-term sum rounded once, bit-identical to the add for finite normal
    values (an infinite term would spread NaN over its row through ``inf * 0``; subnormals may
    be flushed to zero).
    """
    height, width = bias.shape[-2:]
    narrow_reduced = bias.dtype != torch.float32 and width < _SELECTOR_BIAS_MAX_WIDTH
    if bias.device.type != "cpu" or not narrow_reduced:
        torch.add(rel_h[..., :, None], rel_w[..., None, :], out=bias)
        return
    selector = torch.zeros(height + width, height, width, dtype=bias.dtype, device=bias.device)
    keys_h = torch.arange(height, device=bias.device)
    keys_w = torch.arange(width, device=bias.device)
    selector[keys_h, keys_h, :] = 1
    selector[height + keys_w, :, keys_w] = 1
    terms = torch.cat([rel_h, rel_w], dim=-1).reshape(-1, height + width)
    torch.mm(terms, selector.view(height + width, height * width),
             out=bias.view(-1, height * width))


#: Logits block budget (bytes) of :func:`_gemm_softmax_attention`: one query row of a global
#: vit_b block (12 heads x 64 queries x 4096 keys in bf16, 6 MiB) stays in the L3 cache
#: between the product that writes it, the softmax and the product that reads it.
_GEMM_SOFTMAX_BLOCK_BYTES = 8 * 2**20


def _use_gemm_softmax(q: torch.Tensor) -> bool:
    """Whether inference attention on ``q`` takes :func:`_gemm_softmax_attention`.

    bf16 on a CPU that computes bf16 natively (AVX-512 BF16 or AMX), outside
    ``torch.compile``: there the fused CPU attention kernel runs no faster in bf16 than in
    float32 (a global vit_b block's attention: 0.49 s vs 0.52 s with the bias), while
    oneDNN's bf16 matrix products run at about twice the float32 rate, so a biased product,
    a softmax and a product per block of queries win (0.30 s;
    ``benchmarks/bench_attention.py``). Where bf16 is emulated (``precision="bf16"`` forced
    on an AVX2 CPU) nothing shows the products would win.
    """
    return (
        q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and not torch.compiler.is_compiling()
        and cpu_has_native_bf16()  # about 1 µs: no need to cache it
    )


def _gemm_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
) -> torch.Tensor:
    """Inference attention as ``bias + scale * q k^T -> softmax -> @ v`` in query blocks.

    ``q, k, v`` ``(B, heads, N, C)`` (contiguous for speed: the per-block reshapes are then
    views); ``rel_h`` ``(B, heads, H, W, H)`` and ``rel_w`` ``(B, heads, H, W, W)`` from
    :func:`rel_pos_bias_terms`. Each block's bias is written into the reused buffer of
    :func:`_blocked_attention`, ``baddbmm`` adds the scaled product onto it (the scale
    applied inside the product, in float32), softmax runs in place (accumulating in float32)
    and ``bmm`` writes the block's output. The logits are rounded to bf16 once (a relative
    error of at most 2^-9 each) where the fused kernel keeps them in float32: on random
    global vit_b attention with logits of standard deviation 1-4 the output's RMS error
    against float32 is 1.2-1.5x the fused kernel's bf16 error, and the pipeline's bf16 mask
    Dice against float32 is unchanged (``benchmarks/bench_pipeline.py``: 0.995-0.997 per
    tile). Returns ``(B, N, heads, C)``.
    """
    batch, heads, tokens, channels = q.shape
    height, width = rel_h.shape[2], rel_h.shape[3]
    bytes_per_row = heads * width * tokens * q.element_size()
    chunks = _query_chunks(batch, height, bytes_per_row, _GEMM_SOFTMAX_BLOCK_BYTES)
    key_t = k.transpose(-1, -2)

    def attend(bias: torch.Tensor, chunk: tuple[int, int, int, int]) -> torch.Tensor:
        b0, b1, r0, r1 = chunk
        items, rows = b1 - b0, (r1 - r0) * width
        logits = bias.view(items * heads, rows, tokens)
        queries = q[b0:b1, :, r0 * width : r1 * width].reshape(items * heads, rows, channels)
        torch.baddbmm(
            logits, queries, key_t[b0:b1].reshape(items * heads, channels, tokens),
            alpha=scale, out=logits,
        )
        # In place through ``out=``: PyTorch's CPU softmax over the last dimension reads each
        # row before writing it (bit-identical to out of place: tests/test_fast_attention.py).
        # The bias is finite, so no row is all -inf (that would give NaN where SDPA gives 0).
        torch.softmax(logits, dim=-1, out=logits)
        block_out = torch.bmm(logits, v[b0:b1].reshape(items * heads, tokens, channels))
        return block_out.view(items, heads, rows, channels).transpose(1, 2)

    return _blocked_attention(q, rel_h, rel_w, chunks, attend)


def _chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    chunk: tuple[int, int, int, int],
    width: int,
) -> torch.Tensor:
    """SDPA for items ``b0:b1`` and query rows ``r0:r1`` against all keys.

    ``bias`` is ``(b1-b0, heads, r1-r0, W, H, W)``; returns ``(b1-b0, (r1-r0)*W, heads, C)``
    (a transposed view).
    """
    b0, b1, r0, r1 = chunk
    heads, tokens = q.shape[1], k.shape[2]
    q_rows = q[b0:b1, :, r0 * width : r1 * width]
    bias = bias.reshape(b1 - b0, heads, (r1 - r0) * width, tokens)
    out = F.scaled_dot_product_attention(q_rows, k[b0:b1], v[b0:b1], attn_mask=bias, scale=scale)
    return out.transpose(1, 2)
