"""NearSwap: take the fine-tuned value where it is near the base's, keep the base's elsewhere.

Per element, with a = θ_base, b = θ_ft and t > 0 (mergekit's nearswap):

    w = clip(t / max(|a − b|, 1e-6), 0, 1)
    θ = w·b + (1 − w)·a

Elements within t of each other take b; farther ones move toward b by t/|a − b|. One fine-tuned
model; ``t`` may vary by tensor. Per-element work, no reduce pass, numpy in cache-sized blocks.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import register
from ._blocks import blocks, scratch
from .base import ChunkContext, MergeMethod, TensorContext
from .params import resolve_float, setting

DIFF_FLOOR = 1e-6  # mergekit clamps |a − b| from below by this


@register
class NearSwap(MergeMethod):
    name = "nearswap"
    max_models = 1

    def __init__(self, n_models: int, t: Any = None) -> None:
        from ..errors import SpecError

        super().__init__(n_models)
        if t is None:
            raise SpecError("nearswap: parameter 't' is required (the distance under which values swap); "
                            "set it in a recipe or as safeblend.merge(..., t=...)")
        self._t = setting(t, "t")

    def prepare(self, tensor: TensorContext) -> float:
        return resolve_float(self._t, tensor.name, tensor.position, f"{self.name}: t")

    def runs_on_gpu(self) -> bool:
        return False

    def merge_chunk(self, backend: Any, base: Any, models: Sequence[Any], out: Any,
                    chunk: ChunkContext | None = None, state: float | None = None) -> None:
        t = state if state is not None else self._t.constant
        a_buf, b_buf, w_buf = scratch("nearswap", 3, np.float32)
        with np.errstate(all="ignore"):
            for lo, hi in blocks(base.shape[0]):
                a, b, w = a_buf[: hi - lo], b_buf[: hi - lo], w_buf[: hi - lo]
                np.copyto(a, base[lo:hi], casting="unsafe")
                np.copyto(b, models[0][lo:hi], casting="unsafe")
                np.subtract(a, b, out=w)
                np.abs(w, out=w)
                np.maximum(w, np.float32(DIFF_FLOOR), out=w)
                np.divide(np.float32(t), w, out=w)
                np.clip(w, np.float32(0), np.float32(1), out=w)
                np.subtract(b, a, out=b)
                np.multiply(b, w, out=b)
                np.add(a, b, out=a)  # a + w·(b − a) = w·b + (1 − w)·a
                np.copyto(out[lo:hi], a, casting="unsafe")  # one rounding, to nearest even

    def recipe(self) -> dict[str, Any]:
        return {"method": self.name, "t": self._t.to_json()}
