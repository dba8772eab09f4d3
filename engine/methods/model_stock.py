"""Model Stock (Jang et al., 2024): interpolate the fine-tunes' average toward the base by
how much their task vectors agree.

With N ≥ 2 fine-tuned models and task vectors dᵢ = θ_ftᵢ − θ_base (each tensor flattened, or,
with ``filter_wise``, each row — the last dimension — on its own):

    cosᵢⱼ = clip(⟨dᵢ, dⱼ⟩ / max(‖dᵢ‖·‖dⱼ‖, 1e-6), −1, 1)         (mergekit's guard for tiny norms)
    cos   = mean over pairs i < j of cosᵢⱼ
    t     = N·cos / (1 + (N − 1)·cos)                            (0 where 1 + (N − 1)·cos ≈ 0)
    θ     = t · (1/N)·Σᵢ θ_ftᵢ + (1 − t) · θ_base  =  θ_base + (t/N)·Σᵢ dᵢ

Colinear task vectors give cos = 1 and t = 1 (the plain average); orthogonal ones give t = 0
(the base). The Gram matrix of the task vectors (one per row with ``filter_wise``: rows × N²
float64 values, never the tensor) is gathered by one reduce pass over the chunks in float64;
a row cut by a chunk boundary has its parts added. Per tensor the final combination runs on
the backend (``weighted_delta_sum``); per row it is numpy.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import register
from ._blocks import BLOCK, blocks, dot, row_sums, scratch
from .base import ChunkContext, MergeMethod, TensorContext
from .params import resolve_bool, setting

NORM_PRODUCT_FLOOR = 1e-6  # mergekit clamps ‖dᵢ‖·‖dⱼ‖ from below by this


@dataclass
class ModelStockState:
    gram: np.ndarray  # ⟨dᵢ, dⱼ⟩ per row (rows × N × N; one row unless filter-wise), float64
    row_length: int
    t: np.ndarray | None = None  # per row
    weights: list[float] = field(default_factory=list)  # one row: t/N per model
    parts: dict[int, tuple[int, np.ndarray]] = field(default_factory=dict)  # per chunk, while reducing
    lock: threading.Lock = field(default_factory=threading.Lock)


@register
class ModelStock(MergeMethod):
    name = "model-stock"
    min_models = 2

    def __init__(self, n_models: int, filter_wise: Any = False) -> None:
        super().__init__(n_models)
        self._filter_wise = setting(filter_wise, "filter_wise")

    def prepare(self, tensor: TensorContext) -> ModelStockState:
        by_row = resolve_bool(self._filter_wise, tensor.name, tensor.position, f"{self.name}: filter_wise")
        row_length = tensor.row_length if by_row else max(tensor.numel, 1)
        rows = max(1, -(-tensor.numel // row_length))
        return ModelStockState(gram=np.zeros((rows, self.n_models, self.n_models)), row_length=row_length)

    def reduce_passes(self, state: ModelStockState) -> int:
        return 1

    def accumulate(self, state: ModelStockState, pass_index: int, base: np.ndarray, models: Sequence[np.ndarray],
                   chunk: ChunkContext) -> None:
        n = len(models)
        b64, tmp, *deltas = scratch("model-stock", n + 2, np.float64)
        row0 = chunk.first // state.row_length
        last = (chunk.first + base.shape[0] - 1) // state.row_length if base.shape[0] else row0
        gram = np.zeros((last - row0 + 1, n, n))
        for lo, hi in blocks(base.shape[0]):
            k = hi - lo
            np.copyto(b64[:k], base[lo:hi], casting="unsafe")
            for d, m in zip(deltas, models):
                np.copyto(d[:k], m[lo:hi], casting="unsafe")
                np.subtract(d[:k], b64[:k], out=d[:k])
            for i in range(n):
                for j in range(i, n):
                    if state.gram.shape[0] == 1:
                        gram[0, i, j] += dot(deltas[i][:k], deltas[j][:k], tmp[:k])
                    else:
                        np.multiply(deltas[i][:k], deltas[j][:k], out=tmp[:k])
                        first_row, sums = row_sums(tmp[:k], chunk.first + lo, state.row_length)
                        gram[first_row - row0 : first_row - row0 + sums.shape[0], i, j] += sums
        with state.lock:
            state.parts[chunk.first] = (row0, gram)

    def end_pass(self, state: ModelStockState, pass_index: int) -> None:
        # Summed in chunk order, so the result does not depend on thread timing.
        for first in sorted(state.parts):
            row0, gram = state.parts[first]
            state.gram[row0 : row0 + gram.shape[0]] += gram
        state.parts.clear()
        state.t = interpolation_ratios(state.gram)
        state.weights = [float(state.t[0]) / self.n_models] * self.n_models

    def merge_chunk(self, backend: Any, base: Any, models: Sequence[Any], out: Any,
                    chunk: ChunkContext | None = None, state: ModelStockState | None = None) -> None:
        if state is None or chunk is None:
            raise ValueError("model-stock needs the tensor's state (its cosines) from the engine")
        if state.gram.shape[0] == 1:
            backend.weighted_delta_sum(base, models, state.weights, out)
            return
        n = len(models)
        b, acc, tmp = scratch("model-stock-rows", 3, np.float32)
        (rows,) = scratch("model-stock-index", 1, np.intp)
        scale = (state.t / n).astype(np.float32)
        with np.errstate(all="ignore"):
            for lo, hi in blocks(base.shape[0], BLOCK):
                k = hi - lo
                np.copyto(b[:k], base[lo:hi], casting="unsafe")
                acc_k, tmp_k = acc[:k], tmp[:k]
                acc_k.fill(0)
                for m in models:
                    np.copyto(tmp_k, m[lo:hi], casting="unsafe")
                    np.subtract(tmp_k, b[:k], out=tmp_k)
                    np.add(acc_k, tmp_k, out=acc_k)  # Σ dᵢ
                np.floor_divide(np.arange(chunk.first + lo, chunk.first + hi), state.row_length, out=rows[:k])
                np.take(scale, rows[:k], out=tmp_k)
                np.multiply(acc_k, tmp_k, out=acc_k)
                np.add(acc_k, b[:k], out=acc_k)
                np.copyto(out[lo:hi], acc_k, casting="unsafe")  # one rounding, to nearest even

    def recipe(self) -> dict[str, Any]:
        recipe: dict[str, Any] = {"method": self.name}
        if self._filter_wise.constant is not False:
            recipe["filter_wise"] = self._filter_wise.to_json()
        return recipe


def interpolation_ratios(gram: np.ndarray) -> np.ndarray:
    """t = N·cos / (1 + (N − 1)·cos) per row, from the upper triangles of the Gram matrices."""
    rows, n, _ = gram.shape
    norms = np.sqrt(np.maximum(np.diagonal(gram, axis1=1, axis2=2), 0.0))  # rows × N
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            floor = np.maximum(norms[:, i] * norms[:, j], NORM_PRODUCT_FLOOR)
            cosines.append(np.clip(gram[:, i, j] / floor, -1.0, 1.0))
    cos = np.mean(cosines, axis=0)
    denominator = 1.0 + (n - 1) * cos
    safe = np.abs(denominator) >= 1e-12
    return np.where(safe, n * cos / np.where(safe, denominator, 1.0), 0.0)


def interpolation_ratio(gram: np.ndarray) -> float:
    """t for one whole tensor from its task vectors' Gram matrix (N × N, upper triangle)."""
    return float(interpolation_ratios(gram[None])[0])
