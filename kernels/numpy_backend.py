"""The CPU backend: numpy + ml_dtypes, blocked so that every temporary stays in cache.

Whole-array numpy allocates a full-size temporary per operation and pays a page fault per
fresh page; working through fixed blocks with preallocated scratch is 3-4x faster on the
2-core machines this project is measured on (DESIGN.md, measured facts).
"""

from __future__ import annotations

from typing import Sequence

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np

# Elements per block: 64K fp32 values are 256 KiB per scratch buffer, three of them fit in L2.
BLOCK_ELEMENTS = 1 << 16


class NumpyBackend:
    """Blocked fp32 merge arithmetic on numpy arrays; one instance per compute thread."""

    name = "numpy"

    def __init__(self, block_elements: int = BLOCK_ELEMENTS) -> None:
        self.block = block_elements
        self._scratch: dict[np.dtype, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

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
        acc, b, m = self._buffers(compute)
        weights = [compute.type(w) for w in weights]  # never rounded to the tensor dtype
        n = base.shape[0]
        with np.errstate(all="ignore"):  # inf − inf is NaN by IEEE rules, not a user error
            self._blocks(base, models, weights, out, n, acc, b, m)

    def _blocks(self, base, models, weights, out, n, acc, b, m) -> None:
        for lo in range(0, n, self.block):
            hi = min(n, lo + self.block)
            k = hi - lo
            b_k, acc_k, m_k = b[:k], acc[:k], m[:k]
            np.copyto(b_k, base[lo:hi], casting="unsafe")
            np.copyto(acc_k, b_k)
            for model, w in zip(models, weights):
                np.copyto(m_k, model[lo:hi], casting="unsafe")
                np.subtract(m_k, b_k, out=m_k)
                np.multiply(m_k, w, out=m_k)
                np.add(acc_k, m_k, out=acc_k)
            # ml_dtypes and numpy both round to nearest even on narrowing casts.
            np.copyto(out[lo:hi], acc_k, casting="unsafe")

    def _buffers(self, compute: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if compute not in self._scratch:
            self._scratch[compute] = tuple(np.empty(self.block, dtype=compute) for _ in range(3))
        return self._scratch[compute]


def _compute_dtype(*arrays: np.ndarray) -> np.dtype:
    return np.dtype(np.float64) if any(a.dtype == np.float64 for a in arrays) else np.dtype(np.float32)


def _check_operands(base, models, weights, out) -> None:
    if len(models) != len(weights) or not models:
        raise ValueError(f"need one weight per model, got {len(models)} models, {len(weights)} weights")
    for a in (*models, out):
        if a.shape != base.shape:
            raise ValueError(f"operand shapes differ: {a.shape} vs {base.shape}")
