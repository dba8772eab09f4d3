"""RAM+ tensor-local (mergekit's ``ramplus_tl``): RAM, with each model's unique entries scaled
up by how much of what it moved it shares with others, per tensor.

With dᵢ, ε (``epsilon``, 1e-5), contributions |dᵢⱼ| > ε and their count cⱼ as in ``ram``, per
model i over the tensor: sharedᵢ = #{j: i contributes, cⱼ > 1}, uniqueᵢ = #{j: i contributes,
cⱼ = 1}, ρᵢ = sharedᵢ / max(uniqueᵢ, ε) and λᵢ = 1 + r·clip(ρᵢ, 0, α) (``r`` 0.1, ``alpha`` 0.2):

    θⱼ = θ_base,j + Σ_{i contributes} dᵢⱼ·(λᵢ where cⱼ = 1, 1/cⱼ where cⱼ > 1)

The counts come from one reduce pass over the chunks (integers: exact in any order).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import register
from ._blocks import blocks, scratch
from .base import ChunkContext, MergeMethod, TensorContext
from .params import resolve_float, setting
from .ram import ram_block


@dataclass
class RamPlusState:
    epsilon: float
    r: float
    alpha: float
    counts: np.ndarray  # per model: (shared, unique)
    scales: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@register
class RamPlusTL(MergeMethod):
    name = "ramplus-tl"

    def __init__(self, n_models: int, r: Any = 0.1, alpha: Any = 0.2, epsilon: Any = 1e-5) -> None:
        super().__init__(n_models)
        self._r, self._alpha, self._epsilon = setting(r, "r"), setting(alpha, "alpha"), setting(epsilon, "epsilon")

    def prepare(self, tensor: TensorContext) -> RamPlusState:
        name, t = tensor.name, tensor.position
        return RamPlusState(epsilon=resolve_float(self._epsilon, name, t, f"{self.name}: epsilon"),
                            r=resolve_float(self._r, name, t, f"{self.name}: r"),
                            alpha=resolve_float(self._alpha, name, t, f"{self.name}: alpha"),
                            counts=np.zeros((self.n_models, 2), dtype=np.int64))

    def reduce_passes(self, state: RamPlusState) -> int:
        return 1

    def accumulate(self, state: RamPlusState, pass_index: int, base: np.ndarray, models: Sequence[np.ndarray],
                   chunk: ChunkContext) -> None:
        n = len(models)
        b, d, tmp = scratch("ramplus", 3, np.float32)
        (count,) = scratch("ramplus-count", 1, np.int64)
        contributes = scratch("ramplus-mask", n, np.bool_)
        counts = np.zeros((n, 2), dtype=np.int64)
        eps = np.float32(state.epsilon)
        with np.errstate(all="ignore"):
            for lo, hi in blocks(base.shape[0]):
                k = hi - lo
                np.copyto(b[:k], base[lo:hi], casting="unsafe")
                count[:k] = 0
                for mask, m in zip(contributes, models):
                    np.copyto(d[:k], m[lo:hi], casting="unsafe")
                    np.subtract(d[:k], b[:k], out=d[:k])
                    np.greater(np.abs(d[:k], out=tmp[:k]), eps, out=mask[:k])
                    np.add(count[:k], mask[:k], out=count[:k])
                unique = count[:k] == 1
                for i, mask in enumerate(contributes):
                    mine = int(np.count_nonzero(mask[:k]))
                    alone = int(np.count_nonzero(mask[:k] & unique))
                    counts[i] += (mine - alone, alone)
        with state.lock:  # integer counts: the sum is the same in any order
            state.counts += counts

    def end_pass(self, state: RamPlusState, pass_index: int) -> None:
        state.scales = []
        for shared, unique in state.counts:
            rho = shared / max(float(unique), state.epsilon)
            state.scales.append(1.0 + state.r * min(max(rho, 0.0), state.alpha))

    def merge_chunk(self, backend: Any, base: Any, models: Sequence[Any], out: Any,
                    chunk: ChunkContext | None = None, state: RamPlusState | None = None) -> None:
        if state is None:
            raise ValueError("ramplus-tl needs the tensor's state (its counts) from the engine")
        ram_block(base, models, state.epsilon, state.scales, out)

    def recipe(self) -> dict[str, Any]:
        return {"method": self.name, "r": self._r.to_json(), "alpha": self._alpha.to_json(),
                "epsilon": self._epsilon.to_json()}
