"""Linear merge (weight interpolation / weighted sum of task vectors).

    θ = θ_base + Σᵢ wᵢ·(θ_ftᵢ − θ_base)

With one fine-tuned model and weight λ this is ``(1 − λ)·θ_base + λ·θ_ft``, the pre/post
fine-tuning merge of Farn et al. (2024). A single weight given for several models applies to
each. With ``normalize`` the weights are divided by their sum first, wᵢ ← wᵢ / (w_base + Σⱼ wⱼ),
which makes θ the weighted average (w_base·θ_base + Σ wᵢ·θ_ftᵢ) / (w_base + Σ wᵢ); ``base_weight``
(w_base, default 0) only enters that sum, as when a mergekit recipe lists the base among its
models. Weights may vary by tensor (see ``safeblend.methods.params``). The arithmetic is the
backend's ``weighted_delta_sum``.

A LoRA fine-tune (θ_ftᵢ = θ_base + sᵢ·Bᵢ·Aᵢ) may come as an ``safeblend.lora.LowRankChunk``
(``takes_low_rank``): its term wᵢ·(θ_ftᵢ − θ_base) is then wᵢ·sᵢ·Bᵢ·Aᵢ, added to the
accumulator straight from the factors (``merge_low_rank``) rather than formed as θ_ftᵢ, read
back, and reduced by θ_base again.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np

from ..errors import SpecError
from ..lora import LowRankChunk
from . import register
from .base import ChunkContext, MergeMethod, TensorContext
from .params import Setting, per_model, resolve_bool, resolve_float, setting


# Elements per piece of merge_low_rank: a run of whole rows (or part of one row) whose
# accumulator stays in L2 while the LoRA products, θ_base and the rounding pass over it.
# Measured here (2M-element chunks of TinyLlama-1.1B's gate/down/k_proj, r=16, bf16, one
# thread): 1.46-1.58 ns per element at 32K, 1.20-1.43 at 64-128K, 1.21-1.28 at 256-512K (the
# plain two-checkpoint arithmetic: 0.90-0.96).
LOW_RANK_PIECE = 1 << 18
_scratch = threading.local()  # merge_low_rank's buffers, per compute thread and dtype


@register
class Linear(MergeMethod):
    name = "linear"
    default_weight = 0.5
    takes_low_rank = True

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
        if any(isinstance(m, LowRankChunk) for m in models):
            merge_low_rank(backend, base, models, weights, out)
        else:
            backend.weighted_delta_sum(base, models, weights, out)

    def recipe(self) -> dict[str, Any]:
        if self.weights is not None:
            return {"method": self.name, "weights": self.weights, "normalize": self.normalize}
        return {"method": self.name, "weights": [s.to_json() for s in self._weights],
                "normalize": self._normalize.to_json(), "base_weight": self._base_weight.to_json()}


def merge_low_rank(backend: Any, base: np.ndarray, models: Sequence[np.ndarray | LowRankChunk],
                   weights: Sequence[float], out: np.ndarray) -> None:
    """``out = base + Σ wᵢ·(θᵢ − base)`` on the CPU where some θᵢ are LowRankChunks.

    Per piece of whole rows (``LowRankChunk.pieces``): the LoRA terms wᵢ·sᵢ·Bᵢ·Aᵢ (the first
    written by its matmuls straight into the accumulator), then θ_base, upcast as it is added
    (with full models: their ``backend.weighted_delta_sum``, which includes θ_base), then one
    rounding into ``out``. The accumulator is fp32, or float64 where an operand is float64 or
    a LoRA product is formed in float64 (an fp32/fp64 output, safeblend.lora._EXACT_OUTPUTS): a
    merge of the materialised fine-tune's precision, without its rounding of θ_ft to fp32.

    IEEE edge: where W is ±inf this keeps it (θ_ft − θ_base is s·B·A by definition), while a
    merge of the materialised θ_ft (other methods, the GPU) gives inf − inf = NaN there.
    """
    low = [(m, w) for m, w in zip(models, weights) if isinstance(m, LowRankChunk)]
    full = [(m, w) for m, w in zip(models, weights) if not isinstance(m, LowRankChunk)]
    dtypes = [np.dtype(m.precision) for m, _ in low] + [a.dtype for a in (base, out, *(m for m, _ in full))]
    compute = np.dtype(np.float64) if np.dtype(np.float64) in dtypes else np.dtype(np.float32)
    pieces = list(low[0][0].pieces(LOW_RANK_PIECE))  # every LoRA here has this tensor's shape: any one's do
    acc_buffer, part_buffer = _scratch_buffers(compute, max(hi - lo for lo, hi in pieces))
    with np.errstate(all="ignore"):  # inf − inf is NaN by IEEE rules, not a user error
        for lo, hi in pieces:
            acc = acc_buffer[: hi - lo]
            for k, (chunk, w) in enumerate(low):
                chunk.product_into(acc, lo, w, accumulate=k > 0)
            if full:
                part = part_buffer[: hi - lo]
                backend.weighted_delta_sum(base[lo:hi], [m[lo:hi] for m, _ in full], [w for _, w in full], part)
                np.add(acc, part, out=acc)
            else:
                np.add(acc, base[lo:hi], out=acc)
            np.copyto(out[lo:hi], acc, casting="unsafe")  # the one rounding (to nearest even)


def _scratch_buffers(dtype: np.dtype, size: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's two ``dtype`` buffers of at least ``size`` elements (accumulator, full part)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    if dtype not in buffers or buffers[dtype][0].shape[0] < size:
        buffers[dtype] = (np.empty(size, dtype=dtype), np.empty(size, dtype=dtype))
    return buffers[dtype]
