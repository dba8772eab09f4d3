"""Import kernels/triton_backend.py for the tests: under Triton's CPU interpreter when no GPU
will run it, compiled for the GPU otherwise.

Triton decides at ``@triton.jit`` time, i.e. when the module is imported, so TRITON_INTERPRET
is set only around that import and restored afterwards: other test modules, and the
subprocesses they start, never see it.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import ml_dtypes
import numpy as np

from safeblend.kernels import cuda_unavailable_reason

# Same-width integer types, to move float bits (bf16 included) between numpy and torch.
INT_OF_WIDTH = {2: np.int16, 4: np.int32, 8: np.int64}


def import_triton_backend() -> ModuleType:
    """safeblend.kernels.triton_backend, interpreted unless a usable GPU is present and TRITON_INTERPRET is unset."""
    wants_interpreter = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or (
        cuda_unavailable_reason() is not None
    )
    saved = os.environ.get("TRITON_INTERPRET")
    if wants_interpreter:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = sys.modules.get("safeblend.kernels.triton_backend")
        if module is None:
            module = importlib.import_module("safeblend.kernels.triton_backend")
        elif module.INTERPRETED != wants_interpreter:
            module = importlib.reload(module)
        return module
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def _torch_types():
    """{numpy float dtype: torch dtype} and {width: torch int dtype} (torch imported on use)."""
    import torch

    floats = {np.dtype(ml_dtypes.bfloat16): torch.bfloat16, np.dtype(np.float16): torch.float16,
              np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return floats, ints


def to_torch(a: np.ndarray, device: str):
    """A numpy float array (bf16 included) as a torch tensor of the same bits, on ``device``."""
    import torch

    floats, _ = _torch_types()
    bits = np.ascontiguousarray(a).view(INT_OF_WIDTH[a.dtype.itemsize])
    return torch.from_numpy(bits).view(floats[a.dtype]).to(device)


def to_numpy(t) -> np.ndarray:
    """A torch float tensor (bf16 included) as a numpy array of the same bits."""
    floats, ints = _torch_types()
    dtype = next(k for k, v in floats.items() if v == t.dtype)
    return t.detach().cpu().contiguous().view(ints[t.element_size()]).numpy().view(dtype)
