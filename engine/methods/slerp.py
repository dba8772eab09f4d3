"""Spherical linear interpolation (SLERP) between the base and one fine-tuned model.

Each tensor is treated as one flattened vector; with a = θ_base, b = θ_ft and t = λ:

    cos Ω = ⟨a, b⟩ / (‖a‖·‖b‖)
    θ     = sin((1 − t)·Ω)/sin Ω · a  +  sin(t·Ω)/sin Ω · b

so t = 0 gives the base and t = 1 the fine-tune. When the tensors are nearly colinear
(|cos Ω| > 0.9995) the formula is ill-conditioned and the result is the linear interpolation
(1 − t)·a + t·b instead.

A tensor whose norm is ≤ 1e-8 is not normalised (mergekit's rule, kept so that recipes give
mergekit's model): cos Ω is then ⟨a, b⟩ divided only by the norms above 1e-8. An all-zero
tensor therefore counts as orthogonal to the other one (Ω = π/2), and the result is
cos(t·π/2)·a + sin(t·π/2)·b: for a zero base, sin(t·π/2)·θ_ft, not t·θ_ft. The norms and the dot product are gathered
by one reduce pass over the chunks in float64; the angle is per tensor. ``weight`` (t) may
vary by tensor. The linear fallback runs on the backend (``weighted_delta_sum``); the
spherical case is numpy (CPU) for now.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import register
from ._blocks import BLOCK, blocks, dot, scratch
from .base import ChunkContext, MergeMethod, TensorContext
from .params import per_model, resolve_float

COLINEAR_COS = 0.9995
TINY_NORM = 1e-8  # norms at or below this are not divided out (mergekit's eps)


@dataclass
class SlerpState:
    t: float
    aa: float = 0.0  # ‖a‖²
    bb: float = 0.0  # ‖b‖²
    ab: float = 0.0  # ⟨a, b⟩
    linear: bool = True
    coefficients: tuple[float, float] = (1.0, 0.0)
    parts: dict[int, tuple[float, float, float]] = field(default_factory=dict)  # per chunk
    lock: threading.Lock = field(default_factory=threading.Lock)


@register
class Slerp(MergeMethod):
    name = "slerp"
    max_models = 1

    def __init__(self, n_models: int, weight: Any = None) -> None:
        super().__init__(n_models)
        self._t = per_model(0.5 if weight is None else weight, n_models, "weight (t)")[0]

    def prepare(self, tensor: TensorContext) -> SlerpState:
        return SlerpState(t=resolve_float(self._t, tensor.name, tensor.position, f"{self.name}: weight (t)"))

    def reduce_passes(self, state: SlerpState) -> int:
        return 1

    def accumulate(self, state: SlerpState, pass_index: int, base: np.ndarray, models: Sequence[np.ndarray],
                   chunk: ChunkContext) -> None:
        a64, b64, tmp = scratch("slerp-reduce", 3, np.float64)
        aa = bb = ab = 0.0
        for lo, hi in blocks(base.shape[0]):
            k = hi - lo
            a, b = a64[:k], b64[:k]
            np.copyto(a, base[lo:hi], casting="unsafe")
            np.copyto(b, models[0][lo:hi], casting="unsafe")
            aa += dot(a, a, tmp[:k])
            bb += dot(b, b, tmp[:k])
            ab += dot(a, b, tmp[:k])
        with state.lock:
            state.parts[chunk.first] = (aa, bb, ab)

    def end_pass(self, state: SlerpState, pass_index: int) -> None:
        # Summed in chunk order, so the result does not depend on thread timing.
        for first in sorted(state.parts):
            aa, bb, ab = state.parts[first]
            state.aa, state.bb, state.ab = state.aa + aa, state.bb + bb, state.ab + ab
        state.parts.clear()
        state.linear, state.coefficients = slerp_coefficients(state.t, state.aa, state.bb, state.ab)

    def merge_chunk(self, backend: Any, base: Any, models: Sequence[Any], out: Any,
                    chunk: ChunkContext | None = None, state: SlerpState | None = None) -> None:
        if state is None:
            raise ValueError("slerp needs the tensor's state (its norms) from the engine")
        if state.linear:
            backend.weighted_delta_sum(base, models, [state.t], out)
            return
        c0, c1 = (np.float32(c) for c in state.coefficients)
        acc, other = scratch("slerp-map", 2, np.float32)
        with np.errstate(all="ignore"):
            for lo, hi in blocks(base.shape[0], BLOCK):
                x, y = acc[: hi - lo], other[: hi - lo]
                np.copyto(x, base[lo:hi], casting="unsafe")
                np.copyto(y, models[0][lo:hi], casting="unsafe")
                np.multiply(x, c0, out=x)
                np.multiply(y, c1, out=y)
                np.add(x, y, out=x)
                np.copyto(out[lo:hi], x, casting="unsafe")  # one rounding, to nearest even

    def recipe(self) -> dict[str, Any]:
        return {"method": self.name, "t": self._t.to_json()}


def slerp_coefficients(t: float, aa: float, bb: float, ab: float) -> tuple[bool, tuple[float, float]]:
    """``(linear, (c0, c1))``: θ = c0·a + c1·b, or linear interpolation when ``linear``."""
    norm_a, norm_b = math.sqrt(aa), math.sqrt(bb)
    cos = ab / ((norm_a if norm_a > TINY_NORM else 1.0) * (norm_b if norm_b > TINY_NORM else 1.0))
    cos = max(-1.0, min(1.0, cos))
    if abs(cos) > COLINEAR_COS:
        return True, (1.0 - t, t)
    omega = math.acos(cos)
    sin_omega = math.sin(omega)
    return False, (math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega)
