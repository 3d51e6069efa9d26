"""The fast attention path must reproduce segment_anything's Attention exactly (float32
rounding aside), forward and backward, for windowed/global blocks with and without
relative positions, including window padding and bias chunking."""

from __future__ import annotations

import copy
import io
import threading
from functools import partial

import pytest
import torch
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import Attention, Block, ImageEncoderViT

from napari_amasam.device import cpu_has_native_bf16
from napari_amasam.model import attention_core as core
from napari_amasam.model import fast_attention as fa
from napari_amasam.model.fast_attention import (
    FastAttention,
    FastMLPBlock,
    disable_fast_attention,
    disable_fast_mlp,
    enable_fast_attention,
    enable_fast_mlp,
    fast_attention_enabled,
    fast_attention_forward,
    reference_attention,
)


def _randomise_rel_pos(module: torch.nn.Module, seed: int = 0) -> None:
    """SAM zero-initialises the rel-pos tables, which would hide a wrong bias."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "rel_pos" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    assert diff <= rel * max(scale, 1e-6), f"max abs diff {diff:.3e} vs output scale {scale:.3e}"


@pytest.mark.parametrize(
    "use_rel_pos, grid, input_size, batch",
    [
        (True, (7, 7), (7, 7), 3),  # windowed-like: full grid equals the table size
        (True, (6, 4), (6, 4), 2),  # non-square grid
        (True, (5, 5), (8, 8), 1),  # tables interpolated by get_rel_pos
        (False, (6, 6), None, 2),  # no relative positions
    ],
)
def test_attention_matches_reference(use_rel_pos, grid, input_size, batch):
    torch.manual_seed(1)
    attn = Attention(48, num_heads=3, use_rel_pos=use_rel_pos, input_size=input_size)
    _randomise_rel_pos(attn)
    x = torch.randn(batch, *grid, 48)
    expected = attn(x)
    assert enable_fast_attention(attn) == 1
    assert isinstance(attn, FastAttention)
    actual = attn(x)
    assert actual.shape == expected.shape
    _assert_close(actual, expected)
    # The reference context must give back the original computation bit for bit.
    with reference_attention():
        assert not fast_attention_enabled()
        assert torch.equal(attn(x), expected)
    assert fast_attention_enabled()


@pytest.mark.parametrize("max_mask_bytes", [1, 3000, 20_000, 10**9])
def test_chunked_bias_matches_reference(max_mask_bytes):
    # Grid 7x5 with 2 heads: one query row of bias is 2*5*35*4 = 1400 bytes, one item 9800.
    # 1 -> one row per chunk; 3000 -> 2 rows (7 rows do not divide); 20000 -> 2 items per
    # chunk (3 items do not divide); 1e9 -> one chunk.
    torch.manual_seed(2)
    attn = Attention(32, num_heads=2, use_rel_pos=True, input_size=(7, 5))
    _randomise_rel_pos(attn)
    x = torch.randn(3, 7, 5, 32)
    expected = attn(x)
    with torch.no_grad():
        actual = fast_attention_forward(attn, x, max_mask_bytes=max_mask_bytes)
    _assert_close(actual, expected)


def test_windowed_block_with_padding_64_to_70():
    # The vit_b windowed case: 64x64 tokens padded to 70 for 14x14 windows (small dim).
    torch.manual_seed(3)
    block = Block(32, num_heads=2, use_rel_pos=True, window_size=14, input_size=(64, 64))
    _randomise_rel_pos(block)
    x = torch.randn(1, 64, 64, 32)
    with torch.no_grad():
        expected = block(x)
        enable_fast_attention(block)
        actual = block(x)
    _assert_close(actual, expected)


@pytest.mark.parametrize("qkv_bias, grid", [(True, (10, 7)), (False, (9, 9)), (True, (8, 8))])
def test_windowed_attention_projects_only_real_tokens(qkv_bias, grid):
    """Windows are cut from q/k/v: the projection sees the H x W tokens (plus one zero token
    for the padding), yet the block equals the reference, padded keys included."""
    torch.manual_seed(6)
    block = Block(24, num_heads=2, qkv_bias=qkv_bias, use_rel_pos=True, window_size=4,
                  input_size=(4, 4))
    _randomise_rel_pos(block)
    x = torch.randn(2, *grid, 24)
    seen = []
    block.attn.qkv.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        expected = block(x)
        reference_rows = seen.pop(0)
        enable_fast_attention(block)
        assert isinstance(block, fa.FastBlock)
        actual = block(x)
    _assert_close(actual, expected)
    padded = [-(-n // 4) * 4 for n in grid]
    assert reference_rows == (2 * padded[0] * padded[1] // 16, 4, 4, 24)
    needs_padding = padded != list(grid)
    assert seen == [(2, *grid, 24)] + ([(1, 24)] if needs_padding else [])


def _small_encoder(seed: int = 4) -> ImageEncoderViT:
    torch.manual_seed(seed)
    # 128/16 = 8 tokens; window 3 pads 8 -> 9; blocks 1 and 3 are global.
    encoder = ImageEncoderViT(
        img_size=128,
        patch_size=16,
        embed_dim=64,
        depth=4,
        num_heads=4,
        out_chans=32,
        use_rel_pos=True,
        window_size=3,
        global_attn_indexes=(1, 3),
    )
    _randomise_rel_pos(encoder)
    with torch.no_grad():
        encoder.pos_embed.normal_(0, 0.5)
    return encoder


def test_encoder_matches_reference_and_keeps_state_dict():
    encoder = _small_encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected = encoder(x)
        assert enable_fast_attention(encoder) == 4
        assert enable_fast_attention(encoder) == 4  # idempotent
        assert enable_fast_mlp(encoder) == 4
        actual = encoder(x)
    _assert_close(actual, expected)

    after = encoder.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)

    # Switched modules survive deepcopy and torch.save/load with the fast path.
    buffer = io.BytesIO()
    torch.save(encoder, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    clone = copy.deepcopy(encoder)
    with torch.no_grad():
        for other in (loaded, clone):
            assert isinstance(other.blocks[0].attn, FastAttention)
            _assert_close(other(x), expected)

    assert disable_fast_attention(encoder) == 4
    assert disable_fast_mlp(encoder) == 4
    assert type(encoder.blocks[0].attn) is Attention
    assert type(encoder.blocks[0].mlp) is MLPBlock
    with torch.no_grad():
        assert torch.equal(encoder(x), expected)


def test_subclass_with_own_forward_is_left_alone():
    class Custom(Attention):
        def forward(self, x):  # pragma: no cover - must never be replaced
            return super().forward(x) * 2

    holder = torch.nn.Sequential(Custom(16, num_heads=2), Attention(16, num_heads=2))
    assert enable_fast_attention(holder) == 1
    assert type(holder[0]) is Custom


@pytest.mark.parametrize("max_mask_bytes", [1, 3000, 20_000, 10**9])
def test_chunked_bias_with_gradient_matches_reference(max_mask_bytes):
    # The training path keeps every bias chunk for backward; 20000 groups 2 of the 3 items
    # per chunk (the grouping a GPU's larger budget makes at batch 4 and 1024 px).
    torch.manual_seed(3)
    attn = Attention(32, num_heads=2, use_rel_pos=True, input_size=(7, 5))
    _randomise_rel_pos(attn)
    x = torch.randn(3, 7, 5, 32)
    x_ref = x.clone().requires_grad_(True)
    x_fast = x.clone().requires_grad_(True)
    expected = attn(x_ref)
    actual = fast_attention_forward(attn, x_fast, max_mask_bytes=max_mask_bytes)
    _assert_close(actual, expected)
    weights = torch.randn_like(expected)
    (expected * weights).sum().backward()
    (actual * weights).sum().backward()
    _assert_close(x_fast.grad, x_ref.grad, rel=2e-4)


@pytest.mark.parametrize("max_mask_bytes", [None, 1])
def test_gradients_match_reference(max_mask_bytes):
    encoder = _small_encoder(seed=5)
    reference = copy.deepcopy(encoder)
    enable_fast_attention(encoder)
    enable_fast_mlp(encoder)
    if max_mask_bytes is not None:
        # Force row chunks in every block through a tiny budget.
        def chunked(self, x):
            return fast_attention_forward(self, x, max_mask_bytes=max_mask_bytes)

        for block in encoder.blocks:
            block.attn.forward = chunked.__get__(block.attn)

    x = torch.randn(2, 3, 128, 128)
    x_ref = x.clone().requires_grad_(True)
    x_fast = x.clone().requires_grad_(True)
    weights = torch.randn(2, 32, 8, 8)
    (reference(x_ref) * weights).sum().backward()
    (encoder(x_fast) * weights).sum().backward()

    _assert_close(x_fast.grad, x_ref.grad, rel=2e-4)
    ref_params = dict(reference.named_parameters())
    for name, param in encoder.named_parameters():
        assert param.grad is not None, name
        _assert_close(param.grad, ref_params[name].grad, rel=2e-4)


def test_reference_context_is_thread_local():
    seen = []
    with reference_attention():
        worker = threading.Thread(target=lambda: seen.append(fast_attention_enabled()))
        worker.start()
        worker.join()
        assert not fast_attention_enabled()
    assert seen == [True]


@pytest.mark.parametrize(
    "act", [torch.nn.GELU, partial(torch.nn.GELU, approximate="tanh"), torch.nn.ReLU, torch.nn.SiLU]
)
def test_mlp_matches_reference(act):
    torch.manual_seed(6)
    mlp = MLPBlock(48, 192, act=act)
    x = torch.randn(2, 5, 7, 48) * 3
    with torch.no_grad():
        expected = mlp(x)
        assert enable_fast_mlp(mlp) == 1
        assert isinstance(mlp, FastMLPBlock)
        actual = mlp(x)
        with reference_attention():
            assert torch.equal(mlp(x), expected)
    _assert_close(actual, expected)


@pytest.mark.slow
def test_fast_attention_compiles_with_torch_compile():
    # The fast path writes the bias into a reused buffer and calls oneDNN's linear; neither
    # lowers in Inductor, so under torch.compile it hands both to the compiler instead.
    torch.manual_seed(4)
    attn = Attention(32, num_heads=2, use_rel_pos=True, input_size=(7, 5))
    _randomise_rel_pos(attn)
    x = torch.randn(3, 7, 5, 32)
    with torch.no_grad():
        expected = attn(x)
        enable_fast_attention(attn)
        actual = torch.compile(attn)(x)
    _assert_close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid", [(14, 14), (5, 7), (40, 31), (3, 1)])
def test_relative_position_bias_is_the_broadcast_sum_bit_for_bit(dtype, grid):
    # Narrow reduced-precision grids are built as a product with a 0/1 selector; every
    # entry must still be rel_h + rel_w rounded once, exactly as the broadcast add gives it.
    height, width = grid
    assert width < core._SELECTOR_BIAS_MAX_WIDTH  # the selector branch is the one under test
    gen = torch.Generator().manual_seed(5)
    rel_h = torch.randn(2, 3, height, width, height, generator=gen).to(dtype)
    rel_w = torch.randn(2, 3, height, width, width, generator=gen).to(dtype)
    bias = torch.empty(2, 3, height, width, height, width, dtype=dtype)
    core._write_bias(rel_h, rel_w, bias)
    assert torch.equal(bias, rel_h[..., :, None] + rel_w[..., None, :])


@pytest.mark.parametrize("block_bytes", [1, 3000, 10_000, 10**9])
def test_bf16_inference_attention_by_products_matches_float32(monkeypatch, block_bytes):
    # CPU bf16 inference runs bias + scale * q k^T -> softmax -> @ v as oneDNN bf16 products
    # in query blocks. Grid 7x5, 2 heads: a query row of bf16 logits is 2*5*35*2 = 700 bytes,
    # an item 4900: 1 -> one row per block, 3000 -> 4 rows (7 do not divide), 10000 -> two
    # items per block (3 do not divide), 1e9 -> one block.
    monkeypatch.setattr(core, "_GEMM_SOFTMAX_BLOCK_BYTES", block_bytes)
    # Taken only where the CPU computes bf16 natively; forced here so that it is checked on
    # every CPU (emulated bf16 gives the same roundings, only slower).
    monkeypatch.setattr(core, "cpu_has_native_bf16", lambda: True)
    torch.manual_seed(6)
    batch, heads, grid, channels = 3, 2, (7, 5), 16
    tokens = grid[0] * grid[1]
    q, k, v = (torch.randn(batch, heads, tokens, channels) for _ in range(3))
    rel_pos_h, rel_pos_w = torch.randn(13, channels) * 0.5, torch.randn(9, channels) * 0.5
    scale = channels**-0.5
    q16, k16, v16 = q.bfloat16(), k.bfloat16(), v.bfloat16()
    with torch.no_grad():
        # float32 on the same bf16-rounded inputs: what is left is the attention's own error
        expected = core.rel_pos_attention(
            q16.float(), k16.float(), v16.float(), scale,
            rel_pos_h.bfloat16().float(), rel_pos_w.bfloat16().float(), grid,
        )
        assert core._use_gemm_softmax(q16) and not core._use_gemm_softmax(q)
        actual = core.rel_pos_attention(q16, k16, v16, scale, rel_pos_h, rel_pos_w, grid)
        rel_h, rel_w = core.rel_pos_bias_terms(q16, rel_pos_h, rel_pos_w, grid)
        assert torch.equal(actual, core._gemm_softmax_attention(q16, k16, v16, scale, rel_h, rel_w))
        # the fused kernel in bf16, for the size of a bf16 error
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(batch, heads, tokens, tokens)
        fused = torch.nn.functional.scaled_dot_product_attention(
            q16, k16, v16, attn_mask=bias, scale=scale
        ).transpose(1, 2)
    assert actual.dtype == torch.bfloat16 and actual.shape == (batch, tokens, heads, channels)
    error = (actual.float() - expected).abs()
    fused_error = (fused.float() - expected).abs()
    assert error.max() <= 2e-2 * expected.abs().max()
    assert error.pow(2).mean().sqrt() <= 2 * fused_error.pow(2).mean().sqrt()


def test_bf16_attention_with_gradient_keeps_the_fused_kernel():
    # The products path reuses one logits buffer: with autograd recording it must not run.
    torch.manual_seed(7)
    q, k, v = (torch.randn(1, 2, 35, 16, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    tables = torch.randn(13, 16) * 0.5, torch.randn(9, 16) * 0.5
    out = core.rel_pos_attention(q, k, v, 0.25, *tables, (7, 5))
    out.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad.float()).all()
    with torch.no_grad():
        rel_h, rel_w = core.rel_pos_bias_terms(q, *tables, (7, 5))
        products = core._gemm_softmax_attention(q, k, v, 0.25, rel_h, rel_w)
    assert not torch.equal(out.detach(), products)


def test_bf16_products_path_is_chosen_only_where_it_pays():
    q = torch.zeros(1, 2, 35, 16)
    assert core._use_gemm_softmax(q.bfloat16()) == cpu_has_native_bf16()
    assert not core._use_gemm_softmax(q) and not core._use_gemm_softmax(q.half())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("needs_grad", ["k", "v"])
def test_gradient_through_keys_or_values_alone_matches_reference(dtype, needs_grad):
    # Only the keys (or values) need a gradient: autograd still records, so neither the
    # reused bias buffer nor an ``out=`` product may be used (several chunks here).
    torch.manual_seed(8)
    grid, tables = (7, 5), (torch.randn(13, 16) * 0.5, torch.randn(9, 16) * 0.5)
    q, k, v = (torch.randn(2, 2, 35, 16).to(dtype) for _ in range(3))
    leaf = {"k": k, "v": v}[needs_grad].requires_grad_()
    out = core.rel_pos_attention(q, k, v, 0.25, *tables, grid, max_mask_bytes=1)
    weights = torch.randn(out.shape).to(dtype)
    (out.float() * weights.float()).sum().backward()
    fast_grad = leaf.grad.float()
    # The same attention written out in float32 through autograd.
    rel_h, rel_w = core.rel_pos_bias_terms(q.float(), *tables, grid)
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(2, 2, 35, 35)
    qf, kf, vf = q.float(), k.float().detach(), v.float().detach()
    reference_leaf = {"k": kf, "v": vf}[needs_grad].requires_grad_()
    attn = torch.softmax(qf @ kf.transpose(-1, -2) * 0.25 + bias, dim=-1)
    ((attn @ vf).transpose(1, 2) * weights.float()).sum().backward()
    expected = reference_leaf.grad
    _assert_close(fast_grad, expected, rel=1e-4 if dtype == torch.float32 else 5e-2)


@pytest.mark.parametrize("shape", [(24, 64, 4096), (300, 196, 196), (3, 5, 37)])
def test_in_place_softmax_through_out_equals_softmax(shape):
    # The products path runs softmax in place (``out=`` its own input) on its logits buffer;
    # PyTorch must give exactly what an out-of-place softmax gives, also for large logits.
    gen = torch.Generator().manual_seed(9)
    logits = (torch.randn(shape, generator=gen) * 20).bfloat16()
    expected = torch.softmax(logits, dim=-1)
    torch.softmax(logits, dim=-1, out=logits)
    assert torch.equal(logits, expected)
