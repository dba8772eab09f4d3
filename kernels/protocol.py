"""The interface every compute backend implements."""

from __future__ import annotations

from typing import Any, Protocol, Sequence


class Backend(Protocol):
    """Elementwise merge arithmetic on chunks of flat tensors.

    Arrays are 1-D and of equal length; inputs may each be bf16, fp16, fp32 (or fp64) and are
    read once in their stored dtype. Arithmetic is fp32 (fp64 when any operand is fp64) and
    the result is rounded once, to nearest even, into ``out``'s dtype. NaN and Inf propagate.
    """

    name: str
    # What it runs besides ``weighted_delta_sum``, which every backend has: ``dare_linear``,
    # DARE's drop, rescale and sum fused into one pass. A method asks this, never probes;
    # where the backend lacks an operation the method runs its own numpy code.
    fuses_dare: bool

    def weighted_delta_sum(
        self, base: Any, models: Sequence[Any], weights: Sequence[float], out: Any
    ) -> None:
        """``out = base + Σ weights[i] · (models[i] − base)``.

        With one model this is linear interpolation, ``(1 − λ)·base + λ·model``.
        """
        ...

    def dare_linear(self, base: Any, models: Sequence[Any], out: Any, *, factors: Sequence[float],
                    keys: Sequence[int], limits: Sequence[int], first: int, scale: float) -> None:
        """Where ``fuses_dare``: ``out = base + scale·Σ factors[i]·keepᵢ·(models[i] − base)`` over
        elements [first, first + len(out)), keepᵢ being DARE's mask (safeblend.methods._rng)."""
        ...
