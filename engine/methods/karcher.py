"""Karcher mean (mergekit's karcher): the Riemannian mean of the models' directions on the unit
sphere, scaled by their mean norm.

Operands xᵢ are the models themselves, the base among them (it is one more model here, with
the same weight αᵢ = 1/N as every other; mergekit's karcher takes no weights). Each tensor is
flattened; nᵢ = ‖xᵢ‖, uᵢ = xᵢ/nᵢ, and only the xᵢ with nᵢ > tol take part (weights αᵢ
renormalised over them). Starting from u = Σ αᵢuᵢ / ‖Σ αᵢuᵢ‖ (u₀ when that norm is < tol), each
iteration, at most ``max_iter`` (10):

    θᵢ = arccos(clip(⟨u, uᵢ⟩, −1, 1));  T = Σ_{θᵢ ≥ tol} αᵢ·θᵢ/sin θᵢ·(uᵢ − ⟨u, uᵢ⟩·u)
    stop if ‖T‖ < tol (``tol``, 1e-5);  u ← cos‖T‖·u + sin‖T‖·T/‖T‖, renormalised

    θ = (Σᵢ nᵢ/N) · u

u stays a linear combination of the uᵢ, so every inner product of an iteration comes from
the Gram matrix ⟨xᵢ, xⱼ⟩: one reduce pass over the data (float64), the iterations on an N×N
matrix, then one weighted sum (fp32, one rounding). The iterations used are in the state
(``extra["iterations"]``). Where uᵢ = ±u (a one-element tensor, antipodal models) the step
θᵢ/sin θᵢ·(uᵢ − ⟨u, uᵢ⟩·u) is 0/0; safeblend takes it as 0, its limit along uᵢ = u and the
exact value mergekit's formula gives for exactly antipodal inputs (its fp32 arithmetic gives
rounding noise times 10¹⁶ there).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import SpecError
from . import _gram, register
from .base import TensorContext
from .params import resolve_float, setting

ANTIPODAL = 1e-12  # ‖uᵢ − ⟨u, uᵢ⟩·u‖ below this: uᵢ is ±u, no direction to move in


@register
class Karcher(_gram.GramMethod):
    name = "karcher"

    def __init__(self, n_models: int, max_iter: Any = 10, tol: Any = 1e-5) -> None:
        super().__init__(n_models)
        if isinstance(max_iter, bool) or not isinstance(max_iter, (int, float)) or max_iter < 0 \
                or int(max_iter) != max_iter:
            raise SpecError(f"karcher: max_iter must be a whole number ≥ 0, got {max_iter!r}")
        self.max_iter = int(max_iter)
        self._tol = setting(tol, "tol")

    def prepare(self, tensor: TensorContext) -> _gram.GramState:
        state = _gram.GramState("raw", self.n_models + 1)
        state.extra["tol"] = resolve_float(self._tol, tensor.name, tensor.position, f"{self.name}: tol")
        return state

    def coefficients(self, state: _gram.GramState) -> list[float]:
        coefficients, state.extra["iterations"] = karcher_coefficients(state.gram, self.max_iter, state.extra["tol"])
        return coefficients

    def recipe(self) -> dict[str, Any]:
        return {"method": self.name, "max_iter": self.max_iter, "tol": self._tol.to_json()}


def karcher_coefficients(gram: np.ndarray, max_iter: int, tol: float) -> tuple[list[float], int]:
    """The cᵢ of θ = Σ cᵢ·xᵢ from the Gram matrix of the xᵢ, and the iterations run.

    The iteration runs on coordinates: with ⟨uᵢ, uⱼ⟩ = Q·Λ·Qᵀ, the unit vectors are
    yᵢ = Λ^½·Qᵀ·eᵢ in an orthonormal basis of their span (r ≤ N dimensions, inner products
    unchanged), so each step is the module's formula on r-dimensional vectors; colinear inputs
    (r = 1) and antipodal ones stay exact. u is mapped back to the uᵢ by the pseudo-inverse.
    """
    n = gram.shape[0]
    norms = np.sqrt(np.maximum(np.diagonal(gram), 0.0))
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n, 0
    alphas = np.full(len(valid), 1.0 / len(valid))  # equal weights over the valid ones, renormalised
    units = gram[np.ix_(valid, valid)] / np.outer(norms[valid], norms[valid])  # ⟨uᵢ, uⱼ⟩
    values, vectors = np.linalg.eigh(units)
    keep = values > 1e-12 * max(float(values.max()), 1.0)
    roots = np.sqrt(values[keep])
    ys = (vectors[:, keep] * roots).T  # column i: uᵢ in the span's coordinates

    u = ys @ alphas
    start = float(np.linalg.norm(u))
    u = ys[:, 0].copy() if start < tol else u / start
    iterations = 0
    for _ in range(max_iter):
        iterations += 1
        tangent = np.zeros_like(u)
        for i, a in enumerate(alphas):
            d = min(1.0, max(-1.0, float(u @ ys[:, i])))
            theta = math.acos(d)
            if theta < tol:
                continue
            # θ/sin θ·(uᵢ − d·u), written as θ times the unit direction: ‖uᵢ − d·u‖ = sin θ, and
            # near θ = π (antipodal inputs) the direction is rounding noise, so it counts as none
            away = ys[:, i] - d * u
            length = float(np.linalg.norm(away))
            if length > ANTIPODAL:
                tangent += a * theta * away / length
        size = float(np.linalg.norm(tangent))
        if size < tol:
            break
        u = math.cos(size) * u + math.sin(size) * tangent / size
        length = float(np.linalg.norm(u))
        if length > tol:
            u = u / length
    beta = vectors[:, keep] @ (u / roots)  # u = Σ βᵢ·uᵢ (least-norm β)
    scale = float(np.sum(norms)) / n  # every model's norm, zero ones included, weight 1/N
    coefficients = [0.0] * n
    for k, i in enumerate(valid):
        coefficients[i] = scale * float(beta[k]) / norms[i]
    return coefficients, iterations
