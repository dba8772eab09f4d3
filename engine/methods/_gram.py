"""One reduce pass gathering the Gram matrix of a tensor's operands, for methods whose result
is a linear combination of the inputs fixed by their inner products (multislerp, karcher).

The operands are either the task vectors θᵢ − θ_base (``deltas``) or the models themselves,
the base first (``raw``: the base is then an operand like the others). Gᵢⱼ = ⟨xᵢ, xⱼ⟩ is summed
in float64 per chunk, and the chunks' parts are added in chunk order in ``end_pass``, so the
result does not depend on thread timing. The output is then ``combine``: θ_base + Σ cᵢ·dᵢ for
deltas, Σ cᵢ·xᵢ for raw operands, fp32 arithmetic and one rounding.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ._blocks import blocks, dot, scratch
from .base import ChunkContext, MergeMethod
from .linear import weighted_sum


@dataclass
class GramState:
    operands: str  # "deltas" or "raw"
    size: int
    gram: np.ndarray = field(init=False)
    coefficients: list[float] = field(default_factory=list)  # set by the method after the pass
    parts: dict[int, np.ndarray] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific per-tensor values

    def __post_init__(self) -> None:
        self.gram = np.zeros((self.size, self.size))


def accumulate(state: GramState, base: np.ndarray, models: Sequence[np.ndarray], first: int) -> None:
    """Fold one chunk's inner products into ``state`` (reduce pass 0)."""
    raw = state.operands == "raw"
    n = state.size
    b64, tmp, *xs = scratch("gram", n + 2, np.float64)
    gram = np.zeros((n, n))
    for lo, hi in blocks(base.shape[0]):
        k = hi - lo
        np.copyto(b64[:k], base[lo:hi], casting="unsafe")
        sources = [base, *models] if raw else list(models)
        for x, m in zip(xs, sources):
            np.copyto(x[:k], m[lo:hi], casting="unsafe")
            if not raw:
                np.subtract(x[:k], b64[:k], out=x[:k])
        for i in range(n):
            for j in range(i, n):
                gram[i, j] += dot(xs[i][:k], xs[j][:k], tmp[:k])
    with state.lock:
        state.parts[first] = gram


def end_pass(state: GramState) -> None:
    """Add the chunks' parts in order and mirror the upper triangle."""
    for first in sorted(state.parts):
        state.gram += state.parts[first]
    state.parts.clear()
    upper = np.triu(state.gram)
    state.gram = upper + np.triu(upper, 1).T


def combine(backend: Any, base: np.ndarray, models: Sequence[np.ndarray], state: GramState,
            out: np.ndarray) -> None:
    """θ_base + Σ cᵢ·(θᵢ − θ_base) for deltas; Σ cᵢ·xᵢ (base first) for raw operands."""
    c = state.coefficients
    if state.operands == "raw":
        weighted_sum(base, models, c[0], c[1:], out)
    else:
        backend.weighted_delta_sum(base, models, c, out)


class GramMethod(MergeMethod):
    """A method whose output is ``combine`` with coefficients computed from the Gram matrix:
    one reduce pass gathers it, ``coefficients`` turns it into the cᵢ, ``combine`` writes."""

    def coefficients(self, state: GramState) -> list[float]:
        """The cᵢ of this tensor, from ``state.gram`` (and the method's ``state.extra``)."""
        raise NotImplementedError

    def reduce_passes(self, state: GramState) -> int:
        return 1

    def accumulate(self, state: GramState, pass_index: int, base: np.ndarray, models: Sequence[np.ndarray],
                   chunk: ChunkContext) -> None:
        accumulate(state, base, models, chunk.first)

    def end_pass(self, state: GramState, pass_index: int) -> None:
        end_pass(state)
        state.coefficients = self.coefficients(state)

    def merge_chunk(self, backend: Any, base: Any, models: Sequence[Any], out: Any,
                    chunk: ChunkContext | None = None, state: GramState | None = None) -> None:
        if state is None:
            raise ValueError(f"{self.name} needs the tensor's state (its Gram matrix) from the engine")
        combine(backend, base, models, state, out)
