"""Streaming exact selection of the k-th largest magnitude of a tensor seen in chunks.

TIES keeps, per task vector, the entries whose magnitude is at least the k-th largest one
(k = ⌊density·n⌋). Sorting or copying the tensor is what bounded memory rules out; instead the
threshold is found by two histogram passes over the bit patterns of the fp32 magnitudes,
which for non-negative floats order exactly like the values:

1. count the magnitudes by their top 15 bits (sign dropped): 32768 bins, then walk down from
   the largest bin to the one holding the k-th largest;
2. count, among the magnitudes in that bin only, their low 16 bits: 65536 bins, and walk down
   again to the exact bit pattern.

Memory is 96K counters per task vector, whatever the tensor's size. Every magnitude equal to
the threshold is kept, so ties at the threshold keep more than k entries. NaN magnitudes rank
above +Inf, so a NaN delta is kept and shows in the output.
"""

from __future__ import annotations

import threading

import numpy as np

HIGH_BINS = 1 << 15
LOW_BINS = 1 << 16
_MAGNITUDE = np.uint32(0x7FFFFFFF)
_SHIFT = np.uint32(16)
_LOW = np.uint32(0xFFFF)


class KthLargest:
    """The k-th largest of n non-negative fp32 bit patterns, streamed in two passes.

    Call ``add(pass_index, bits, ...)`` for every chunk of magnitude bits, then ``end_pass`` after
    each pass; ``threshold_bits`` is then the answer: keep ``bits >= threshold_bits``. With
    k = 0 nothing is kept (threshold above every pattern); with k ≥ n everything is.
    """

    passes = 2

    def __init__(self, n: int, k: int) -> None:
        self.n, self.k = n, k
        self.threshold_bits: int | None = None
        if k <= 0:
            self.threshold_bits = 1 << 31  # above every magnitude pattern: keep nothing
        elif k >= n:
            self.threshold_bits = 0  # keep everything
        # Allocated when counting starts: a merge prepares every tensor up front to validate it.
        self._high: np.ndarray | None = None
        self._low: np.ndarray | None = None
        self._lock = threading.Lock()
        self._bin = -1
        self._rank = 0  # rank of the answer inside the chosen high bin, 1 = largest

    @property
    def done(self) -> bool:
        return self.threshold_bits is not None

    def add(self, pass_index: int, bits: np.ndarray, high: np.ndarray, mask: np.ndarray) -> None:
        """Count one chunk of magnitude bit patterns (uint32, sign bit clear).

        ``high`` (intp) and ``mask`` (bool) are scratch of the same length. Safe to call from
        several threads at once: counting is local, folding in takes a lock.
        """
        if self.done:
            return
        # bincount wants intp; shifting straight into an intp buffer saves it a converting copy.
        np.right_shift(bits, _SHIFT, out=high, casting="unsafe")
        if pass_index == 0:
            counts = np.bincount(high, minlength=HIGH_BINS)
            with self._lock:
                if self._high is None:
                    self._high = np.zeros(HIGH_BINS, dtype=np.int64)
                self._high += counts
            return
        np.equal(high, self._bin, out=mask)
        low = np.bitwise_and(bits[mask], _LOW)
        if low.size:
            # Few entries fall in one high bin; counting the distinct values beats a
            # 64K-bin bincount per block.
            values, counts = np.unique(low, return_counts=True)
            with self._lock:
                if self._low is None:
                    self._low = np.zeros(LOW_BINS, dtype=np.int64)
                self._low[values] += counts

    def end_pass(self, pass_index: int) -> None:
        if self.done:
            return
        if pass_index == 0:
            high = self._high if self._high is not None else np.zeros(HIGH_BINS, dtype=np.int64)
            self._bin, self._rank = _walk_down(high, self.k)
            self._high = None
        else:
            low_counts = self._low if self._low is not None else np.zeros(LOW_BINS, dtype=np.int64)
            low, _ = _walk_down(low_counts, self._rank)
            self.threshold_bits = (self._bin << 16) | low
            self._low = None


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
