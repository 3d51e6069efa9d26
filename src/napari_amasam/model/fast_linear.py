"""``act(linear(x))`` through oneDNN on the CPU, in float32 and under bf16 autocast.

float32: on CPU, ``F.linear`` goes to MKL's sgemm, which on AMD processors runs a slower code
path; oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, the op inductor uses) was
measured about 1.7x faster on the 2-core EPYC (164 vs 95 GFLOP/s), and with the activation
fused as a post-op (exact erf GELU) about 2.5x faster than linear + GELU. Results differ from
``F.linear`` only by float rounding (summation order).

bf16 (inside ``torch.autocast("cpu", dtype=torch.bfloat16)``): autocast's ``F.linear`` casts
the float32 weight on every call and runs the activation as a separate pass. Here the weight
is converted once to bfloat16 and reordered into oneDNN's blocked layout
(``mkldnn._reorder_linear_weight``, as inductor prepacks constant weights), cached per layer
until the weight changes, and the activation is fused. vit_b shapes on the 2-core Zen 4
(4096 tokens): 323-364 GFLOP/s autocast ``F.linear``, 395-419 packed; linear + GELU 264 ->
~340. The arithmetic is autocast's (bf16 operands, float32 accumulation, a bf16 output) up
to summation order, except that a fused activation is applied before the one rounding to
bf16 instead of after it. The cache costs one bf16 copy of each layer's weight (about
170 MB for vit_b) for as long as the layer lives or until :func:`clear_bf16_cache`.

A cached copy is renewed when its parameter's version or storage changes: an optimiser step,
``load_state_dict``, ``param.copy_``, ``param.data = t`` or a new Parameter. Writes that
PyTorch does not count, in place through ``param.data`` (``param.data.copy_(t)``, as some
weight-averaging libraries do), are not seen: call :func:`clear_bf16_cache` after them.

The oneDNN ops have no autograd formula, so they run only when no gradient is needed;
otherwise, and for anything but a plain hook-free ``nn.Linear`` on the CPU (a LoRA wrapper
keeps its own forward), the module runs as it is.

Public API
----------
``fast_linear(layer, x, activation="none")``
    ``act(layer(x))``.
``onednn_linear_dtype(x, layer)``
    Which oneDNN path ``fast_linear`` takes for these arguments (None: the module's forward).
``clear_bf16_cache(module=None)``
    Drop the cached bf16 weights of ``module``'s linears (of every layer: None).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ONEDNN_ACTIVATIONS", "clear_bf16_cache", "fast_linear", "onednn_linear_dtype"]

#: activation name -> (oneDNN post-op attr, algorithm)
ONEDNN_ACTIVATIONS = {
    "none": ("none", ""),
    "gelu": ("gelu", "none"),
    "gelu_tanh": ("gelu", "tanh"),
    "relu": ("relu", ""),
}

#: Row count the bf16 weights are blocked for (a 1024-px vit_b image has 4096 tokens; any
#: other count runs correctly, the blocking is a performance hint).
_PACK_ROWS_HINT = 4096

# layer -> ((weight version and storage, bias's), weight ref, bias ref, bf16 weight, bf16 bias);
# weak keys so a cached copy never outlives its layer (and the layer's state_dict, deepcopy
# and pickling never see it).
_bf16_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _probe_onednn_linear(dtype: torch.dtype) -> bool:
    """The private ops exist in CPU builds with oneDNN; check once that they run in ``dtype``."""
    try:
        x = torch.ones(2, 3, dtype=dtype)
        w = torch.ones(4, 3, dtype=dtype)
        if dtype == torch.bfloat16:
            w = torch.ops.mkldnn._reorder_linear_weight(w, 2)
        y = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return bool(torch.backends.mkldnn.is_available()
                    and torch.allclose(y.float(), torch.full((2, 4), 3.0)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


_HAS_ONEDNN_LINEAR = _probe_onednn_linear(torch.float32)
_HAS_ONEDNN_BF16_LINEAR = _probe_onednn_linear(torch.bfloat16)


def onednn_linear_dtype(x: torch.Tensor, layer: nn.Module) -> torch.dtype | None:
    """The dtype oneDNN's linear computes ``layer(x)`` in, or None for the module's forward.

    float32 for float32 input outside autocast; bfloat16 inside CPU bf16 autocast (where
    ``layer(x)`` would be bf16 too); None unless ``layer`` is a plain hook-free float32
    ``nn.Linear`` on the CPU and no gradient is needed (the ops have no backward).
    """
    if type(layer) is not nn.Linear or layer._forward_hooks or layer._forward_pre_hooks:
        return None
    if x.device.type != "cpu" or layer.weight.dtype != torch.float32:
        return None
    if torch.compiler.is_compiling():
        # Inductor lowers oneDNN's linear only for constant weights; it fuses F.linear itself.
        return None
    if torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in layer.parameters())
    ):
        return None
    if torch.is_autocast_enabled("cpu"):
        bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16
        ok = bf16 and _HAS_ONEDNN_BF16_LINEAR and x.dtype in (torch.float32, torch.bfloat16)
        return torch.bfloat16 if ok else None
    return torch.float32 if _HAS_ONEDNN_LINEAR and x.dtype == torch.float32 else None


def _bf16_weights(layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``layer``'s weight in bf16 (oneDNN-blocked) and bias in bf16, converted once per
    version of the parameters (an optimiser step or ``load_state_dict`` bumps the version;
    a new Parameter object is another tensor; ``param.data = t`` keeps the version but not
    the storage)."""
    weight, bias = layer.weight, layer.bias
    try:
        versions = (weight._version, weight.data_ptr(),
                    None if bias is None else (bias._version, bias.data_ptr()))
    except RuntimeError:
        # Parameters created under inference_mode track no version: convert every call.
        versions = None
    cached = _bf16_cache.get(layer)
    if (versions is not None and cached is not None and cached[0] == versions
            and cached[1]() is weight and cached[2]() is bias):
        return cached[3], cached[4]
    packed = torch.ops.mkldnn._reorder_linear_weight(
        weight.detach().to(torch.bfloat16), _PACK_ROWS_HINT
    )
    bias16 = None if bias is None else bias.detach().to(torch.bfloat16)
    if versions is not None:
        bias_ref = (lambda: None) if bias is None else weakref.ref(bias)
        _bf16_cache[layer] = (versions, weakref.ref(weight), bias_ref, packed, bias16)
    return packed, bias16


def clear_bf16_cache(module: nn.Module | None = None) -> int:
    """Drop the cached bf16 weights of the linears in ``module`` (every cached layer when
    None), e.g. after writing weights through ``param.data``; returns how many were dropped."""
    layers = list(_bf16_cache.keys()) if module is None else list(module.modules())
    dropped = 0
    for layer in layers:
        dropped += _bf16_cache.pop(layer, None) is not None
    return dropped


def fast_linear(layer: nn.Module, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
    """``act(layer(x))`` through oneDNN when allowed (see the module docstring), else the
    module.

    Parameters
    ----------
    layer : nn.Module
        Usually an ``nn.Linear`` with weight ``(out, in)``.
    x : torch.Tensor
        ``(..., in)``.
    activation : {"none", "gelu", "gelu_tanh", "relu"}
        Activation applied after the layer (fused into the oneDNN kernel when used).

    Returns
    -------
    torch.Tensor
        ``(..., out)``; bfloat16 under CPU bf16 autocast, like ``layer(x)`` there.
    """
    dtype = onednn_linear_dtype(x, layer)
    if dtype is not None:
        attr, algorithm = ONEDNN_ACTIVATIONS[activation]
        if dtype == torch.bfloat16:
            weight, bias = _bf16_weights(layer)
            x = x.to(torch.bfloat16)
        else:
            weight, bias = layer.weight, layer.bias
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)
    y = layer(x)
    if activation == "none":
        return y
    if activation == "relu":
        return F.relu(y)
    return F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")
