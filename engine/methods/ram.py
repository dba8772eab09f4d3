"""Reinforced Agent Merging (mergekit's ``ram``): add every task vector's entries, averaging
only where several models moved the same entry.

For task vectors dᵢ = θ_ftᵢ − θ_base, per element j: model i contributes where |dᵢⱼ| > ε
(``epsilon``, default 1e-5); cⱼ is the number of contributing models;

    θⱼ = θ_base,j + Σ_{i contributes} dᵢⱼ / max(cⱼ, 1)

(an entry one model moved is taken whole; an entry several moved, their mean). Per-element
work, no reduce pass. ``ramplus_tl`` (its own module) scales the unique entries per model.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import register
from ._blocks import blocks, scratch
from .base import ChunkContext, MergeMethod, TensorContext
from .params import resolve_float, setting


def ram_block(base: np.ndarray, models: Sequence[np.ndarray], epsilon: float, unique_scales: Sequence[float],
              out: np.ndarray) -> None:
    """out = base + Σ contributing dᵢ·(sᵢ where only i contributes, 1/c where c > 1 do), in fp32
    blocks with one rounding; ``unique_scales`` sᵢ are 1 for ram."""
    n = len(models)
    b, acc, count, tmp, *deltas = scratch("ram", n + 4, np.float32)
    (mask,) = scratch("ram-mask", 1, np.bool_)
    eps = np.float32(epsilon)
    with np.errstate(all="ignore"):
        for lo, hi in blocks(base.shape[0]):
            k = hi - lo
            np.copyto(b[:k], base[lo:hi], casting="unsafe")
            count[:k] = 0
            for d, m in zip(deltas, models):
                np.copyto(d[:k], m[lo:hi], casting="unsafe")
                np.subtract(d[:k], b[:k], out=d[:k])
                np.greater(np.abs(d[:k], out=tmp[:k]), eps, out=mask[:k])
                np.multiply(d[:k], mask[:k], out=d[:k])  # non-contributing entries → 0
                np.add(count[:k], mask[:k], out=count[:k])
            acc[:k] = 0
            np.equal(count[:k], np.float32(1), out=mask[:k])  # entries only one model moved
            for d, s in zip(deltas, unique_scales):
                if s != 1.0:
                    tmp[:k] = 1
                    np.copyto(tmp[:k], np.float32(s), where=mask[:k])
                    np.multiply(d[:k], tmp[:k], out=d[:k])
                np.add(acc[:k], d[:k], out=acc[:k])
            np.maximum(count[:k], np.float32(1), out=tmp[:k])
            np.greater(count[:k], np.float32(1), out=mask[:k])
            # divide only the shared entries: unique ones (count 1) are taken as they are
            np.divide(acc[:k], tmp[:k], out=acc[:k], where=mask[:k])
            np.add(acc[:k], b[:k], out=acc[:k])
            np.copyto(out[lo:hi], acc[:k], casting="unsafe")  # one rounding, to nearest even


@register
class Ram(MergeMethod):
    name = "ram"

    def __init__(self, n_models: int, epsilon: Any = 1e-5) -> None:
        super().__init__(n_models)
        self._epsilon = setting(epsilon, "epsilon")

    def prepare(self, tensor: TensorContext) -> float:
        return resolve_float(self._epsilon, tensor.name, tensor.position, f"{self.name}: epsilon")

    def runs_on_gpu(self) -> bool:
        return False

    def merge_chunk(self, backend: Any, base: Any, models: Sequence[Any], out: Any,
                    chunk: ChunkContext | None = None, state: float | None = None) -> None:
        epsilon = state if state is not None else self._epsilon.constant
        ram_block(base, models, epsilon, [1.0] * len(models), out)

    def recipe(self) -> dict[str, Any]:
        return {"method": self.name, "epsilon": self._epsilon.to_json()}
