"""Model Stock (Jang et al., 2024): interpolate the fine-tunes' average toward the base by
how much their task vectors agree.

With N ≥ 2 fine-tuned models and task vectors dᵢ = θ_ftᵢ − θ_base (each tensor flattened):

    cos = mean over pairs i < j of ⟨dᵢ, dⱼ⟩ / (‖dᵢ‖·‖dⱼ‖)      (a pair with a zero norm counts 0)
    t   = N·cos / (1 + (N − 1)·cos)                            (0 where 1 + (N − 1)·cos ≈ 0)
    θ   = t · (1/N)·Σᵢ θ_ftᵢ + (1 − t) · θ_base  =  θ_base + Σᵢ (t/N)·dᵢ

Colinear task vectors give cos = 1 and t = 1 (the plain average); orthogonal ones give t = 0
(the base). The Gram matrix of the task vectors is gathered by one reduce pass over the
chunks in float64; t is per tensor. The final combination runs on the backend
(``weighted_delta_sum``).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import register
from ._blocks import blocks, dot, scratch
from .base import ChunkContext, MergeMethod, TensorContext

TINY_NORM = 1e-12


@dataclass
class ModelStockState:
    gram: np.ndarray  # ⟨dᵢ, dⱼ⟩, float64
    t: float = 0.0
    weights: list[float] = field(default_factory=list)
    parts: dict[int, np.ndarray] = field(default_factory=dict)  # per chunk, while reducing
    lock: threading.Lock = field(default_factory=threading.Lock)


@register
class ModelStock(MergeMethod):
    name = "model-stock"
    min_models = 2

    def __init__(self, n_models: int) -> None:
        super().__init__(n_models)

    def prepare(self, tensor: TensorContext) -> ModelStockState:
        return ModelStockState(gram=np.zeros((self.n_models, self.n_models)))

    def reduce_passes(self, state: ModelStockState) -> int:
        return 1

    def accumulate(self, state: ModelStockState, pass_index: int, base: np.ndarray, models: Sequence[np.ndarray],
                   chunk: ChunkContext) -> None:
        n = len(models)
        b64, tmp, *deltas = scratch("model-stock", n + 2, np.float64)
        gram = np.zeros((n, n))
        for lo, hi in blocks(base.shape[0]):
            k = hi - lo
            np.copyto(b64[:k], base[lo:hi], casting="unsafe")
            for d, m in zip(deltas, models):
                np.copyto(d[:k], m[lo:hi], casting="unsafe")
                np.subtract(d[:k], b64[:k], out=d[:k])
            for i in range(n):
                for j in range(i, n):
                    gram[i, j] += dot(deltas[i][:k], deltas[j][:k], tmp[:k])
        with state.lock:
            state.parts[chunk.first] = gram

    def end_pass(self, state: ModelStockState, pass_index: int) -> None:
        # Summed in chunk order, so the result does not depend on thread timing.
        for first in sorted(state.parts):
            state.gram += state.parts[first]
        state.parts.clear()
        state.t = interpolation_ratio(state.gram)
        state.weights = [state.t / self.n_models] * self.n_models

    def merge_chunk(self, backend: Any, base: Any, models: Sequence[Any], out: Any,
                    chunk: ChunkContext | None = None, state: ModelStockState | None = None) -> None:
        if state is None:
            raise ValueError("model-stock needs the tensor's state (its cosines) from the engine")
        backend.weighted_delta_sum(base, models, state.weights, out)

    def recipe(self) -> dict[str, Any]:
        return {"method": self.name}


def interpolation_ratio(gram: np.ndarray) -> float:
    """t = N·cos / (1 + (N − 1)·cos) from the upper triangle of the task vectors' Gram matrix."""
    n = gram.shape[0]
    norms = [math.sqrt(max(gram[i, i], 0.0)) for i in range(n)]
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            denominator = norms[i] * norms[j]
            cosines.append(gram[i, j] / denominator if norms[i] > TINY_NORM and norms[j] > TINY_NORM else 0.0)
    cos = max(-1.0, min(1.0, sum(cosines) / len(cosines)))
    denominator = 1.0 + (n - 1) * cos
    if abs(denominator) < 1e-12:
        return 0.0
    return n * cos / denominator
