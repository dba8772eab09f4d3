"""Linear merge (weight interpolation / weighted sum of task vectors).

    θ = θ_base + Σᵢ wᵢ·(θ_ftᵢ − θ_base)

With one fine-tuned model and weight λ this is ``(1 − λ)·θ_base + λ·θ_ft``, the pre/post
fine-tuning merge of Farn et al. (2024). A single weight given for several models applies to
each. With ``normalize`` the weights are divided by their sum first, wᵢ ← wᵢ / (w_base + Σⱼ wⱼ),
which makes θ the weighted average (w_base·θ_base + Σ wᵢ·θ_ftᵢ) / (w_base + Σ wᵢ); ``base_weight``
(w_base, default 0) only enters that sum, as when a mergekit recipe lists the base among its
models. Weights may vary by tensor (see ``engine.methods.params``). The arithmetic is the
backend's ``weighted_delta_sum``.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import SpecError
from . import register
from .base import ChunkContext, MergeMethod, TensorContext
from .params import Setting, per_model, resolve_bool, resolve_float, setting


@register
class Linear(MergeMethod):
    name = "linear"
    default_weight = 0.5

    def __init__(self, n_models: int, weight: Any = None, normalize: Any = False, base_weight: Any = 0.0) -> None:
        super().__init__(n_models)
        self._weights = per_model(self.default_weight if weight is None else weight, n_models, "weight")
        self._normalize = setting(normalize, "normalize")
        self._base_weight = setting(base_weight, "base_weight")
        # Parameters that are the same for every tensor are resolved once, here.
        self.weights: list[float] | None = None
        if all(s.constant is not None for s in self._settings()):
            self.weights = self._resolve(TensorContext("", 0))
            outside = [w for w in self.weights if not 0.0 <= w <= 1.0]
            if outside:
                self.warnings.append(
                    f"weight {outside[0]:g} is outside [0, 1]: this extrapolates beyond the inputs"
                )

    def _settings(self) -> list[Setting]:
        """Every parameter, to tell whether they are all the same for every tensor."""
        return [*self._weights, self._normalize, self._base_weight]

    @property
    def normalize(self) -> bool:
        return bool(self._normalize.constant) if self._normalize.constant is not None else False

    def _resolve(self, tensor: TensorContext) -> list[float]:
        """This tensor's weights, normalised if asked (SpecError when they sum to zero)."""
        name, t = tensor.name, tensor.position
        weights = [resolve_float(s, name, t, f"{self.name}: weight") for s in self._weights]
        if resolve_bool(self._normalize, name, t, f"{self.name}: normalize"):
            total = sum(weights) + resolve_float(self._base_weight, name, t, f"{self.name}: base_weight")
            if abs(total) < 1e-12:
                where = f" for tensor {name!r}" if name else ""
                raise SpecError(f"{self.name}: cannot normalise weights {weights}{where}: they sum to zero")
            weights = [w / total for w in weights]
        return weights

    def prepare(self, tensor: TensorContext) -> list[float]:
        return self.weights if self.weights is not None else self._resolve(tensor)

    def merge_chunk(self, backend: Any, base: Any, models: Sequence[Any], out: Any,
                    chunk: ChunkContext | None = None, state: Any = None) -> None:
        weights = state if state is not None else self.weights
        if weights is None:
            raise ValueError(f"{self.name}: per-tensor weights need the tensor's state from prepare()")
        backend.weighted_delta_sum(base, models, weights, out)

    def recipe(self) -> dict[str, Any]:
        if self.weights is not None:
            return {"method": self.name, "weights": self.weights, "normalize": self.normalize}
        return {"method": self.name, "weights": [s.to_json() for s in self._weights],
                "normalize": self._normalize.to_json(), "base_weight": self._base_weight.to_json()}
