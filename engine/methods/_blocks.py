"""Cache-sized blocks and per-thread scratch for the numpy arithmetic of merge methods.

Methods whose per-element work is more than a weighted sum run it in numpy here, a block at
a time with preallocated scratch, for the same reason the numpy backend does (its module docstring:
whole-array numpy is 3-4x slower, from allocation and page faults). Scratch
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


def dot(a: np.ndarray, b: np.ndarray, tmp: np.ndarray) -> float:
    """⟨a, b⟩ by an elementwise product into ``tmp`` and numpy's pairwise sum.

    Not np.dot: OpenBLAS's threaded ddot measured 21 ns per element on 128K-element blocks
    here (thread wake-ups on every call), against 0.5 ns for this.
    """
    np.multiply(a, b, out=tmp)
    return float(tmp.sum())


def row_sums(values: np.ndarray, first: int, row_length: int) -> tuple[int, np.ndarray]:
    """Sums of ``values`` (elements [first, first + len) of a row-major tensor) per row.

    Returns the index of the first row touched and one float64 sum per row touched, in order;
    the first and last rows may be partial (the caller adds up a row's parts across chunks).
    """
    n = values.shape[0]
    row0 = first // row_length
    offset = (-first) % row_length  # where the first whole row starts in ``values``
    starts = np.arange(offset, n, row_length)
    if offset != 0 or starts.size == 0:
        starts = np.concatenate(([0], starts))
    return row0, np.add.reduceat(values.astype(np.float64, copy=False), starts) if n else np.zeros(0)
