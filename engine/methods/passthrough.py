"""Passthrough (mergekit's ``passthrough`` with one model): the model itself.

    θ = θ_ft   (cast to the output dtype)

A recipe's ``models: [A]`` runs as A merged with itself, so every tensor is planned as a copy
(an input that takes a tensor from the same bytes as the base is copied, never computed):
mergekit's way of converting a model's dtype. Its per-model ``scale`` other than 1 and
``slices`` that stack or cut layers (frankenmerges) are refused for now.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import register
from .base import ChunkContext, MergeMethod


@register
class Passthrough(MergeMethod):
    name = "passthrough"
    max_models = 1

    def __init__(self, n_models: int) -> None:
        super().__init__(n_models)

    def runs_on_gpu(self) -> bool:
        return False

    def merge_chunk(self, backend: Any, base: Any, models: Sequence[Any], out: Any,
                    chunk: ChunkContext | None = None, state: Any = None) -> None:
        np.copyto(out, models[0], casting="unsafe")  # one rounding, to nearest even

    def recipe(self) -> dict[str, Any]:
        return {"method": self.name}
