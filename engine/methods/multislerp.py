"""Multi-SLERP (mergekit's multislerp): barycentric interpolation of several tensors on a
hypersphere, scaled back to their weighted average norm.

Operands vᵢ: the task vectors θ_ftᵢ − θ_base when there is a base, else the models themselves
(``base_weight`` given: the first model, passed as the base, is then an operand with that
weight). Each tensor is flattened. With weights wᵢ (divided by Σ wⱼ when ``normalize_weights``,
the default), nᵢ = ‖vᵢ‖ and ε = ``eps`` (1e-8):

    uᵢ = vᵢ / (nᵢ + ε),   m = Σ wᵢ·uᵢ,   m̂ = m / ‖m‖
    r  = Σ wᵢ·(uᵢ − ⟨uᵢ, m̂⟩·m̂)                    (the tangent-space mean; 0 up to rounding)
    τ  = ‖r‖ + ε
    θ  = [θ_base +] (Σ wᵢ·nᵢ) · (cos τ · m̂ + sin τ / τ · r)

When ‖m‖ < ε (weights balancing antipodal tensors): with two operands θ = [θ_base +] w₀·v₀ + w₁·v₁,
with more an error naming the tensor. Everything here is a linear combination of the vᵢ fixed by
their inner products, so one reduce pass gathers the Gram matrix ⟨vᵢ, vⱼ⟩ in float64, the
coefficients are computed from it, and the output is one weighted sum (fp32, one rounding).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import SpecError
from . import _gram, register
from .base import TensorContext
from .params import per_model, resolve_bool, resolve_float, setting


@register
class MultiSlerp(_gram.GramMethod):
    name = "multislerp"

    def __init__(self, n_models: int, weight: Any = None, base_weight: Any = None, normalize_weights: Any = True,
                 eps: Any = 1e-8) -> None:
        super().__init__(n_models)
        self._weights = per_model(1.0 if weight is None else weight, n_models, "weight")
        self._base_weight = None if base_weight is None else setting(base_weight, "base_weight")
        self._normalize = setting(normalize_weights, "normalize_weights")
        self._eps = setting(eps, "eps")
        if self._base_weight is None and n_models < 2:
            raise SpecError("multislerp needs at least two models to interpolate besides the base")

    def prepare(self, tensor: TensorContext) -> _gram.GramState:
        name, t = tensor.name, tensor.position
        weights = [resolve_float(s, name, t, f"{self.name}: weight") for s in self._weights]
        raw = self._base_weight is not None
        if raw:
            weights.insert(0, resolve_float(self._base_weight, name, t, f"{self.name}: base model's weight"))
        state = _gram.GramState("raw" if raw else "deltas", len(weights))
        if resolve_bool(self._normalize, name, t, f"{self.name}: normalize_weights"):
            total = sum(weights)
            if total == 0:
                raise SpecError(f"{self.name}: cannot normalise weights {weights} for tensor {name!r}: they sum to zero")
            weights = [w / total for w in weights]
        state.extra.update(name=name, weights=weights, eps=resolve_float(self._eps, name, t, f"{self.name}: eps"))
        return state

    def coefficients(self, state: _gram.GramState) -> list[float]:
        return multislerp_coefficients(state.gram, state.extra["weights"], state.extra["eps"], state.extra["name"])

    def recipe(self) -> dict[str, Any]:
        recipe = {"method": self.name, "weights": [s.to_json() for s in self._weights],
                  "normalize_weights": self._normalize.to_json(), "eps": self._eps.to_json()}
        if self._base_weight is not None:
            recipe["base_weight"] = self._base_weight.to_json()
        return recipe


def multislerp_coefficients(gram: np.ndarray, weights: list[float], eps: float, name: str) -> list[float]:
    """The cᵢ of θ = [θ_base +] Σ cᵢ·vᵢ, from the Gram matrix of the vᵢ (module docstring)."""
    w = np.asarray(weights, dtype=np.float64)
    norms = np.sqrt(np.maximum(np.diagonal(gram), 0.0))
    a = w / (norms + eps)  # m = Σ aᵢ·vᵢ
    mean_norm = math.sqrt(max(float(a @ gram @ a), 0.0))
    if mean_norm < eps:
        if len(weights) == 2:
            return [float(x) for x in w]
        raise SpecError(f"multislerp: tensor {name!r}: the weighted mean of the unit tensors is zero "
                        "(antipodal tensors with balancing weights); change the weights")
    # ⟨uᵢ, m̂⟩ and the tangent mean r = Σ wᵢ·uᵢ − (Σ wᵢ⟨uᵢ, m̂⟩)·m̂, as coefficients on the vᵢ
    dots = (gram @ a) / ((norms + eps) * mean_norm)
    r = a - float(w @ dots) * a / mean_norm
    tau = math.sqrt(max(float(r @ gram @ r), 0.0)) + eps
    unit = a / mean_norm * math.cos(tau) + r * (math.sin(tau) / tau)
    return [float(x) for x in float(w @ norms) * unit]
