"""The CPU backend: numpy + ml_dtypes, blocked so that every temporary stays in cache.

Whole-array numpy allocates a full-size temporary per operation and pays a page fault per
fresh page; working through fixed blocks with preallocated scratch is 3-4x faster on the
2-core machines this project is measured on (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import threading
from typing import Sequence

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np

# Elements per block. Measured here (bf16 lerp, one thread): 2.2 ns/element at 16K, 1.5 at
# 64K, 1.2 at 256K; 256K fp32 values are 1 MiB per scratch buffer, three per thread.
BLOCK_ELEMENTS = 1 << 18


class NumpyBackend:
    """Blocked fp32 merge arithmetic on numpy arrays; safe to share between threads."""

    name = "numpy"
    fuses_dare = False  # DARE runs as the method's own blocked numpy code (safeblend.methods._sparse)

    def __init__(self, block_elements: int = BLOCK_ELEMENTS) -> None:
        self.block = block_elements
        self._local = threading.local()  # scratch buffers, one set per calling thread

    def weighted_delta_sum(
        self,
        base: np.ndarray,
        models: Sequence[np.ndarray],
        weights: Sequence[float],
        out: np.ndarray,
    ) -> None:
        """``out = base + Σ weights[i]·(models[i] − base)``, fp32 math, one rounding to out."""
        _check_operands(base, models, weights, out)
        compute = _compute_dtype(base, *models, out)
        weights = [compute.type(w) for w in weights]  # never rounded to the tensor dtype
        with np.errstate(all="ignore"):  # inf − inf is NaN by IEEE rules, not a user error
            for lo in range(0, base.shape[0], self.block):
                hi = min(base.shape[0], lo + self.block)
                self._block(base[lo:hi], [m[lo:hi] for m in models], weights, out[lo:hi], compute)

    def _block(self, base: np.ndarray, models: list[np.ndarray], weights: list, out: np.ndarray,
               compute: np.dtype) -> None:
        """One cache-sized block: upcast, accumulate Σ w·(m − b) in place, add b, round once."""
        b, acc, delta = (s[: base.shape[0]] for s in self._scratch(compute))
        if base.dtype == compute:  # read in place (an fp32 base: a dequantized fp8 one)
            b = base
        else:
            np.copyto(b, base, casting="unsafe")
        for i, (model, w) in enumerate(zip(models, weights)):
            target = acc if i == 0 else delta
            np.copyto(target, model, casting="unsafe")
            np.subtract(target, b, out=target)
            np.multiply(target, w, out=target)
            if i > 0:
                np.add(acc, delta, out=acc)
        np.add(acc, b, out=acc)
        # ml_dtypes and numpy both round to nearest even on narrowing casts.
        np.copyto(out, acc, casting="unsafe")

    def _scratch(self, compute: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        if compute not in buffers:
            buffers[compute] = tuple(np.empty(self.block, dtype=compute) for _ in range(3))
        return buffers[compute]


def _compute_dtype(*arrays: np.ndarray) -> np.dtype:
    return np.dtype(np.float64) if any(a.dtype == np.float64 for a in arrays) else np.dtype(np.float32)


def _check_operands(base, models, weights, out) -> None:
    if len(models) != len(weights) or not models:
        raise ValueError(f"need one weight per model, got {len(models)} models, {len(weights)} weights")
    for a in (*models, out):
        if a.shape != base.shape:
            raise ValueError(f"operand shapes differ: {a.shape} vs {base.shape}")
