"""Inference precision: ``fp32``, ``bf16`` or ``auto``, and the autocast it means per device.

``fp32``
    No autocast: the exact float32 path (the reference for every accuracy figure).
``bf16``
    ``torch.autocast(dtype=bfloat16)`` on CPU or CUDA: matrix products and convolutions in
    bfloat16, reductions (softmax, norms) in float32. Fast where the hardware has bf16
    arithmetic (CUDA GPUs from Ampere on; CPUs with AVX-512 BF16 or AMX); on other CPUs
    oneDNN emulates it and it is *slower* than fp32, so ``auto`` does not pick it there.
``auto``
    bf16 where the device computes it natively, float16 on CUDA GPUs without bf16, fp32
    otherwise (CPUs without bf16 arithmetic, Apple MPS).

A model folder records its default in ``config.json`` (``ModelConfig.precision``); the
predictor, the CLI (``segment --precision``) and the Segment widget can override it.
"""

from __future__ import annotations

import contextlib

import torch

from .config import ConfigError
from .device import cpu_has_native_bf16
from .errors import DeviceError

PRECISION_CHOICES = ("auto", "fp32", "bf16")
__all__ = ["PRECISION_CHOICES", "autocast_dtype_for", "check_precision", "cpu_has_native_bf16",
           "precision_context"]


def check_precision(value: str, where: str = "precision") -> str:
    """Return ``value`` lower-cased if it is a known precision, else raise ``ConfigError``."""
    name = str(value).strip().lower()
    if name not in PRECISION_CHOICES:
        raise ConfigError(f"{where} must be one of {', '.join(PRECISION_CHOICES)}, not {value!r}")
    return name


def autocast_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``precision`` means on ``device`` (None: run in float32).

    Raises
    ------
    DeviceError
        ``bf16`` on a device that cannot run it (MPS, or a CUDA GPU without bf16).
    """
    precision = check_precision(precision)
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if precision == "bf16":
            raise DeviceError(f"precision bf16: the GPU {device} does not support bfloat16")
        return torch.float16
    if device.type == "cpu":
        if precision == "bf16" or cpu_has_native_bf16():
            return torch.bfloat16
        return None
    if precision == "bf16":
        raise DeviceError(f"precision bf16 is available on CPU and CUDA, not on {device.type}")
    return None


def precision_context(
    dtype: torch.dtype | None, device: torch.device
) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``, or a null context for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
