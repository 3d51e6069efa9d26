"""Faster, numerically equivalent forwards for the convolutional side of AMA-SAM.

Profiled on the 2-core CPU (vit_b, 1024 px; ``benchmarks/bench_pipeline.py`` prints the
breakdown), the parts after the encoder spent most of their time in three places:

* ``LayerNorm2d`` (segment_anything's channel LayerNorm of NCHW maps, written as eight
  element-wise passes: mean, subtract, square, mean, add, sqrt, divide, affine). Here it is
  one ``F.layer_norm`` over a channels-last view (same formula: biased variance, eps inside
  the square root), 2-4x faster, and its output is channels-last, the layout oneDNN's
  convolutions and transposed convolutions prefer (about 1.5-3x faster on the 2x2 stride-2
  transposed convolutions of the decoder than NCHW input, bit-identical results).
* The encoder adapters' ``Linear -> GELU -> Linear`` through ``F.linear`` (MKL, slow on AMD):
  here through oneDNN with the GELU fused (:func:`~.fast_linear.fast_linear`).
* The full-resolution refinement of the HR-Decoder (``Conv3x3 -> GELU -> Conv3x3`` on 22
  channels at 1024 x 1024): fed channels-last and with the GELU fused into the first
  convolution (:func:`conv2d_gelu`), about 2.4x faster than NCHW with a separate GELU.

Every replacement differs from the original only by float rounding (summation order), runs
only where it is allowed (the oneDNN convolutions: CPU, float32, no gradient, no autocast;
the linears: see :mod:`.fast_linear`, which also has a CPU bf16 autocast path; otherwise
the module's own forward), and inside :func:`~.fast_attention.reference_attention` the original
forwards run, so tests and benchmarks compare both on the same weights.

Public API
----------
``enable_fast_layers(module) -> int`` / ``disable_fast_layers(module) -> int``
    Re-class every ``LayerNorm2d`` and encoder ``MLPAdapter`` (state_dict unchanged).
``conv2d_gelu(conv, x)``
    ``GELU(conv(x))``, fused through oneDNN when allowed.
``to_channels_last(x)``
    ``x`` in channels-last memory (no copy when it already is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from .adapters import MLPAdapter
from .fast_attention import fast_attention_enabled
from .fast_linear import fast_linear

__all__ = [
    "FastLayerNorm2d",
    "FastMLPAdapter",
    "conv2d_gelu",
    "disable_fast_layers",
    "enable_fast_layers",
    "to_channels_last",
]


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) ``x`` with channels-last strides (a copy only when needed)."""
    return x.contiguous(memory_format=torch.channels_last)


class FastLayerNorm2d(LayerNorm2d):
    """``LayerNorm2d`` as one ``F.layer_norm`` over the channels of a channels-last view.

    (B, C, H, W) -> (B, C, H, W) with channels-last strides. Created only by re-classing in
    :func:`enable_fast_layers`; parameters and state_dict keys are the original ones.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fast_attention_enabled():
            return super().forward(x)
        channels = x.shape[1]
        y = F.layer_norm(x.permute(0, 2, 3, 1), (channels,), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class FastMLPAdapter(MLPAdapter):
    """Encoder ``MLPAdapter`` whose ``down -> GELU`` runs as one fused oneDNN linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exact_gelu = type(self.act) is nn.GELU and self.act.approximate == "none"
        if not fast_attention_enabled() or not exact_gelu:
            return super().forward(x)
        return fast_linear(self.up, fast_linear(self.down, x, "gelu"))


def _onednn_conv_ok(x: torch.Tensor, conv: nn.Module) -> bool:
    """Whether oneDNN's fused convolution may replace ``conv`` (same rules as linears)."""
    if type(conv) is not nn.Conv2d or conv._forward_hooks or conv._forward_pre_hooks:
        return False
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or conv.weight.dtype != torch.float32:
        return False
    if not _HAS_ONEDNN_CONV or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        # (Inductor fuses convolution + GELU itself)
        return False
    needs_grad = x.requires_grad or any(p.requires_grad for p in conv.parameters())
    return not (torch.is_grad_enabled() and needs_grad)


def conv2d_gelu(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``GELU(conv(x))`` (exact erf GELU) with the activation fused into oneDNN's kernel.

    Parameters
    ----------
    conv : nn.Module
        Usually an ``nn.Conv2d``; anything else runs as ``F.gelu(conv(x))``.
    x : torch.Tensor
        (B, C_in, H, W); channels-last input is fastest on CPU.

    Returns
    -------
    torch.Tensor
        (B, C_out, H', W').
    """
    if fast_attention_enabled() and _onednn_conv_ok(x, conv):
        return torch.ops.mkldnn._convolution_pointwise(
            x, conv.weight, conv.bias, list(conv.padding), list(conv.stride),
            list(conv.dilation), conv.groups, "gelu", [], "none",
        )
    return F.gelu(conv(x))


def _probe_onednn_conv() -> bool:
    """The private fused-convolution op exists in CPU builds with oneDNN; check it runs."""
    try:
        conv = nn.Conv2d(2, 3, 3, padding=1)
        x = torch.randn(1, 2, 5, 5)
        with torch.no_grad():
            fused = torch.ops.mkldnn._convolution_pointwise(
                x, conv.weight, conv.bias, [1, 1], [1, 1], [1, 1], 1, "gelu", [], "none"
            )
            return bool(torch.allclose(fused, F.gelu(conv(x)), atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


_HAS_ONEDNN_CONV = _probe_onednn_conv()


def _reclass(module: nn.Module, pairs: dict[type, type]) -> int:
    """Re-class modules whose exact class is a key of ``pairs``; returns how many."""
    found = [m for m in module.modules() if type(m) in pairs]
    for m in found:
        m.__class__ = pairs[type(m)]
    return len(found)


def enable_fast_layers(module: nn.Module) -> int:
    """Switch every ``LayerNorm2d`` and ``MLPAdapter`` in ``module`` to its fast forward.

    Exact classes only (subclasses keep their own forward). Returns the number of modules
    on the fast path (already switched ones count).
    """
    return _reclass(
        module,
        {
            LayerNorm2d: FastLayerNorm2d,
            FastLayerNorm2d: FastLayerNorm2d,
            MLPAdapter: FastMLPAdapter,
            FastMLPAdapter: FastMLPAdapter,
        },
    )


def disable_fast_layers(module: nn.Module) -> int:
    """Undo :func:`enable_fast_layers`; returns the number of modules switched back."""
    return _reclass(module, {FastLayerNorm2d: LayerNorm2d, FastMLPAdapter: MLPAdapter})
