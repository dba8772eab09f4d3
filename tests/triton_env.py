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

from kernels import cuda_unavailable_reason


def import_triton_backend() -> ModuleType:
    """kernels.triton_backend, interpreted unless a usable GPU is present and TRITON_INTERPRET is unset."""
    wants_interpreter = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or (
        cuda_unavailable_reason() is not None
    )
    saved = os.environ.get("TRITON_INTERPRET")
    if wants_interpreter:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = sys.modules.get("kernels.triton_backend")
        if module is None:
            module = importlib.import_module("kernels.triton_backend")
        elif module.INTERPRETED != wants_interpreter:
            module = importlib.reload(module)
        return module
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
