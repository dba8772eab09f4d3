"""Streaming exact selection of the k-th largest magnitude of a tensor seen in chunks.

TIES keeps, per task vector, the entries whose magnitude is at least the k-th largest one
(k = ⌊density·n⌋). Sorting or copying the tensor is what bounded memory rules out; instead the
threshold is found from histograms of the bit patterns of the fp32 magnitudes, which for
non-negative floats order exactly like the values:

1. **sample** (pass 0): count a sample of the magnitudes (a run of ``SAMPLE_RUN`` elements at
   the start of every ``SAMPLE_RUN·SAMPLE_EVERY``, i.e. 1/64 of them, spread through the
   tensor while touching only 1/64 of its pages; all of a tensor up to ``SMALL`` elements) by
   their top 15 bits, and take the range of bit patterns where the sample's k-th largest lies,
   widened by a margin;
2. **count in range** (pass 1): over every magnitude, count exactly how many lie above the
   range and histogram those inside it (by full bit pattern, or in coarser bins when the
   range is wider than ``RANGE_CAP`` patterns). If the k-th largest falls inside — it does
   unless the sample misled — walk down to it; with coarse bins, pass 2 counts the low bits
   of the magnitudes in the bin that holds it.

If the sample misled, passes 2 and 3 redo the selection without it (all magnitudes by their
top 15 bits, then the chosen bin's by their low 16 bits), so the answer is exact whatever the
sample. The sampled pass costs ~1/64 of a full histogram pass, whose bincount was a quarter of
TIES's time. Memory is at most ``RANGE_CAP`` counters per task vector, whatever the tensor's
size. Every magnitude equal to the threshold is kept, so ties at the threshold keep more than
k entries. NaN magnitudes rank above +Inf, so a NaN delta is kept.
"""

from __future__ import annotations

import math
import threading

import numpy as np

HIGH_BINS = 1 << 15
LOW_BINS = 1 << 16
SAMPLE_EVERY = 64
SAMPLE_RUN = 4096
# Tensors up to this size are "sampled" whole: the first pass is then exact.
SMALL = 1 << 20
# Largest range of bit patterns counted exactly in pass 1: 16 of the 32768 top-bit bins (8 MiB
# of int64 counters per task vector while the tensor is reduced).
RANGE_CAP = 1 << 20
# Pass 1 counts a block's in-range magnitudes by their distinct values, not a full-range
# bincount, when they number fewer than 1/SPARSE_FOLD of the range's bins.
SPARSE_FOLD = 16
_MAGNITUDE = np.uint32(0x7FFFFFFF)
_SHIFT = np.uint32(16)
_LOW = np.uint32(0xFFFF)


class KthLargest:
    """The k-th largest of n non-negative fp32 bit patterns, streamed in 2–3 passes (4 at worst).

    For each pass p while ``p < passes``: call ``add(p, bits, ...)`` for every chunk — in
    pass 0 with the bits of the chunk's ``sample_ranges(len(chunk))`` only —
    then ``end_pass(p)``; ``passes`` may grow at an ``end_pass``. ``threshold_bits`` is then the
    answer: keep ``bits >= threshold_bits``. With k = 0 nothing is kept (threshold above every
    pattern); with k ≥ n everything is.
    """

    def __init__(self, n: int, k: int) -> None:
        self.n, self.k = n, k
        self.passes = 2
        self.threshold_bits: int | None = None
        if k <= 0:
            self.threshold_bits = 1 << 31  # above every magnitude pattern: keep nothing
        elif k >= n:
            self.threshold_bits = 0  # keep everything
        # Allocated when counting starts: a merge prepares every tensor up front to validate it.
        self._hist: np.ndarray | None = None
        self._lock = threading.Lock()
        self._lo = self._hi = 0  # pass 1's range of bit patterns [lo, hi)
        self._shift = 0  # pass 1 counts the range in bins of 2**shift patterns
        self._above = 0  # pass 1: magnitudes at or above hi
        self._classic = False  # passes 2 and 3 redo the selection without the sample
        self._bin = -1  # classic passes: the high bin holding the answer
        self._rank = 0  # its rank inside that bin, 1 = largest

    @property
    def done(self) -> bool:
        return self.threshold_bits is not None

    def sample_ranges(self, count: int) -> list[tuple[int, int]]:
        """The element ranges of a ``count``-element chunk that pass 0 wants (chunks are cut
        at multiples of SAMPLE_RUN·SAMPLE_EVERY in practice, so the sample is the same for
        any chunk size; exactness never depends on it)."""
        if self.n <= SMALL:
            return [(0, count)]
        return [(lo, min(lo + SAMPLE_RUN, count)) for lo in range(0, count, SAMPLE_RUN * SAMPLE_EVERY)]

    def add(self, pass_index: int, bits: np.ndarray, high: np.ndarray, mask: np.ndarray) -> None:
        """Count one chunk of magnitude bit patterns (uint32, sign bit clear; modified here).

        ``high`` (intp) and ``mask`` (bool) are scratch of the same length. Safe to call from
        several threads at once: counting is local, folding in takes a lock.
        """
        if self.done:
            return
        if pass_index == 0 or (pass_index == 2 and self._classic):  # top 15 bits
            # bincount wants intp; shifting straight into an intp buffer saves it a converting copy.
            np.right_shift(bits, _SHIFT, out=high, casting="unsafe")
            self._fold(np.bincount(high, minlength=HIGH_BINS), HIGH_BINS)
        elif pass_index == 1:  # exact counts above and inside [lo, hi)
            above = int(np.count_nonzero(np.greater_equal(bits, np.uint32(self._hi), out=mask)))
            np.subtract(bits, np.uint32(self._lo), out=bits)  # wraps below lo: out of range
            inside = bits[np.less(bits, np.uint32(self._hi - self._lo), out=mask)] >> np.uint32(self._shift)
            with self._lock:
                self._above += above
            if inside.size:
                size = (self._hi - self._lo) >> self._shift
                if inside.size * SPARSE_FOLD < size:
                    # Few of the block's magnitudes lie in a range of up to RANGE_CAP bins:
                    # counting the distinct values beats allocating and folding a whole
                    # histogram per block (measured: arcee-fusion's passes, ~3K of 128K inside
                    # 400K–850K bins: 81 -> 38 ns per element for the whole method).
                    values, counts = np.unique(inside, return_counts=True)
                    with self._lock:
                        if self._hist is None:
                            self._hist = np.zeros(size, dtype=np.int64)
                        self._hist[values] += counts
                else:
                    self._fold(np.bincount(inside, minlength=size), size)
        else:  # the low bits of the magnitudes in the chosen bin: (bits >> shift) == bin
            shift = _SHIFT if self._classic else np.uint32(self._shift)
            np.right_shift(bits, shift, out=high, casting="unsafe")
            np.equal(high, self._bin, out=mask)
            low = np.bitwise_and(bits[mask], (1 << int(shift)) - 1)
            if low.size:
                # Few entries fall in one high bin; counting the distinct values beats a
                # 64K-bin bincount per block.
                values, counts = np.unique(low, return_counts=True)
                with self._lock:
                    if self._hist is None:
                        self._hist = np.zeros(1 << int(shift), dtype=np.int64)
                    self._hist[values] += counts

    def _fold(self, counts: np.ndarray, size: int) -> None:
        with self._lock:
            if self._hist is None:
                self._hist = np.zeros(size, dtype=np.int64)
            self._hist += counts

    def end_pass(self, pass_index: int) -> None:
        if self.done:
            return
        hist = self._hist
        self._hist = None
        if pass_index == 0:
            self._choose_range(hist if hist is not None else np.zeros(HIGH_BINS, dtype=np.int64))
        elif pass_index == 1:
            size = (self._hi - self._lo) >> self._shift
            inside = hist if hist is not None else np.zeros(size, dtype=np.int64)
            if not self._above < self.k <= self._above + int(inside.sum()):
                self._classic, self.passes = True, 4  # the sample misled us: count everything
                return
            index, rank = _walk_down(inside, self.k - self._above)
            if self._shift == 0:
                self.threshold_bits = self._lo + index
            else:  # one more pass resolves the low bits inside that bin
                self._bin, self._rank, self.passes = (self._lo >> self._shift) + index, rank, 3
        elif pass_index == 2 and self._classic:
            self._bin, self._rank = _walk_down(hist if hist is not None else np.zeros(HIGH_BINS, np.int64), self.k)
        else:
            shift = 16 if self._classic else self._shift
            low, _ = _walk_down(hist if hist is not None else np.zeros(1 << shift, np.int64), self._rank)
            self.threshold_bits = (self._bin << shift) | low

    def _choose_range(self, sample: np.ndarray) -> None:
        """Pass 1's range: the high bins where the sample's k-th largest lies, ± a margin."""
        m = int(sample.sum())
        if m == 0:
            self.passes = 4
            return
        exact = m == self.n
        k_s = self.k * m / self.n
        # Sampling error on a rank near k_s is ~√k_s; contiguous samples are correlated, hence
        # the generous factor. A wider range costs a bigger pass-1 histogram; one wider than
        # RANGE_CAP (a tail so sparse the sample says little) falls back to the classic passes.
        margin = 0.0 if exact else 6.0 * math.sqrt(k_s) + 32
        above = np.cumsum(sample[::-1])  # above[i]: samples in the top i + 1 bins
        # Unsampled magnitudes may lie beyond the sample's extremes: a margin reaching past
        # either end of the sample opens the range to the end of the bit patterns.
        top_bins = int(np.searchsorted(above, k_s - margin, side="right")) if k_s > margin else 0
        if exact:
            top_bins = int(np.searchsorted(above, self.k, side="left"))
        bottom = int(np.searchsorted(above, k_s + margin, side="left")) if k_s + margin < m else HIGH_BINS - 1
        hi_bin = HIGH_BINS - top_bins  # exclusive
        lo_bin = HIGH_BINS - 1 - bottom
        if exact:
            lo_bin = hi_bin - 1
        self._lo, self._hi = lo_bin << 16, hi_bin << 16
        # A range wider than RANGE_CAP patterns is counted in coarser bins; a third pass then
        # resolves the low bits inside the one that holds the answer.
        while (self._hi - self._lo) >> self._shift > RANGE_CAP:
            self._shift += 1


def _walk_down(histogram: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry and that entry's rank inside the bin."""
    above = np.cumsum(histogram[::-1])  # above[i]: entries in the top i + 1 bins
    top = int(np.searchsorted(above, k))  # first prefix that reaches k
    bin_index = histogram.shape[0] - 1 - top
    before = int(above[top - 1]) if top > 0 else 0
    return bin_index, k - before


def magnitude_bits(delta: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The fp32 bit pattern of |delta| (sign bit cleared) into ``out`` (uint32)."""
    np.bitwise_and(delta.view(np.uint32), _MAGNITUDE, out=out)
    return out
