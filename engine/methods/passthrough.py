"""Passthrough (mergekit's ``passthrough``): one model's tensors, each times its ``scale``.

    θ = scale · θ_ft   (computed in fp32 — float64 for a float64 input — rounded once to the
                        output dtype; no scale, or scale 1: θ_ft itself, cast)

A recipe's ``models: [A]`` runs as A merged with itself, and a recipe's ``slices`` stacking or
cutting layers (frankenmerges, ``safeblend.slices``) runs as the stacked view merged with
itself: a tensor whose scale is 1 is planned as a copy (the base's own bytes, cast only where
the output dtype differs), one with any other scale is computed (``must_compute``). ``scale``
may vary by tensor like any parameter (mergekit's example: 0 on ``o_proj``, 1 elsewhere).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import register
from .base import ChunkContext, MergeMethod, TensorContext
from .params import per_model, resolve_float


@register
class Passthrough(MergeMethod):
    name = "passthrough"
    max_models = 1
    copies_by_design = True  # a conversion (or a frankenmerge's renamed layers)

    def __init__(self, n_models: int, scale: Any = 1.0) -> None:
        super().__init__(n_models)
        self._scale = per_model(1.0 if scale is None else scale, n_models, "scale")[0]

    def runs_on_gpu(self) -> bool:
        return False

    def _resolve(self, name: str, position: float) -> float:
        return resolve_float(self._scale, name, position, f"{self.name}: scale")

    def must_compute(self, name: str, position: float) -> bool:
        return self._resolve(name, position) != 1.0

    def prepare(self, tensor: TensorContext) -> float:
        return self._resolve(tensor.name, tensor.position)

    def merge_chunk(self, backend: Any, base: Any, models: Sequence[Any], out: Any,
                    chunk: ChunkContext | None = None, state: Any = None) -> None:
        scale = state if state is not None else self._scale.constant
        if scale is None:
            raise ValueError(f"{self.name}: a per-tensor scale needs the tensor's state from prepare()")
        if scale == 1.0:
            np.copyto(out, models[0], casting="unsafe")  # one rounding, to nearest even
            return
        compute = np.float64 if np.dtype(models[0].dtype) == np.float64 else np.float32
        with np.errstate(all="ignore"):  # inf·0 is NaN, as in torch
            product = np.multiply(models[0], compute(scale), dtype=compute)
        np.copyto(out, product, casting="unsafe")  # one rounding, to nearest even

    def recipe(self) -> dict[str, Any]:
        scale = self._scale.to_json()
        return {"method": self.name, **({} if scale == 1.0 else {"scale": scale})}
