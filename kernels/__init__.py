"""Compute backends for the merge engine, one interface, two implementations.

``numpy`` runs on the CPU with numpy and ml_dtypes only. ``triton`` runs fused kernels on a
GPU (or under ``TRITON_INTERPRET=1`` on the CPU) and is imported lazily, so the CPU path
never needs torch or triton installed.
"""

from __future__ import annotations

import glob
import importlib.util
import os

from .protocol import Backend

__all__ = ["Backend", "cuda_unavailable_reason", "cpu_backend"]


def cpu_backend() -> Backend:
    """The CPU backend."""
    from .numpy_backend import NumpyBackend

    return NumpyBackend()


def cuda_unavailable_reason() -> str | None:
    """None when torch, triton and a CUDA GPU are all present; otherwise why not.

    Checks for an NVIDIA driver and for the packages before importing torch, whose import
    alone costs ~300 MB of RSS, so that ``--device auto`` on a CPU-only box stays lean.
    """
    if not os.path.exists("/proc/driver/nvidia/version") and not glob.glob("/dev/nvidia[0-9]*"):
        return "no NVIDIA GPU driver found"
    for package in ("torch", "triton"):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed (pip install 'safeblend[gpu]')"
    try:
        import torch
    except ImportError:
        return "torch is not installed (pip install 'safeblend[gpu]')"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'safeblend[gpu]')"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return None
