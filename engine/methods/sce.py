"""SCE (Wan et al., 2024; mergekit's ``sce``): select the entries where the task vectors vary
most, weight each model by its energy, erase disagreeing signs.

For task vectors dᵢ = θ_ftᵢ − θ_base of one tensor (n elements), N models, ρ = ``select_topk``
(default 1):

    select:  vⱼ = Var_i(dᵢⱼ) (population variance across the models, per element);
             with ρ < 1 keep the k = ⌊ρ·#{j: vⱼ ≠ 0}⌋ elements of largest vⱼ (ties at the
             threshold all kept; ρ ≤ 0 or k = 0 keeps none) and zero the rest in every dᵢ
    weight:  ŵᵢ = mean(dᵢ²) over the tensor, wᵢ = ŵᵢ / Σ ŵⱼ (1/N each where Σ ŵⱼ < 1e-6)
    erase:   σ = +1 where Σᵢ dᵢ ≥ 0, −1 elsewhere; aᵢ = [sign(dᵢ) = σ]
    θ = θ_base + Σᵢ aᵢ·wᵢ·dᵢ / max(Σᵢ aᵢ·wᵢ, 1e-6)

Streaming: one pass counts the nonzero variances (ρ < 1), the selection passes find the
variance threshold exactly (``safeblend.methods._select`` over the fp32 variances' bit
patterns, every element counted in each pass), one pass sums each model's selected dᵢ² in
float64, then the per-element merge; never more than a chunk per thread in memory.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import register
from ._blocks import blocks, scratch
from ._select import KthLargest, magnitude_bits
from .base import ChunkContext, MergeMethod, TensorContext
from .params import resolve_float, setting

WEIGHT_FLOOR = 1e-6  # mergekit: uniform weights below this total energy; divisor clamped to it


@dataclass
class SceState:
    numel: int
    density: float
    nonzero: int = 0
    selector: KthLargest | None = None
    select_from: int | None = None  # first selection pass (after the count pass)
    weight_pass: int | None = None
    total_passes: int = 1
    energy: np.ndarray | None = None  # per model: Σ selected dᵢ², float64
    weights: list[float] = field(default_factory=list)
    keep_none: bool = False
    parts: dict[int, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


@register
class Sce(MergeMethod):
    name = "sce"

    def __init__(self, n_models: int, select_topk: Any = 1.0) -> None:
        super().__init__(n_models)
        self._topk = setting(select_topk, "select_topk")

    def prepare(self, tensor: TensorContext) -> SceState:
        density = resolve_float(self._topk, tensor.name, tensor.position, f"{self.name}: select_topk")
        state = SceState(numel=tensor.numel, density=density)
        if density <= 0:
            state.keep_none = True
            state.total_passes = 0
            state.weights = [1.0 / self.n_models] * self.n_models
        elif density >= 1:
            state.weight_pass = 0
            state.total_passes = 1
        else:
            state.total_passes = 1  # the count; the selection passes are added after it
        return state

    def reduce_passes(self, state: SceState) -> int:
        return state.total_passes

    def _deltas(self, base: np.ndarray, models: Sequence[np.ndarray], lo: int, hi: int,
                b: np.ndarray, deltas: list[np.ndarray], var: np.ndarray, tmp: np.ndarray) -> None:
        """dᵢ and their population variance over the models, for elements [lo, hi), fp32."""
        k = hi - lo
        np.copyto(b[:k], base[lo:hi], casting="unsafe")
        for d, m in zip(deltas, models):
            np.copyto(d[:k], m[lo:hi], casting="unsafe")
            np.subtract(d[:k], b[:k], out=d[:k])
        n = np.float32(len(models))
        mean = tmp[:k]
        np.copyto(mean, deltas[0][:k])
        for d in deltas[1:]:
            np.add(mean, d[:k], out=mean)
        np.divide(mean, n, out=mean)
        var[:k] = 0
        for d in deltas:
            np.subtract(d[:k], mean, out=b[:k])
            np.multiply(b[:k], b[:k], out=b[:k])
            np.add(var[:k], b[:k], out=var[:k])
        np.divide(var[:k], n, out=var[:k])

    def accumulate(self, state: SceState, pass_index: int, base: np.ndarray, models: Sequence[np.ndarray],
                   chunk: ChunkContext) -> None:
        n = len(models)
        b, var, tmp, *deltas = scratch("sce", n + 3, np.float32)
        (bits,) = scratch("sce-bits", 1, np.uint32)
        (high,) = scratch("sce-high", 1, np.intp)
        (keep,) = scratch("sce-keep", 1, np.bool_)
        nonzero = 0
        energy = np.zeros(n)
        with np.errstate(all="ignore"):
            for lo, hi in blocks(base.shape[0]):
                k = hi - lo
                self._deltas(base, models, lo, hi, b, deltas, var, tmp)
                if pass_index == state.weight_pass:
                    if state.selector is not None:
                        np.greater_equal(magnitude_bits(var[:k], bits[:k]), np.uint32(state.selector.threshold_bits),
                                         out=keep[:k])
                    for i, d in enumerate(deltas):
                        if state.selector is not None:
                            np.multiply(d[:k], keep[:k], out=d[:k])
                        np.multiply(d[:k], d[:k], out=tmp[:k])
                        energy[i] += float(np.sum(tmp[:k], dtype=np.float64))
                elif pass_index == 0:
                    nonzero += int(np.count_nonzero(var[:k]))
                else:
                    state.selector.add(pass_index - state.select_from, magnitude_bits(var[:k], bits[:k]), high[:k],
                                       keep[:k])
        with state.lock:
            if pass_index == state.weight_pass:
                state.parts[chunk.first] = energy
            elif pass_index == 0:
                state.nonzero += nonzero  # an integer: the same in any order

    def end_pass(self, state: SceState, pass_index: int) -> None:
        if pass_index == state.weight_pass:
            state.energy = sum(state.parts[first] for first in sorted(state.parts))  # in chunk order
            state.parts.clear()
            means = [float(e) / max(state.numel, 1) for e in state.energy]
            total = sum(means)
            state.weights = ([1.0 / len(means)] * len(means) if abs(total) < WEIGHT_FLOOR
                             else [m / total for m in means])
            return
        if pass_index == 0:  # the count: now the selection's size is known
            k = math.floor(state.nonzero * state.density)
            if k <= 0:
                state.keep_none = True
                state.weights = [1.0 / self.n_models] * self.n_models
                return
            state.selector = KthLargest(state.numel, k)
            state.select_from = 1
        else:
            state.selector.end_pass(pass_index - state.select_from)
        if state.selector.done:
            state.weight_pass = pass_index + 1
            state.total_passes = pass_index + 2
        else:
            state.total_passes = state.select_from + state.selector.passes

    def merge_chunk(self, backend: Any, base: Any, models: Sequence[Any], out: Any,
                    chunk: ChunkContext | None = None, state: SceState | None = None) -> None:
        if state is None:
            raise ValueError("sce needs the tensor's state (its selection and weights) from the engine")
        if state.keep_none:  # every task vector zeroed: the base
            np.copyto(out, base, casting="unsafe")
            return
        n = len(models)
        b, var, tmp, acc, total, *deltas = scratch("sce-merge", n + 5, np.float32)
        (work,) = scratch("sce-merge-work", 1, np.float32)
        (bits,) = scratch("sce-bits", 1, np.uint32)
        keep, positive, negative, agree, below = scratch("sce-masks", 5, np.bool_)
        with np.errstate(all="ignore"):
            for lo, hi in blocks(base.shape[0]):
                k = hi - lo
                self._deltas(base, models, lo, hi, work, deltas, var, tmp)
                np.copyto(b[:k], base[lo:hi], casting="unsafe")
                if state.selector is not None:
                    np.greater_equal(magnitude_bits(var[:k], bits[:k]), np.uint32(state.selector.threshold_bits),
                                     out=keep[:k])
                    for d in deltas:
                        np.multiply(d[:k], keep[:k], out=d[:k])
                np.copyto(tmp[:k], deltas[0][:k])
                for d in deltas[1:]:
                    np.add(tmp[:k], d[:k], out=tmp[:k])
                np.greater_equal(tmp[:k], np.float32(0), out=positive[:k])  # σ = +1
                np.logical_not(positive[:k], out=negative[:k])  # σ = −1
                acc[:k] = 0
                total[:k] = 0
                for d, w in zip(deltas, state.weights):
                    # sign(dᵢ) = σ (a zero never agrees)
                    np.greater(d[:k], np.float32(0), out=agree[:k])
                    np.logical_and(agree[:k], positive[:k], out=agree[:k])
                    np.less(d[:k], np.float32(0), out=below[:k])
                    np.logical_and(below[:k], negative[:k], out=below[:k])
                    np.logical_or(agree[:k], below[:k], out=agree[:k])
                    np.multiply(agree[:k], np.float32(w), out=var[:k])  # aᵢ·wᵢ
                    np.add(total[:k], var[:k], out=total[:k])
                    np.multiply(d[:k], var[:k], out=var[:k])
                    np.add(acc[:k], var[:k], out=acc[:k])
                np.maximum(total[:k], np.float32(WEIGHT_FLOOR), out=total[:k])
                np.divide(acc[:k], total[:k], out=acc[:k])
                np.add(acc[:k], b[:k], out=acc[:k])
                np.copyto(out[lo:hi], acc[:k], casting="unsafe")  # one rounding, to nearest even

    def recipe(self) -> dict[str, Any]:
        return {"method": self.name, "select_topk": self._topk.to_json()}
