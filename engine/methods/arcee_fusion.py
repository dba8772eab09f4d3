"""Arcee Fusion (mergekit's ``arcee_fusion``): take the fine-tune's value only where it matters,
by a per-row divergence times the change, above a threshold set by the tensor's own spread.

For a = θ_base and b = θ_ft (one fine-tuned model), rows being the last dimension (a vector
is one row):

    KL_r  = Σ_j p_j·log(p_j / q_j) over row r,  p = softmax(b_r) + 1e-8,  q = softmax(a_r) + 1e-8
    s_j   = |b_j − a_j| · KL_{row of j}                                    (importance)
    Q(x)  = the ⌊x·(n − 1)⌋-th smallest s (0-based), for x = 1/4, 1/2, 3/4
    τ     = Q(1/2) + 1.5·(Q(3/4) − Q(1/4))
    θ_j   = b_j where s_j ≥ τ, a_j elsewhere

Streaming: one pass gathers each row's softmax normalisers (running max and sum of
exponentials, float64, rows cut by chunks combined), one pass each row's KL, then the exact
streaming selection (``safeblend.methods._select``) finds the three order statistics of the
fp32 importances; memory is a few float64 values per row. mergekit estimates the quantiles
from a random sample of 10⁶ entries in tensors larger than that; safeblend's are exact.
KL is clamped at 0 (it is ≥ 0; rounding can give −10⁻¹⁷).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import register
from ._blocks import blocks, scratch
from ._select import SMALL, KthLargest, magnitude_bits
from .base import ChunkContext, MergeMethod, TensorContext

EPS = 1e-8
QUANTILES = (0.25, 0.5, 0.75)
_FIRST = np.zeros(1, dtype=np.intp)  # one segment from the start, for np.add.reduceat


@dataclass
class FusionState:
    numel: int
    row_length: int
    rows: int
    stats: np.ndarray = field(init=False)  # per row: max_b, sum_b, max_a, sum_a
    kl: np.ndarray = field(init=False)
    kl_done: np.ndarray = field(init=False)  # per row: KL found in pass 0 (the row was whole in a block)
    ranks: list[int] = field(default_factory=list)  # per quantile: its rank from the top (n: the minimum)
    selectors: list[KthLargest] = field(default_factory=list)
    minimum: float = math.inf
    threshold: float = math.inf
    parts: dict[int, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.stats = np.zeros((4, self.rows))
        self.stats[0] = self.stats[2] = -np.inf
        self.kl = np.zeros(self.rows)
        self.kl_done = np.zeros(self.rows, dtype=bool)
        n = self.numel
        # ascending index ⌊x·(n − 1)⌋ is the (n − index)-th largest; the n-th largest (the
        # minimum, in tensors of ≤ 4 elements) is tracked directly: KthLargest answers k ≥ n with
        # "keep everything", not a value
        self.ranks = [n - math.floor(x * (n - 1)) for x in QUANTILES]
        self.selectors = [KthLargest(n, k) for k in self.ranks if k < n]


def _pass_buffers() -> tuple[np.ndarray, ...]:
    """This thread's scratch for the reduce passes: float64 a, b, t; row indices; fp32
    differences and importances; their bits, high parts and a mask (``_blocks.scratch``)."""
    a, b, t = scratch("fusion", 3, np.float64)
    (rows,) = scratch("fusion-rows", 1, np.intp)
    d32, s32 = scratch("fusion32", 2, np.float32)
    (bits,) = scratch("fusion-bits", 1, np.uint32)
    (high,) = scratch("fusion-high", 1, np.intp)
    (mask,) = scratch("fusion-mask", 1, np.bool_)
    return a, b, t, rows, d32, s32, bits, high, mask


def _segments(first: int, count: int, row_length: int) -> tuple[int, np.ndarray]:
    """The first row a range touches and the offsets where each of its rows starts in it."""
    offset = (-first) % row_length
    starts = np.arange(offset, count, row_length)
    if offset != 0 or starts.size == 0:
        starts = np.concatenate(([0], starts))
    return first // row_length, starts


@register
class ArceeFusion(MergeMethod):
    name = "arcee-fusion"
    max_models = 1

    def __init__(self, n_models: int) -> None:
        super().__init__(n_models)

    def prepare(self, tensor: TensorContext) -> FusionState:
        length = tensor.row_length if len(tensor.shape) >= 1 else max(tensor.numel, 1)
        return FusionState(tensor.numel, length, max(1, -(-tensor.numel // length)))

    def reduce_passes(self, state: FusionState) -> int:
        pending = [s.passes for s in state.selectors if not s.done]
        return 2 + max([1, *pending])  # at least one selection pass: it also finds the minimum

    def _rows(self, first: int, count: int, state: FusionState, out: np.ndarray) -> np.ndarray:
        return np.floor_divide(np.arange(first, first + count), state.row_length, out=out[:count])

    def accumulate(self, state: FusionState, pass_index: int, base: np.ndarray, models: Sequence[np.ndarray],
                   chunk: ChunkContext) -> None:
        a, b, t, rows, d32, s32, bits, high, mask = _pass_buffers()
        part: list[tuple[int, Any]] = []
        if pass_index == 2 and state.numel > SMALL:  # the selectors' first pass looks at a sample only
            self._accumulate_sample(state, base, models[0], chunk)
            return
        with np.errstate(all="ignore"):
            for lo, hi in blocks(base.shape[0]):
                k = hi - lo
                first = chunk.first + lo
                row0, starts = _segments(first, k, state.row_length)
                if pass_index == 1:  # rows cut by a block: their KL, from the whole rows' normalisers
                    pending = [(j, starts[j], starts[j + 1] if j + 1 < starts.size else k) for j in range(starts.size)
                               if not state.kl_done[row0 + j]]
                    for j, s, e in pending:
                        np.copyto(a[s:e], base[lo + s : lo + e], casting="unsafe")
                        np.copyto(b[s:e], models[0][lo + s : lo + e], casting="unsafe")
                        for x, m in ((b, 0), (a, 2)):  # x ← softmax + ε, in place
                            np.subtract(x[s:e], state.stats[m][row0 + j], out=x[s:e])
                            np.exp(x[s:e], out=x[s:e])
                            np.divide(x[s:e], state.stats[m + 1][row0 + j], out=x[s:e])
                            np.add(x[s:e], EPS, out=x[s:e])
                        part.append((row0 + j, float(_kl(a[s:e], b[s:e], t[s:e], _FIRST)[0])))
                    continue
                np.copyto(a[:k], base[lo:hi], casting="unsafe")
                np.copyto(b[:k], models[0][lo:hi], casting="unsafe")
                if pass_index == 0:
                    values, whole, kl = _row_statistics(a[:k], b[:k], t[:k], first, starts, state.row_length)
                    part.append((row0, values, whole, kl))
                else:  # the selection passes, over every importance
                    self._importance(state, a[:k], b[:k], first, d32[:k], s32[:k], rows)
                    if pass_index == 2:
                        lowest = float(s32[:k].min()) if k else math.inf
                        with state.lock:  # a minimum is the same in any order
                            state.minimum = min(state.minimum, lowest)
                    for selector in state.selectors:
                        selector.add(pass_index - 2, magnitude_bits(s32[:k], bits[:k]), high[:k], mask[:k])
        if pass_index < 2:
            with state.lock:
                state.parts[chunk.first] = part

    def _accumulate_sample(self, state: FusionState, base: np.ndarray, model: np.ndarray,
                           chunk: ChunkContext) -> None:
        """The selectors' first pass: the importances of the sampled ranges only, gathered into
        one buffer so each selector counts them in one call (the minimum is only needed in
        tensors of at most 4 elements, which are counted whole)."""
        a, b, _, rows, d32, s32, bits, high, mask = _pass_buffers()
        size = bits.shape[0]
        pieces = [(lo + at, min(hi, lo + at + size)) for lo, hi in state.selectors[0].sample_ranges(base.shape[0])
                  for at in range(0, hi - lo, size)]
        filled = 0
        with np.errstate(all="ignore"):
            for lo, hi in pieces:
                k = hi - lo
                if filled + k > size:
                    for selector in state.selectors:  # pass 0's add() leaves the bits as they are
                        selector.add(0, bits[:filled], high[:filled], mask[:filled])
                    filled = 0
                np.copyto(a[:k], base[lo:hi], casting="unsafe")
                np.copyto(b[:k], model[lo:hi], casting="unsafe")
                self._importance(state, a[:k], b[:k], chunk.first + lo, d32[:k], s32[:k], rows)
                magnitude_bits(s32[:k], bits[filled : filled + k])
                filled += k
            if filled:
                for selector in state.selectors:
                    selector.add(0, bits[:filled], high[:filled], mask[:filled])

    def _importance(self, state: FusionState, a: np.ndarray, b: np.ndarray, first: int, d32: np.ndarray,
                    s32: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """s = |b − a|·KL_row in fp32 into ``s32`` (``a``, ``b`` float64 copies of the inputs)."""
        k = a.shape[0]
        np.subtract(b, a, out=a)
        np.copyto(d32, a, casting="unsafe")  # fp32 arithmetic, like the merge
        np.abs(d32, out=d32)
        r = self._rows(first, k, state, rows)
        np.copyto(s32, state.kl[r], casting="unsafe")
        np.multiply(d32, s32, out=s32)
        return s32

    def end_pass(self, state: FusionState, pass_index: int) -> None:
        parts = [p for first in sorted(state.parts) for p in state.parts[first]]  # in chunk order
        state.parts.clear()
        if pass_index == 0:
            for row0, values, whole, kl in parts:
                rows = slice(row0, row0 + values.shape[1])
                for j in (0, 2):
                    old_max, old_sum = state.stats[j][rows], state.stats[j + 1][rows]
                    new_max = np.maximum(old_max, values[j])
                    with np.errstate(invalid="ignore"):
                        state.stats[j + 1][rows] = (np.where(old_sum > 0, old_sum * np.exp(old_max - new_max), 0.0)
                                                    + values[j + 1] * np.exp(values[j] - new_max))
                    state.stats[j][rows] = new_max
                state.kl[rows][whole] = kl[whole]
                state.kl_done[rows] |= whole
        elif pass_index == 1:
            for row, value in parts:
                state.kl[row] += value
            np.maximum(state.kl, 0.0, out=state.kl)
        else:
            for selector in state.selectors:
                selector.end_pass(pass_index - 2)
            if all(s.done for s in state.selectors):
                found = iter(state.selectors)
                q1, median, q3 = (float(np.uint32(next(found).threshold_bits).view(np.float32)) if k < state.numel
                                  else state.minimum for k in state.ranks)
                state.threshold = median + 1.5 * (q3 - q1)

    def merge_chunk(self, backend: Any, base: Any, models: Sequence[Any], out: Any,
                    chunk: ChunkContext | None = None, state: FusionState | None = None) -> None:
        if state is None or chunk is None:
            raise ValueError("arcee-fusion needs the tensor's state (its threshold) from the engine")
        a, b = scratch("fusion", 2, np.float64)
        (rows,) = scratch("fusion-rows", 1, np.intp)
        d32, s32, acc = scratch("fusion32-merge", 3, np.float32)
        (mask,) = scratch("fusion-mask", 1, np.bool_)
        with np.errstate(all="ignore"):
            for lo, hi in blocks(base.shape[0]):
                k = hi - lo
                np.copyto(a[:k], base[lo:hi], casting="unsafe")
                np.copyto(b[:k], models[0][lo:hi], casting="unsafe")
                self._importance(state, a[:k], b[:k], chunk.first + lo, d32[:k], s32[:k], rows)
                np.greater_equal(s32[:k], state.threshold, out=mask[:k])
                np.copyto(acc[:k], base[lo:hi], casting="unsafe")
                np.copyto(acc[:k], models[0][lo:hi], casting="unsafe", where=mask[:k])
                np.copyto(out[lo:hi], acc[:k], casting="unsafe")

    def recipe(self) -> dict[str, Any]:
        return {"method": self.name}


def _row_statistics(a: np.ndarray, b: np.ndarray, t: np.ndarray, first: int, starts: np.ndarray,
                    row_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pass 0 over one block (``a``, ``b`` float64 copies, ``t`` scratch; all three consumed).

    Per segment (a row's part in the block, from ``starts``): max and Σ exp(x − max) of b, then
    of a; and for the segments that are whole rows, the row's KL at once, with the same
    operations pass 1 applies to the rest (the normalisers of a whole row pass through
    ``end_pass`` unchanged, ×exp(max − max)), so a row's KL does not depend on which pass
    found it. Returns (values[4, segments], whole[segments], kl[segments])."""
    k = a.shape[0]
    lengths = np.diff(np.append(starts, k))
    values = np.empty((4, starts.size))
    for j, x in ((0, b), (2, a)):
        values[j] = np.maximum.reduceat(x, starts)
        np.subtract(x, np.repeat(values[j], lengths), out=t)
        np.exp(t, out=t)
        values[j + 1] = np.add.reduceat(t, starts)
        # x ← softmax + ε for the whole rows (partial segments get values never used)
        with np.errstate(invalid="ignore"):
            total = values[j + 1] * np.exp(values[j] - values[j])
        np.divide(t, np.repeat(total, lengths), out=x)
        np.add(x, EPS, out=x)
    whole = (lengths == row_length) & ((first + starts) % row_length == 0)
    kl = _kl(a, b, t, starts) if whole.any() else np.zeros(starts.size)
    return values, whole, kl


def _kl(q: np.ndarray, p: np.ndarray, t: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Σ p·log(p/q) per segment from ``starts`` (``t`` scratch); one float64 per segment."""
    np.divide(p, q, out=t)
    np.log(t, out=t)
    np.multiply(t, p, out=t)
    return np.add.reduceat(t, starts)
