"""NuSLERP (mergekit's nuslerp): SLERP between two tensors, over the whole tensor, per row or
per column, optionally of task vectors.

Operands: with a base, v₀ = θ₁ − θ_base and v₁ = θ₂ − θ_base (two fine-tuned models); without
one (``base_weight`` given), v₀ = the first model (passed as the base) and v₁ = the second.
Their weights w₀, w₁ give t = w₁/(w₀ + w₁) (0.5 when |w₀ + w₁| < 1e-6). The vectors
interpolated are the whole flattened tensor (``flatten``, the default), each row (the last
dimension), or with ``row_wise`` each vector along the first dimension (a column of a matrix).
For each vector:

    cos Ω = ⟨v₀, v₁⟩ / (max(‖v₀‖, 1e-7)·max(‖v₁‖, 1e-7)), clipped to [−1, 1]
    θ = sin((1 − t)Ω)/sin Ω · v₀ + sin(tΩ)/sin Ω · v₁       ((1 − t)·v₀ + t·v₁ where |sin Ω| < 1e-8)

plus θ_base with a base. The norms and dot products per vector (three float64 values per row
or column, never the tensor) come from one reduce pass over the chunks; the combination is
numpy in cache-sized blocks, fp32, one rounding.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import SpecError
from . import register
from ._blocks import blocks, dot, scratch
from .base import ChunkContext, MergeMethod, TensorContext
from .params import per_model, resolve_bool, resolve_float, setting

NORM_FLOOR = 1e-7
COLINEAR_SIN = 1e-8


@dataclass
class NuSlerpState:
    t: float
    groups: int  # vectors in the tensor
    kind: str  # "whole", "rows" (index // size) or "columns" (index % size)
    size: int
    sums: np.ndarray = field(init=False)  # per vector: ‖v₀‖², ‖v₁‖², ⟨v₀, v₁⟩
    c0: np.ndarray | None = None
    c1: np.ndarray | None = None
    parts: dict[int, np.ndarray] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.sums = np.zeros((3, self.groups))

    def group_of(self, first: int, count: int, out: np.ndarray) -> np.ndarray:
        """The vector each element [first, first + count) belongs to."""
        index = np.arange(first, first + count)
        if self.kind == "rows":
            return np.floor_divide(index, self.size, out=out[:count])
        if self.kind == "columns":
            return np.remainder(index, self.size, out=out[:count])
        out[:count] = 0
        return out[:count]


@register
class NuSlerp(MergeMethod):
    name = "nuslerp"
    max_models = 2

    def __init__(self, n_models: int, weight: Any = None, base_weight: Any = None, row_wise: Any = False,
                 flatten: Any = True) -> None:
        super().__init__(n_models)
        self.raw = base_weight is not None
        if n_models != (1 if self.raw else 2):
            raise SpecError("nuslerp interpolates exactly two models: two fine-tuned models and a base, "
                            "or two models without one")
        self._weights = per_model(1.0 if weight is None else weight, n_models, "weight")
        if self.raw:
            self._weights.insert(0, setting(base_weight, "base_weight"))
        self._row_wise = setting(row_wise, "row_wise")
        self._flatten = setting(flatten, "flatten")

    def prepare(self, tensor: TensorContext) -> NuSlerpState:
        name, pos = tensor.name, tensor.position
        w0, w1 = (resolve_float(s, name, pos, f"{self.name}: weight") for s in self._weights)
        t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
        numel = max(tensor.numel, 1)
        if resolve_bool(self._flatten, name, pos, f"{self.name}: flatten") or len(tensor.shape) < 2:
            return NuSlerpState(t, 1, "whole", numel)
        if resolve_bool(self._row_wise, name, pos, f"{self.name}: row_wise"):
            size = max(int(np.prod(tensor.shape[1:])), 1)  # vectors along the first dimension
            return NuSlerpState(t, size, "columns", size)
        size = tensor.row_length
        return NuSlerpState(t, -(-numel // size), "rows", size)

    def reduce_passes(self, state: NuSlerpState) -> int:
        return 1

    def _operands(self, base: np.ndarray, models: Sequence[np.ndarray], lo: int, hi: int,
                  v0: np.ndarray, v1: np.ndarray, dtype_buffer: np.ndarray) -> None:
        if self.raw:
            np.copyto(v0, base[lo:hi], casting="unsafe")
            np.copyto(v1, models[0][lo:hi], casting="unsafe")
        else:
            np.copyto(dtype_buffer, base[lo:hi], casting="unsafe")
            np.copyto(v0, models[0][lo:hi], casting="unsafe")
            np.copyto(v1, models[1][lo:hi], casting="unsafe")
            np.subtract(v0, dtype_buffer, out=v0)
            np.subtract(v1, dtype_buffer, out=v1)

    def accumulate(self, state: NuSlerpState, pass_index: int, base: np.ndarray, models: Sequence[np.ndarray],
                   chunk: ChunkContext) -> None:
        b, v0, v1, tmp = scratch("nuslerp-reduce", 4, np.float64)
        (groups,) = scratch("nuslerp-groups", 1, np.intp)
        sums = np.zeros((3, state.groups))
        for lo, hi in blocks(base.shape[0]):
            k = hi - lo
            self._operands(base, models, lo, hi, v0[:k], v1[:k], b[:k])
            if state.kind == "whole":
                sums[0, 0] += dot(v0[:k], v0[:k], tmp[:k])
                sums[1, 0] += dot(v1[:k], v1[:k], tmp[:k])
                sums[2, 0] += dot(v0[:k], v1[:k], tmp[:k])
                continue
            g = state.group_of(chunk.first + lo, k, groups)
            for row, (x, y) in enumerate(((v0, v0), (v1, v1), (v0, v1))):
                np.multiply(x[:k], y[:k], out=tmp[:k])
                sums[row] += np.bincount(g, weights=tmp[:k], minlength=state.groups)
        with state.lock:
            state.parts[chunk.first] = sums

    def end_pass(self, state: NuSlerpState, pass_index: int) -> None:
        for first in sorted(state.parts):  # in chunk order: independent of thread timing
            state.sums += state.parts[first]
        state.parts.clear()
        state.c0, state.c1 = nuslerp_coefficients(state.t, *state.sums)

    def merge_chunk(self, backend: Any, base: Any, models: Sequence[Any], out: Any,
                    chunk: ChunkContext | None = None, state: NuSlerpState | None = None) -> None:
        if state is None or chunk is None:
            raise ValueError("nuslerp needs the tensor's state (its norms) from the engine")
        b, v0, v1, c = scratch("nuslerp-map", 4, np.float32)
        (groups,) = scratch("nuslerp-groups", 1, np.intp)
        c0, c1 = state.c0.astype(np.float32), state.c1.astype(np.float32)
        with np.errstate(all="ignore"):
            for lo, hi in blocks(base.shape[0]):
                k = hi - lo
                self._operands(base, models, lo, hi, v0[:k], v1[:k], b[:k])
                g = state.group_of(chunk.first + lo, k, groups)
                np.take(c0, g, out=c[:k])
                np.multiply(v0[:k], c[:k], out=v0[:k])
                np.take(c1, g, out=c[:k])
                np.multiply(v1[:k], c[:k], out=v1[:k])
                np.add(v0[:k], v1[:k], out=v0[:k])
                if not self.raw:
                    np.add(v0[:k], b[:k], out=v0[:k])
                np.copyto(out[lo:hi], v0[:k], casting="unsafe")  # one rounding, to nearest even

    def recipe(self) -> dict[str, Any]:
        recipe = {"method": self.name, "weights": [s.to_json() for s in self._weights],
                  "row_wise": self._row_wise.to_json(), "flatten": self._flatten.to_json()}
        if self.raw:
            recipe["base_weight"] = recipe["weights"].pop(0)
        return recipe


def nuslerp_coefficients(t: float, aa: np.ndarray, bb: np.ndarray, ab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per vector, (c₀, c₁) with θ = c₀·v₀ + c₁·v₁ (module docstring)."""
    na = np.maximum(np.sqrt(np.maximum(aa, 0.0)), NORM_FLOOR)
    nb = np.maximum(np.sqrt(np.maximum(bb, 0.0)), NORM_FLOOR)
    theta = np.arccos(np.clip(ab / (na * nb), -1.0, 1.0))
    sin = np.sin(theta)
    colinear = np.abs(sin) < COLINEAR_SIN
    safe = np.where(colinear, 1.0, sin)
    c0 = np.where(colinear, 1.0 - t, np.sin((1.0 - t) * theta) / safe)
    c1 = np.where(colinear, t, np.sin(t * theta) / safe)
    return c0, c1


