"""Linear merge (weight interpolation / weighted sum of task vectors).

    θ = θ_base + Σᵢ wᵢ·(θ_ftᵢ − θ_base)

With one fine-tuned model and weight λ this is ``(1 − λ)·θ_base + λ·θ_ft``, the pre/post
fine-tuning merge of Farn et al. (2024). A single weight given for several models applies to
each. With ``normalize`` the weights are divided by their sum first.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import SpecError
from . import register
from .base import MergeMethod


@register
class Linear(MergeMethod):
    name = "linear"

    def __init__(self, n_models: int, weight: float | Sequence[float] = 0.5, normalize: bool = False) -> None:
        super().__init__(n_models)
        weights = [float(w) for w in ([weight] if isinstance(weight, (int, float)) else weight)]
        if len(weights) == 1:
            weights = weights * n_models
        if len(weights) != n_models:
            raise SpecError(f"linear: got {len(weights)} weights for {n_models} fine-tuned models")
        if normalize:
            total = sum(weights)
            if abs(total) < 1e-12:
                raise SpecError(f"linear: cannot normalise weights {weights}: they sum to zero")
            weights = [w / total for w in weights]
        self.weights = weights
        self.normalize = normalize
        outside = [w for w in weights if not 0.0 <= w <= 1.0]
        if outside:
            self.warnings.append(
                f"weight {outside[0]:g} is outside [0, 1]: this extrapolates beyond the inputs"
            )

    def merge_chunk(self, backend: Any, base: Any, models: Sequence[Any], out: Any) -> None:
        backend.weighted_delta_sum(base, models, self.weights, out)

    def recipe(self) -> dict[str, Any]:
        return {"method": self.name, "weights": self.weights, "normalize": self.normalize}
