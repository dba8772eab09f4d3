"""Task arithmetic (Ilharco et al., 2023): add scaled task vectors to the base.

    θ = θ_base + λ · Σᵢ wᵢ·(θ_ftᵢ − θ_base)

Defaults: wᵢ = 1, λ = 1. With ``normalize`` the weights are first divided by their sum
(Σ wᵢ; a clear error when it is zero). Every parameter may vary by tensor. The arithmetic is
the backend's ``weighted_delta_sum`` with weights λ·wᵢ.
"""

from __future__ import annotations

from typing import Any

from . import register
from .base import TensorContext
from .linear import Linear, LinearWeights
from .params import Setting, resolve_float, setting


@register
class TaskArithmetic(Linear):
    name = "task-arithmetic"
    default_weight = 1.0

    def __init__(self, n_models: int, weight: Any = None, lambda_: Any = 1.0, normalize: Any = False) -> None:
        self._lambda = setting(lambda_, "lambda")
        super().__init__(n_models, weight=weight, normalize=normalize)
        self.warnings.clear()  # λ·w outside [0, 1] is ordinary task arithmetic, not a slip

    def _settings(self) -> list[Setting]:
        return [*super()._settings(), self._lambda]

    def _resolve(self, tensor: TensorContext) -> LinearWeights:
        scale = resolve_float(self._lambda, tensor.name, tensor.position, f"{self.name}: lambda")
        return LinearWeights([scale * w for w in super()._resolve(tensor).deltas])

    def recipe(self) -> dict[str, Any]:
        return {"method": self.name, "weights": [s.to_json() for s in self._weights],
                "lambda": self._lambda.to_json(), "normalize": self._normalize.to_json()}
