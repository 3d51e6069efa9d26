"""Compute-device selection shared by training, inference, the CLI and the widgets."""

from __future__ import annotations

import os

import torch

from .errors import DeviceError

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """Devices usable here, best first; ``cpu`` is always last and always present."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    # MPS is skipped on CI, where runners report it but it misbehaves (as micro-sam does).
    if _mps_available() and not os.environ.get("CI"):
        found.append("mps")
    found.append("cpu")
    return found


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``auto``/``cuda``/``cuda:N``/``mps``/``cpu`` into a usable ``torch.device``.

    ``auto`` picks cuda, then mps, then cpu. A named device that is not available raises
    ``DeviceError`` with one line saying what is available instead.
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device(available_devices()[0])
    base = name.split(":")[0]
    if base not in DEVICE_CHOICES:
        raise DeviceError(f"unknown device {name!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    if base == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                "device 'cuda' was requested but no CUDA GPU is available "
                f"(available: {', '.join(available_devices())})"
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r}: only {torch.cuda.device_count()} CUDA GPU(s) found")
    if base == "mps" and not _mps_available():
        raise DeviceError(
            "device 'mps' was requested but Apple MPS is not available "
            f"(available: {', '.join(available_devices())})"
        )
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matrix products natively on this CPU (AVX-512 BF16 / AMX)."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe is not None and probe())
    except RuntimeError:
        return False


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for training on ``device`` (None: float32).

    CUDA: bf16 where the GPU supports it, fp16 otherwise. CPU: bf16 where oneDNN computes it
    natively (AVX-512 BF16 or AMX): a tiny_conv training step ran 1.3x faster with the same
    held-out quality (benchmarks/README.md); on other CPUs bf16 is emulated and slower, so
    they train in float32, as does MPS.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None
