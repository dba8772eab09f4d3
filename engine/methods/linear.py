"""Linear merge (weight interpolation / weighted sum of task vectors).

    θ = θ_base + Σᵢ wᵢ·(θ_ftᵢ − θ_base)

With one fine-tuned model and weight λ this is ``(1 − λ)·θ_base + λ·θ_ft``, the pre/post
fine-tuning merge of Farn et al. (2024). A single weight given for several models applies to
each. With ``normalize`` the weights are divided by their sum first, wᵢ ← wᵢ / Σⱼ wⱼ.

``base_weight`` w_base (None by default) switches to mergekit's linear merge, the weighted sum
over every listed model, the base included with its own weight:

    θ = w_base·θ_base + Σᵢ wᵢ·θ_ftᵢ              (normalize: divided by w_base + Σᵢ wᵢ)

Normalised, that is the affine form above with weights wᵢ / (w_base + Σⱼ wⱼ); without
``normalize`` the base keeps its listed weight rather than 1 − Σ wᵢ, and the sum runs in numpy
(``weighted_sum``) on the CPU. Weights may vary by tensor (see ``safeblend.methods.params``).
The affine arithmetic is the backend's ``weighted_delta_sum``.

A LoRA fine-tune (θ_ftᵢ = θ_base + sᵢ·Bᵢ·Aᵢ) may come as an ``safeblend.lora.LowRankChunk``
(``takes_low_rank``): its term wᵢ·(θ_ftᵢ − θ_base) is then wᵢ·sᵢ·Bᵢ·Aᵢ, added to the
accumulator straight from the factors (``merge_low_rank``) rather than formed as θ_ftᵢ, read
back, and reduced by θ_base again.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import SpecError
from ..lora import LowRankChunk
from . import register
from ._blocks import blocks, scratch
from .base import ChunkContext, MergeMethod, TensorContext
from .params import Setting, per_model, resolve_bool, resolve_float, setting


# Elements per piece of merge_low_rank: a run of whole rows (or part of one row) whose
# accumulator stays in L2 while the LoRA products, θ_base and the rounding pass over it.
# Measured here (2M-element chunks of TinyLlama-1.1B's gate/down/k_proj, r=16, bf16, one
# thread): 1.46-1.58 ns per element at 32K, 1.20-1.43 at 64-128K, 1.21-1.28 at 256-512K (the
# plain two-checkpoint arithmetic: 0.90-0.96).
LOW_RANK_PIECE = 1 << 18
_scratch = threading.local()  # merge_low_rank's buffers, per compute thread and dtype


@dataclass(frozen=True)
class LinearWeights:
    """One tensor's coefficients: θ = θ_base + Σ deltas[i]·(θᵢ − θ_base), or, where ``base`` is
    not None, θ = base·θ_base + Σ deltas[i]·θᵢ (mergekit's unnormalised weighted sum)."""

    deltas: list[float]
    base: float | None = None


@register
class Linear(MergeMethod):
    name = "linear"
    default_weight = 0.5
    takes_low_rank = True

    def __init__(self, n_models: int, weight: Any = None, normalize: Any = False, base_weight: Any = None) -> None:
        super().__init__(n_models)
        self._weights = per_model(self.default_weight if weight is None else weight, n_models, "weight")
        self._normalize = setting(normalize, "normalize")
        self._base_weight = None if base_weight is None else setting(base_weight, "base_weight")
        if self._base_weight is not None and not (self._normalize.constant is True):
            # The unnormalised weighted sum is formed from the full models, in numpy.
            self.takes_low_rank = False
        # Parameters that are the same for every tensor are resolved once, here.
        self.weights: list[float] | None = None
        self._constant: LinearWeights | None = None
        if all(s.constant is not None for s in self._settings()):
            self._constant = self._resolve(TensorContext("", 0))
            self.weights = self._constant.deltas
            outside = [w for w in self.weights if not 0.0 <= w <= 1.0]
            if outside and self._base_weight is None:
                self.warnings.append(
                    f"weight {outside[0]:g} is outside [0, 1]: this extrapolates beyond the inputs"
                )

    def _settings(self) -> list[Setting]:
        """Every parameter, to tell whether they are all the same for every tensor."""
        return [*self._weights, self._normalize, *([self._base_weight] if self._base_weight is not None else [])]

    def runs_on_gpu(self) -> bool:
        """The affine form runs on the GPU; mergekit's unnormalised weighted sum does not."""
        return self._base_weight is None or self._normalize.constant is True

    @property
    def normalize(self) -> bool:
        return bool(self._normalize.constant) if self._normalize.constant is not None else False

    def _resolve(self, tensor: TensorContext) -> LinearWeights:
        """This tensor's coefficients, normalised if asked (SpecError when the weights sum to zero)."""
        name, t = tensor.name, tensor.position
        weights = [resolve_float(s, name, t, f"{self.name}: weight") for s in self._weights]
        base = (None if self._base_weight is None
                else resolve_float(self._base_weight, name, t, f"{self.name}: base model's weight"))
        if resolve_bool(self._normalize, name, t, f"{self.name}: normalize"):
            total = sum(weights) + (base or 0.0)
            if abs(total) < 1e-12:
                where = f" for tensor {name!r}" if name else ""
                raise SpecError(f"{self.name}: cannot normalise weights {weights}{where}: they sum to zero")
            return LinearWeights([w / total for w in weights])  # the affine form: base gets 1 − Σ
        return LinearWeights(weights, base)

    def prepare(self, tensor: TensorContext) -> LinearWeights:
        return self._constant if self._constant is not None else self._resolve(tensor)

    def merge_chunk(self, backend: Any, base: Any, models: Sequence[Any], out: Any,
                    chunk: ChunkContext | None = None, state: Any = None) -> None:
        coefficients = state if state is not None else self._constant
        if coefficients is None:
            raise ValueError(f"{self.name}: per-tensor weights need the tensor's state from prepare()")
        if coefficients.base is not None:
            weighted_sum(base, models, coefficients.base, coefficients.deltas, out)
        elif any(isinstance(m, LowRankChunk) for m in models):
            merge_low_rank(backend, base, models, coefficients.deltas, out)
        else:
            backend.weighted_delta_sum(base, models, coefficients.deltas, out)

    def recipe(self) -> dict[str, Any]:
        base = {} if self._base_weight is None else {"base_weight": self._base_weight.to_json()}
        if self.weights is not None:
            return {"method": self.name, "weights": self.weights, "normalize": self.normalize, **base}
        return {"method": self.name, "weights": [s.to_json() for s in self._weights],
                "normalize": self._normalize.to_json(), **base}


def weighted_sum(base: np.ndarray, models: Sequence[np.ndarray], base_weight: float, weights: Sequence[float],
                 out: np.ndarray) -> None:
    """``out = base_weight·base + Σ weights[i]·models[i]``: fp32 (float64 where an operand is),
    in cache-sized blocks, one rounding to ``out``."""
    compute = np.dtype(np.float64) if any(a.dtype == np.float64 for a in (base, out, *models)) else np.dtype(np.float32)
    acc_buffer, term_buffer = scratch("linear-sum", 2, compute)
    with np.errstate(all="ignore"):
        for lo, hi in blocks(base.shape[0]):
            acc, term = acc_buffer[: hi - lo], term_buffer[: hi - lo]
            np.copyto(acc, base[lo:hi], casting="unsafe")
            np.multiply(acc, compute.type(base_weight), out=acc)
            for model, w in zip(models, weights):
                np.copyto(term, model[lo:hi], casting="unsafe")
                np.multiply(term, compute.type(w), out=term)
                np.add(acc, term, out=acc)
            np.copyto(out[lo:hi], acc, casting="unsafe")  # the one rounding (to nearest even)


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
