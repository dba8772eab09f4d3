"""Cache-sized blocks and per-thread scratch for the numpy arithmetic of merge methods.

Methods whose per-element work is more than a weighted sum run it in numpy here, a block at
a time with preallocated scratch, for the same reason the numpy backend does (DESIGN.md,
measured facts: whole-array numpy is 3-4x slower, from allocation and page faults). Scratch
is per thread because the executor computes chunks on several threads.
"""

from __future__ import annotations

import threading
from typing import Iterator

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np

# Elements per block. 128K fp32 values are 512 KiB per buffer; methods use up to ~2N + 4
# buffers for N fine-tuned models (measured on the 2-core box: 64K and 256K within 10%).
BLOCK = 1 << 17

_local = threading.local()


def scratch(key: str, count: int, dtype: np.dtype | type, size: int = BLOCK) -> list[np.ndarray]:
    """``count`` reusable 1-D buffers of ``size`` elements, private to the calling thread."""
    dtype = np.dtype(dtype)
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = {}
    buffers = pool.get((key, dtype))
    if buffers is None or len(buffers) < count or buffers[0].shape[0] < size:
        buffers = pool[(key, dtype)] = [np.empty(size, dtype=dtype) for _ in range(count)]
    return buffers[:count]


def blocks(n: int, block: int = BLOCK) -> Iterator[tuple[int, int]]:
    """``(lo, hi)`` bounds covering ``range(n)`` in steps of ``block``."""
    for lo in range(0, n, block):
        yield lo, min(n, lo + block)


def upcast_delta(base: np.ndarray, model: np.ndarray, b32: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = fp32(model) − b32`` where ``b32`` is the base block already in fp32."""
    np.copyto(out, model, casting="unsafe")
    np.subtract(out, b32, out=out)
    return out


def delta64(base: np.ndarray, model: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out = fp64(model) − fp64(base)``, for statistics (exact for bf16/fp16/fp32 inputs
    whose exponents are within 29 of each other)."""
    np.copyto(out, model, casting="unsafe")
    np.subtract(out, base, out=out, casting="unsafe")
    return out
