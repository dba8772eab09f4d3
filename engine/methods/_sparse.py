"""Sparsified task arithmetic, the machinery shared by ``ties``, ``dare-linear`` and ``dare-ties``.

For task vectors dᵢ = θ_ftᵢ − θ_base (fp32), weights wᵢ, a scale λ:

1. sparsify each dᵢ into d̃ᵢ: by magnitude (TIES: keep |dᵢ| ≥ the k-th largest |dᵢ| of the
   tensor, k = ⌊densityᵢ·n⌋; with ``rescale: l1`` the kept ones are then scaled by
   ‖dᵢ‖₁/‖keptᵢ‖₁, as mergekit's ``rescale: true`` does), by magnitude without the outliers
   (Model Breadcrumbs: drop the t = ⌊γᵢ·n⌋ largest |dᵢ| and keep the next ⌊densityᵢ·n⌋, t
   lowered where the two exceed n; the same optional L1 rescale), at random by rank (DELLA: per
   row, keep each entry with probability ρᵢ − εᵢ + 2εᵢ·(rank − 1)/(m − 1), its magnitude's rank
   1..m in the row, then the L1 rescale) or at random (DARE: keep each entry with probability densityᵢ,
   then rescale the kept ones by sᵢ: 1/densityᵢ, or ‖dᵢ‖₁/‖keptᵢ‖₁ (1 where either norm is
   below 1e-7, as in mergekit), or 1);
2. weight: eᵢ = wᵢ·d̃ᵢ;
3. combine, per element:
   - without sign election: Δ = Σᵢ eᵢ, and with ``normalize`` Δ /= Σᵢ wᵢ (if |Σ wᵢ| ≥ 1e-8);
   - with sign election: the elected sign is + where S ≥ 0 and − elsewhere, with
     S = Σᵢ eᵢ (``consensus: sum``) or S = Σᵢ sign(eᵢ) (``consensus: count``); entry i agrees
     where sign(eᵢ) equals it (zeros never agree); Δ = Σ agreeing eᵢ, and with ``normalize``
     Δ /= Σ agreeing wᵢ (where that sum is not 0);
4. θ = θ_base + λ·Δ, rounded once to the output dtype.

Whole-tensor statistics come from reduce passes over the chunks: the TIES thresholds from
a sampled pass and an exact one (``_select``), the L1 rescale norms from one. The per-element work is
numpy on the CPU, in cache-sized blocks.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np

from ..errors import SpecError
from ._blocks import blocks, scratch
from ._rng import DEFAULT_SEED, MaskGenerator, keep_limit, stream_key
from ._select import KthLargest, magnitude_bits
from .base import ChunkContext, MergeMethod, TensorContext
from .params import per_model, resolve, resolve_bool, resolve_float, setting

# Elements per block: the combine step holds 2N + 4 fp32 buffers for N models. Each reduce
# block also pays a fixed 32K-bin histogram fold (KthLargest.add), so blocks are large:
# measured here (TinyLlama-1.1B bf16, ties with 2 fine-tunes, quiet): 64K → 15.8–16.7 s,
# 256K → 12.6–13.6 s, 512K → 13.9–15.2 s (and +40 MiB RSS); linear 3.9–4.5 s.
COMBINE_BLOCK = 1 << 18
RESCALES = ("density", "l1", "none")
L1_FLOOR = 1e-7  # mergekit's eps: no L1 rescale where either norm is below it
CONSENSUS = ("sum", "count")

_local = threading.local()


@dataclass
class SparseState:
    """One tensor's resolved parameters and statistics."""

    weights: list[float]
    densities: list[float]
    scale: float  # λ
    normalize: bool
    consensus: str | None
    rescale: str
    selectors: list[KthLargest] = field(default_factory=list)  # TIES: per model; breadcrumbs: then outliers
    keys: list[int] = field(default_factory=list)  # DARE stream keys
    limits: list[int] = field(default_factory=list)  # DARE keep limits
    l1: np.ndarray | None = None  # DARE l1: [model, (Σ|d|, Σ|kept d|)]
    l1_parts: dict[int, np.ndarray] = field(default_factory=dict)  # per chunk, while reducing
    l1_pass: int | None = None  # TIES with rescale l1: the pass after the selection
    epsilons: list[float] = field(default_factory=list)  # DELLA
    row_length: int = 1  # DELLA: ranks are taken per row
    rank_limits: list[np.ndarray] = field(default_factory=list)  # DELLA: per model, keep limit by rank
    reader: Any = None  # DELLA: views of elements outside a chunk (rows it cuts)
    passes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def trim(self, i: int, delta: np.ndarray, bits: np.ndarray, keep: np.ndarray, spare: np.ndarray) -> bool:
        """Model i's magnitude mask for ``delta`` into ``keep``; False where everything is kept.

        keep = |d| ≥ τᵢ (the kept rank's magnitude) and, with outlier selectors, |d| < τ'ᵢ (the
        smallest of the outliers); ``bits`` and ``spare`` are scratch of the same length."""
        n = len(self.densities)
        keep_all = self.selectors[i].threshold_bits == 0
        outliers = self.selectors[n + i] if len(self.selectors) > n else None
        none_out = outliers is None or outliers.threshold_bits >= 1 << 31
        if keep_all and none_out:
            return False
        magnitude_bits(delta, bits)
        if keep_all:
            keep[:] = True
        else:
            np.greater_equal(bits, np.uint32(self.selectors[i].threshold_bits), out=keep)
        if not none_out:
            np.less(bits, np.uint32(outliers.threshold_bits), out=spare)
            np.logical_and(keep, spare, out=keep)
        return True

    def factors(self) -> list[float]:
        """Per model, what multiplies a kept delta: wᵢ·sᵢ (sᵢ the rescale)."""
        out = []
        for i, (w, p) in enumerate(zip(self.weights, self.densities)):
            s = 1.0
            if (self.keys or self.selectors) and p < 1.0:
                if self.rescale == "density":
                    s = 1.0 / p if p > 0 else 0.0
                elif self.rescale == "l1" and self.l1 is not None and min(self.l1[i]) >= L1_FLOOR:
                    s = float(self.l1[i, 0] / self.l1[i, 1])
            out.append(w * s)
        return out


class SparseTaskArithmetic(MergeMethod):
    """Base class; subclasses pick the sparsification and whether signs are elected."""

    sparsify: ClassVar[str]  # "magnitude", "outliers", "della" or "random"
    default_rescale: ClassVar[str | None] = None  # None: "density" for random, "none" otherwise
    elect_signs: ClassVar[bool]
    default_normalize: ClassVar[bool]

    def __init__(self, n_models: int, weight: Any = None, density: Any = 1.0, lambda_: Any = 1.0,
                 normalize: Any = None, consensus: Any = None, rescale: Any = None, seed: Any = None,
                 gamma: Any = None, epsilon: Any = None) -> None:
        super().__init__(n_models)
        given = {"consensus": consensus, "rescale": rescale, "seed": seed, "gamma": gamma, "epsilon": epsilon}
        for key in sorted(set(given) - set(self.parameter_names())):
            if given[key] is not None:
                raise SpecError(f"method {self.name!r} takes no parameter {key!r}")
        self._weights = per_model(1.0 if weight is None else weight, n_models, "weight")
        self._densities = per_model(density, n_models, "density")
        self._lambda = setting(lambda_, "lambda")
        self._normalize = setting(self.default_normalize if normalize is None else normalize, "normalize")
        self._consensus = setting(consensus or "sum", "consensus") if self.elect_signs else None
        default_rescale = self.default_rescale or ("density" if self.sparsify == "random" else "none")
        self._rescale = setting(default_rescale if rescale is None else rescale, "rescale")
        self._gammas = per_model(0.01 if gamma is None else gamma, n_models, "gamma")
        self._epsilons = per_model(0.15 if epsilon is None else epsilon, n_models, "epsilon")
        self.seed: int | None = None
        if self.sparsify in ("random", "della"):
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
                raise SpecError(f"{self.name}: seed must be an integer in [0, 2^64), got {seed!r}")
            self.seed = DEFAULT_SEED if seed is None else seed
        self._check_constants()

    @classmethod
    def parameter_names(cls) -> list[str]:
        names = super().parameter_names()
        if not cls.elect_signs:
            names.remove("consensus")
        if cls.sparsify not in ("random", "della"):
            names.remove("seed")
        if cls.sparsify != "della":
            names.remove("epsilon")
        if cls.sparsify != "outliers":
            names.remove("gamma")
        return names

    def _check_constants(self) -> None:
        """Validate what is the same for every tensor now, before any data is read."""
        for s in self._densities:
            if s.constant is not None:
                _check_density(s.constant, self.name)
        if self._consensus is not None and self._consensus.constant is not None:
            _check_choice(self._consensus.constant, CONSENSUS, f"{self.name}: consensus")
        if self._rescale.constant is not None:
            self._rule(self._rescale.constant)
        if all(s.constant == 1.0 for s in self._densities):
            self.warnings.append(f"{self.name}: density 1 keeps every delta entry; set a density below 1 "
                                 "to sparsify")

    # -- per tensor ---------------------------------------------------------------------------

    def prepare(self, tensor: TensorContext) -> SparseState:
        name, t = tensor.name, tensor.position
        state = SparseState(
            weights=[resolve_float(s, name, t, f"{self.name}: weight") for s in self._weights],
            densities=[_check_density(resolve_float(s, name, t, f"{self.name}: density"), self.name)
                       for s in self._densities],
            scale=resolve_float(self._lambda, name, t, f"{self.name}: lambda"),
            normalize=resolve_bool(self._normalize, name, t, f"{self.name}: normalize"),
            consensus=(_check_choice(resolve(self._consensus, name, t, f"{self.name}: consensus"), CONSENSUS,
                                     f"{self.name}: consensus") if self._consensus is not None else None),
            rescale=self._rule(resolve(self._rescale, name, t, f"{self.name}: rescale")),
        )
        if self.sparsify == "magnitude":
            state.selectors = [KthLargest(tensor.numel, math.floor(p * tensor.numel)) for p in state.densities]
            state.passes = 0 if all(s.done for s in state.selectors) else 2
        elif self.sparsify == "outliers":
            n = tensor.numel
            kept, outliers = [], []
            for p, g in zip(state.densities, self._gammas):
                gamma = _check_density(resolve_float(g, name, t, f"{self.name}: gamma"), self.name, "gamma")
                if p >= 1.0:  # mergekit returns the task vector untouched: no outliers dropped either
                    kept.append(KthLargest(n, n))
                    outliers.append(KthLargest(n, 0))
                    continue
                top = math.floor(gamma * n)
                bottom = n - math.floor(p * n) - top
                if bottom < 0:
                    top, bottom = top + bottom, 0
                kept.append(KthLargest(n, n - bottom))  # the n − bottom largest, less the top ones
                outliers.append(KthLargest(n, top))
            state.selectors = kept + outliers
            state.passes = 0 if all(s.done for s in state.selectors) else 2
        else:
            state.keys = [stream_key(self.seed, name, i) for i in range(self.n_models)]
            if self.sparsify == "della":
                if len(tensor.shape) > 2:
                    raise SpecError(f"{self.name}: tensor {name!r} has {len(tensor.shape)} dimensions; della ranks "
                                    "magnitudes per row of a matrix or vector")
                state.row_length = tensor.row_length
                state.epsilons = [resolve_float(e, name, t, f"{self.name}: epsilon") for e in self._epsilons]
                for p, e in zip(state.densities, state.epsilons):
                    if 0.0 < p < 1.0 and not (p - e > 0.0 and p + e < 1.0):
                        raise SpecError(f"{self.name}: epsilon {e:g} with density {p:g} for tensor {name!r}: "
                                        "density ± epsilon must lie in (0, 1)")
                state.rank_limits = [della_limits(p, e, state.row_length) if 0.0 < p < 1.0 else np.zeros(0, np.uint64)
                                     for p, e in zip(state.densities, state.epsilons)]
            state.limits = [keep_limit(p) for p in state.densities]
            if state.rescale == "l1" and any(p < 1.0 for p in state.densities):
                state.l1 = np.zeros((self.n_models, 2))
                state.passes = 1
        return state

    def reduce_passes(self, state: SparseState) -> int:
        if state.l1_pass is not None:  # the selection is done; one pass sums the L1 norms
            return state.l1_pass + 1
        if state.selectors:  # a selector whose sample misled it asks for two more passes
            return max((s.passes for s in state.selectors if not s.done), default=state.passes)
        return state.passes

    def runs_on_gpu(self) -> bool:
        """Whether ``--device cuda`` can run this merge: dare-linear whose rescale is "density"
        or "none" for every tensor needs no reduce pass, and the Triton backend has its
        per-element work (``dare_linear``). TIES's thresholds, DARE's L1 norms and sign
        election have no device version yet."""
        if self.sparsify != "random" or self.elect_signs:
            return False
        rule = self._rescale.constant
        return rule is not None and self._rule(rule) in ("density", "none")

    def _rule(self, value: Any) -> str:
        """The rescale rule: DARE takes density, l1 or none; magnitude selection l1 or none."""
        if self.sparsify == "random":
            return _rescale_rule(value, self.name)
        if value is True:
            return "l1"
        if value is False:
            return "none"
        return _check_choice(value, ("l1", "none"), f"{self.name}: rescale")

    def accumulate(self, state: SparseState, pass_index: int, base: np.ndarray, models: Sequence[np.ndarray],
                   chunk: ChunkContext) -> None:
        b32, d32 = scratch("sparse-reduce", 2, np.float32, COMBINE_BLOCK)
        (bits,) = scratch("sparse-bits", 1, np.uint32, COMBINE_BLOCK)
        (high,) = scratch("sparse-high", 1, np.intp, COMBINE_BLOCK)
        (keep,) = scratch("sparse-keep", 1, np.bool_, COMBINE_BLOCK)
        (spare,) = scratch("sparse-spare", 1, np.bool_, COMBINE_BLOCK)
        generator = _generator()
        l1 = np.zeros((len(models), 2))
        if state.selectors and pass_index == 0:  # the selectors' first pass looks at a sample
            self._accumulate_sample(state, base, models, state.selectors[0].sample_ranges(base.shape[0]))
            return
        l1_pass = pass_index == state.l1_pass
        with np.errstate(all="ignore"):
            for lo, hi in blocks(base.shape[0], COMBINE_BLOCK):
                k = hi - lo
                b, d = b32[:k], d32[:k]
                np.copyto(b, base[lo:hi], casting="unsafe")
                for i, model in enumerate(models):
                    np.copyto(d, model[lo:hi], casting="unsafe")
                    np.subtract(d, b, out=d)
                    if l1_pass:  # Σ|d| and Σ|d| over the entries the threshold keeps
                        if not state.trim(i, d, bits[:k], keep[:k], spare[:k]):
                            keep[:k] = True
                        np.abs(d, out=d)
                        l1[i, 0] += float(np.sum(d, dtype=np.float64))
                        l1[i, 1] += float(np.sum(d, where=keep[:k], dtype=np.float64))
                    elif state.selectors:
                        for selector in state.selectors[i :: len(models)]:  # add() changes the bits
                            selector.add(pass_index, magnitude_bits(d, bits[:k]), high[:k], keep[:k])
                    else:
                        np.abs(d, out=d)
                        l1[i, 0] += float(np.sum(d, dtype=np.float64))
                        self._random_keep(state, i, generator, chunk.first + lo, d, keep[:k])
                        l1[i, 1] += float(np.sum(d, where=keep[:k], dtype=np.float64))
        if not state.selectors or l1_pass:
            with state.lock:
                state.l1_parts[chunk.first] = l1

    def attach_reader(self, state: SparseState, reader: Any) -> None:
        if self.sparsify == "della":
            state.reader = reader

    def _random_keep(self, state: SparseState, i: int, generator: MaskGenerator, first: int, delta: np.ndarray,
                     keep: np.ndarray) -> np.ndarray:
        """Model i's random mask for elements [first, first + len(delta)): DARE's fixed
        probability, or DELLA's per-element one from the magnitude's rank in its row."""
        if self.sparsify != "della":
            return generator.keep(state.keys[i], first, state.limits[i], keep)
        p = state.densities[i]
        if p <= 0.0 or p >= 1.0:  # ρ ≥ 1 keeps dᵢ whole (its L1 factor is then never used)
            keep[:] = p > 0.0
            return keep
        (limits,) = scratch("della-limits", 1, np.uint64, COMBINE_BLOCK)
        _rank_limits(state, i, first, delta, limits[: keep.shape[0]])
        return np.less(generator.counters(state.keys[i], first, keep.shape[0]), limits[: keep.shape[0]], out=keep)

    @staticmethod
    def _accumulate_sample(state: SparseState, base: np.ndarray, models: Sequence[np.ndarray],
                           ranges: list[tuple[int, int]]) -> None:
        """Pass 0 of the TIES selection: the magnitude bits of the sampled ranges, gathered
        into one buffer per model so each selector counts them in one call."""
        b32, d32 = scratch("sparse-reduce", 2, np.float32, COMBINE_BLOCK)
        (bits,) = scratch("sparse-bits", 1, np.uint32, COMBINE_BLOCK)
        (high,) = scratch("sparse-high", 1, np.intp, COMBINE_BLOCK)
        (keep,) = scratch("sparse-keep", 1, np.bool_, COMBINE_BLOCK)
        pieces = [(lo + at, min(hi, lo + at + COMBINE_BLOCK)) for lo, hi in ranges
                  for at in range(0, hi - lo, COMBINE_BLOCK)]
        with np.errstate(all="ignore"):
            for i, model in enumerate(models):
                selectors = state.selectors[i :: len(models)]  # pass 0's add() leaves the bits as they are
                filled = 0
                for lo, hi in pieces:
                    k = hi - lo
                    if filled + k > COMBINE_BLOCK:
                        for selector in selectors:
                            selector.add(0, bits[:filled], high[:filled], keep[:filled])
                        filled = 0
                    b, d = b32[:k], d32[:k]
                    np.copyto(b, base[lo:hi], casting="unsafe")
                    np.copyto(d, model[lo:hi], casting="unsafe")
                    np.subtract(d, b, out=d)
                    magnitude_bits(d, bits[filled : filled + k])
                    filled += k
                if filled:
                    for selector in selectors:
                        selector.add(0, bits[:filled], high[:filled], keep[:filled])

    def end_pass(self, state: SparseState, pass_index: int) -> None:
        if pass_index != state.l1_pass:
            for selector in state.selectors:
                selector.end_pass(pass_index)
            if (state.selectors and state.rescale == "l1" and state.l1_pass is None
                    and all(s.done for s in state.selectors)):
                state.l1_pass = pass_index + 1
        if state.l1_parts:
            # Summed in chunk order, so the result does not depend on thread timing.
            state.l1 = sum(state.l1_parts[first] for first in sorted(state.l1_parts))
            state.l1_parts.clear()

    # -- per chunk ----------------------------------------------------------------------------

    def merge_chunk(self, backend: Any, base: np.ndarray, models: Sequence[np.ndarray], out: np.ndarray,
                    chunk: ChunkContext | None = None, state: SparseState | None = None) -> None:
        if state is None or chunk is None:
            raise ValueError(f"{self.name} needs the chunk's context and the tensor's state from the engine")
        n = len(models)
        factors = state.factors()
        if not self.elect_signs and state.normalize:
            total = sum(state.weights)
            if abs(total) >= 1e-8:
                factors = [f / total for f in factors]
        if backend.fuses_dare and self.sparsify == "random" and not self.elect_signs:
            # The Triton backend fuses drop, rescale and sum into one kernel that computes the
            # same bits as the numpy code below (kernels/triton_backend.py, dare_linear).
            backend.dare_linear(base, models, out, factors=factors, keys=state.keys, limits=state.limits,
                                first=chunk.first, scale=state.scale)
            return
        b32, acc, sigma, agree, total_w, *deltas = scratch("sparse-combine", n + 5, np.float32, COMBINE_BLOCK)
        (bits,) = scratch("sparse-bits", 1, np.uint32, COMBINE_BLOCK)
        (keep,) = scratch("sparse-keep", 1, np.bool_, COMBINE_BLOCK)
        (spare,) = scratch("sparse-spare", 1, np.bool_, COMBINE_BLOCK)
        scale = np.float32(state.scale)
        generator = _generator()
        with np.errstate(all="ignore"):  # inf − inf and 0/0 follow IEEE rules, not user errors
            for lo, hi in blocks(base.shape[0], COMBINE_BLOCK):
                k = hi - lo
                b = b32[:k]
                np.copyto(b, base[lo:hi], casting="unsafe")
                for i, model in enumerate(models):
                    d = deltas[i][:k]
                    np.copyto(d, model[lo:hi], casting="unsafe")
                    np.subtract(d, b, out=d)
                    # Dropping multiplies by the 0/1 mask: a masked copy branches on every
                    # element and is ~15x slower. (A dropped NaN delta stays NaN: NaN·0.)
                    if state.selectors and state.trim(i, d, bits[:k], keep[:k], spare[:k]):
                        np.multiply(d, keep[:k], out=d)
                    elif state.keys and state.limits[i] < 1 << 64:
                        self._random_keep(state, i, generator, chunk.first + lo, d, keep[:k])
                        np.multiply(d, keep[:k], out=d)
                    np.multiply(d, np.float32(factors[i]), out=d)
                if self.elect_signs:
                    self._elect(state, [d[:k] for d in deltas], acc[:k], sigma[:k], agree[:k], total_w[:k], keep[:k])
                else:
                    acc_k = acc[:k]
                    np.copyto(acc_k, deltas[0][:k])
                    for d in deltas[1:]:
                        np.add(acc_k, d[:k], out=acc_k)
                np.multiply(acc[:k], scale, out=acc[:k])
                np.add(acc[:k], b, out=acc[:k])
                np.copyto(out[lo:hi], acc[:k], casting="unsafe")  # one rounding, to nearest even

    @staticmethod
    def _elect(state: SparseState, deltas: list[np.ndarray], acc: np.ndarray, sigma: np.ndarray,
               agree: np.ndarray, total_w: np.ndarray, mask: np.ndarray) -> None:
        """acc = Σ of the weighted deltas agreeing with the elected sign (÷ their weights).

        Written with comparisons and products only (np.sign costs ~5 ns per element here), and
        with as few passes over the block as that allows: sums start from their first term, and
        each delta is tested through a product of its own, not flipped and flipped back.
        """
        if state.consensus == "sum":
            if len(deltas) == 1:
                np.copyto(acc, deltas[0])
            else:
                np.add(deltas[0], deltas[1], out=acc)
            for d in deltas[2:]:
                np.add(acc, d, out=acc)
        else:  # count: sign(e) = [e > 0] − [e < 0]
            acc.fill(0)
            for d in deltas:
                np.greater(d, np.float32(0), out=mask)
                np.add(acc, mask, out=acc)
                np.less(d, np.float32(0), out=mask)
                np.subtract(acc, mask, out=acc)
        np.greater_equal(acc, np.float32(0), out=mask)
        np.multiply(mask, np.float32(2), out=sigma)
        np.subtract(sigma, np.float32(1), out=sigma)  # σ = +1 / −1
        for i, (d, w) in enumerate(zip(deltas, state.weights)):
            np.multiply(d, sigma, out=agree)
            np.greater(agree, np.float32(0), out=mask)  # d·σ > 0 ⇔ this model agrees (zeros never do)
            if i == 0:
                np.multiply(d, mask, out=acc)
            else:
                np.multiply(d, mask, out=d)
                np.add(acc, d, out=acc)
            if state.normalize:
                if i == 0:
                    np.multiply(mask, np.float32(w), out=total_w)
                else:
                    np.multiply(mask, np.float32(w), out=d)  # d is consumed: reuse it for w·[agrees]
                    np.add(total_w, d, out=total_w)
        if state.normalize:
            np.equal(total_w, np.float32(0), out=mask)
            np.add(total_w, mask, out=total_w)  # a zero divisor counts as 1
            np.divide(acc, total_w, out=acc)

    def recipe(self) -> dict[str, Any]:
        recipe: dict[str, Any] = {
            "method": self.name,
            "weights": [s.to_json() for s in self._weights],
            "densities": [s.to_json() for s in self._densities],
            "lambda": self._lambda.to_json(),
            "normalize": self._normalize.to_json(),
        }
        if self.sparsify == "outliers":
            recipe["gammas"] = [s.to_json() for s in self._gammas]
        if self._consensus is not None:
            recipe["consensus"] = self._consensus.to_json()
        if self.sparsify == "random":
            recipe["rescale"] = self._rescale.to_json()
            recipe["seed"] = self.seed
        elif self._rescale.constant != "none":
            recipe["rescale"] = self._rescale.to_json()
        return recipe


def della_limits(density: float, epsilon: float, length: int) -> np.ndarray:
    """DELLA's keep limits by rank: entry c (0-based ascending rank in a row of ``length``) is
    ⌊(ρ − ε + 2ε·c/(m − 1))·2⁵³⌋·2¹¹ (uint64), compared with the generator's u; one-element
    rows take c/(m − 1) = 0. Computed once per tensor and model."""
    ranks = np.arange(length, dtype=np.float64) / (length - 1) if length > 1 else np.zeros(1)
    probability = (density - epsilon) + 2.0 * epsilon * ranks
    return np.floor(probability * 2.0**53).astype(np.uint64) << np.uint64(11)


def _rank_limits(state: SparseState, i: int, first: int, delta: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Model i's keep limit for each element [first, first + len(delta)) of the tensor: its
    magnitude's rank in its row (ties in index order) looked up in ``state.rank_limits[i]``.

    Rows wholly inside the range are ranked from ``delta``; a row the range cuts is read whole
    through the tensor's reader (at most two per call: memory stays one row per model)."""
    length, count = state.row_length, delta.shape[0]
    table = state.rank_limits[i]
    at = 0
    while at < count:
        start = first + at - (first + at) % length  # the row's first element in the tensor
        if start == first + at and count - at >= length:  # whole rows from here on: ranked together
            rows = (count - at) // length
            _limits_of_rows(delta[at : at + rows * length], length, table, out[at : at + rows * length])
            at += rows * length
            continue
        if state.reader is None:
            raise ValueError("della needs whole rows: the tensor's reader was not attached")
        views = state.reader(start, length)
        whole = views[1 + i].astype(np.float32) - views[0].astype(np.float32)
        row = np.empty(length, dtype=np.uint64)
        _limits_of_rows(whole, length, table, row)
        end = min(count, start + length - first)
        out[at:end] = row[first + at - start : end + first - start]
        at = end
    return out


def _limits_of_rows(delta: np.ndarray, length: int, table: np.ndarray, out: np.ndarray) -> None:
    """``out[j] = table[rank of |delta[j]| in its row]`` for whole rows of ``length`` (fp32 in).

    Sorts one uint64 key per entry, its magnitude's bit pattern above its position in ``delta``
    (keys are distinct and positions grow along a row, so the order is the stable one); the
    sorted keys' low words are then the positions that receive the table in rank order. Built
    through a uint32 view and scattered once: ~2x faster here than ranks in float64 turned into
    limits (measured 29 -> 15 ns per element with the generator, 64x4096 rows)."""
    n = delta.shape[0]
    rows = n // length
    (keys,) = scratch("della-keys", 1, np.uint64, n)
    words = keys[:n].view(np.uint32).reshape(n, 2)  # little-endian: [:, 0] low, [:, 1] high
    np.bitwise_and(delta.view(np.uint32), np.uint32(0x7FFFFFFF), out=words[:, 1])  # |delta|'s bits
    words[:, 0] = _positions(n)
    keys[:n].reshape(rows, length).sort(axis=1)
    out[words[:, 0]] = np.broadcast_to(table, (rows, length)).reshape(n)


_position_cache: dict[str, np.ndarray] = {}


def _positions(n: int) -> np.ndarray:
    """0, 1, …, n − 1 as uint32 (shared, read-only; grown on demand)."""
    cached = _position_cache.get("positions")
    if cached is None or cached.shape[0] < n:
        cached = np.arange(max(n, COMBINE_BLOCK), dtype=np.uint32)
        cached.flags.writeable = False
        _position_cache["positions"] = cached
    return cached[:n]


def _generator() -> MaskGenerator:
    generator = getattr(_local, "generator", None)
    if generator is None:
        generator = _local.generator = MaskGenerator(COMBINE_BLOCK)
    return generator


def _check_density(value: Any, method: str, what: str = "density") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise SpecError(f"{method}: {what} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise SpecError(f"{what}: expected one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _rescale_rule(value: Any, method: str) -> str:
    """DARE's rescale: "density" (1/p, also ``true``), "l1" (‖d‖₁-preserving), "none" (``false``)."""
    if value is True:
        return "density"
    if value is False:
        return "none"
    return _check_choice(value, RESCALES, f"{method}: rescale")
