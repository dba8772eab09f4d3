"""DARE's drop mask from a counter-based generator: a pure function of its key and index.

Whether element j of model i's task vector in tensor ``name`` survives depends only on
(seed, name, i, j), never on chunking, thread or device, so the mask is identical for any
chunk size, any processing order, on the CPU and the GPU. All arithmetic is modulo 2⁶⁴:

    mix(z)     = splitmix64's finaliser: z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
                 z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31
    γ          = 0x9E3779B97F4A7C15
    key        = mix(mix(mix(seed + γ) ^ fnv1a64(utf8(name))) + (i + 1)·γ)
    u_j        = mix(key + (j + 1)·γ)
    keep_j     = u_j < ⌊p·2⁵³⌋·2¹¹            (p = density: P(keep) = p to within 2⁻⁵³)

Per element this is splitmix64 (Steele et al., 2014) with the stream's key as its state
offset; a Triton kernel reproduces it with uint64 ops.
"""

from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_FNV_OFFSET, _FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3
DEFAULT_SEED = 0


def mix64(z: int) -> int:
    """splitmix64's finaliser on a Python int (mod 2⁶⁴)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * _M1) & MASK64
    z = ((z ^ (z >> 27)) * _M2) & MASK64
    return z ^ (z >> 31)


def fnv1a64(data: bytes) -> int:
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & MASK64
    return h


def stream_key(seed: int, name: str, model_index: int) -> int:
    """The 64-bit key of model ``model_index``'s mask in tensor ``name``."""
    k = mix64(mix64(seed + GAMMA) ^ fnv1a64(name.encode("utf-8")))
    return mix64(k + (model_index + 1) * GAMMA)


def keep_limit(density: float) -> int:
    """keep ⇔ u < keep_limit(p); 2⁶⁴ (keep all) for p ≥ 1, 0 for p ≤ 0."""
    if density >= 1.0:
        return 1 << 64
    if density <= 0.0:
        return 0
    return int(density * (1 << 53)) << 11


class MaskGenerator:
    """Writes keep masks for index ranges of one stream into caller-owned buffers."""

    def __init__(self, block: int) -> None:
        # (j + 1)·γ for j < block, so a block's counters are one add away.
        self._steps = (np.arange(1, block + 1, dtype=np.uint64) * np.uint64(GAMMA))
        self._z = np.empty(block, dtype=np.uint64)
        self._t = np.empty(block, dtype=np.uint64)

    def keep(self, key: int, first: int, limit: int, out: np.ndarray) -> np.ndarray:
        """``out[j] = u_{first + j} < limit`` for j < len(out) (bool)."""
        k = out.shape[0]
        if limit >= 1 << 64:
            out[:] = True
            return out
        if limit <= 0:
            out[:] = False
            return out
        return np.less(self.counters(key, first, k), np.uint64(limit), out=out)

    def counters(self, key: int, first: int, count: int) -> np.ndarray:
        """u_j for j in [first, first + count) (uint64; a view of this generator's buffer, valid
        until its next call). Methods with a probability per element (della) compare it with
        their own limits ⌊p·2⁵³⌋·2¹¹."""
        k = count
        z, t = self._z[:k], self._t[:k]
        with np.errstate(over="ignore"):
            np.add(self._steps[:k], np.uint64((key + first * GAMMA) & MASK64), out=z)
            np.right_shift(z, np.uint64(30), out=t)
            np.bitwise_xor(z, t, out=z)
            np.multiply(z, np.uint64(_M1), out=z)
            np.right_shift(z, np.uint64(27), out=t)
            np.bitwise_xor(z, t, out=z)
            np.multiply(z, np.uint64(_M2), out=z)
            np.right_shift(z, np.uint64(31), out=t)
            np.bitwise_xor(z, t, out=z)
        return z
