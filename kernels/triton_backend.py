"""The GPU backend: fused Triton kernels for the merge arithmetic, one pass over memory.

One kernel does every linear-family merge: ``out = base + Σ wᵢ·(modelsᵢ − base)``. Each
program loads its block of every input once, in the input's stored dtype (bf16, fp16, fp32 or
fp64, mixed allowed), upcasts to fp32 (fp64 when any operand is fp64), sums the weighted deltas
in registers in the numpy backend's order, adds base, and rounds once into the output dtype.

Rounding is explicit wherever the CPU interpreter and the GPU could disagree: under
``TRITON_INTERPRET=1`` ``.to(tl.bfloat16)`` truncates, while the GPU rounds to nearest even.
``_fp32_to_bf16_bits`` rounds with integer ops instead (add 0x7FFF plus the lowest kept bit,
shift), so both give the bits ml_dtypes gives, NaN included. fp16 output uses
``.to(tl.float16)``, which rounds to nearest even on both (cvt.rn on the GPU, numpy's cast in
the interpreter; checked in tests/test_triton_kernels.py), with NaN made quiet explicitly.

The number of fine-tuned models is a ``tl.constexpr`` (1 to ``MAX_MODELS_PER_PASS``): each N
compiles to its own straight-line kernel with exactly N+1 loads, and N = 1 is the two-input
interpolation kernel (``lerp``). More models run as passes of up to eight through an fp32
accumulator, which keeps the summation order, and so the bits, of a single pass.

A second kernel does ``dare-linear``: the same sum with each delta multiplied by a 0/1 drop
mask and a per-model factor (``dare_linear``). The mask is safeblend.methods._rng's
counter-based generator re-implemented with uint64 ops (``_dare_keep``), so an element's
fate depends only on (seed, tensor name, model, element index), never on chunking or device.

Tensors are torch tensors: CUDA tensors on a GPU, CPU tensors under the interpreter. torch and
triton are imported here only; nothing in ``engine`` imports this module unless the CUDA path
was asked for.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import torch
import triton
import triton.language as tl

# Whether the kernels below were decorated for the CPU interpreter: triton decides that when
# ``@triton.jit`` runs, i.e. when this module is imported.
INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

MAX_MODELS_PER_PASS = 8

# GPU launch settings for a streaming, memory-bound kernel on Hopper (H100/H200). The aim is
# enough bytes in flight per SM to cover DRAM latency (Little's law: ~3.3 TB/s × ~0.6 µs ≈
# 2 MB across 132 SMs, ~16 KB per SM). A 4096-element block of bf16 is 8 KB per input, so
# lerp moves 24 KB per program, and 8 warps (256 threads × 16 elements = two 16-byte vector
# loads per thread per input) let two or more programs share an SM. Smaller blocks leave the
# memory system idle between waves; larger ones cost registers without adding bandwidth.
# Not yet measured on a card: benchmarks/bench_kernel.py sweeps the neighbours of this choice
# and prints the best, so retune here from its output.
GPU_BLOCK_SIZE = 4096
GPU_NUM_WARPS = 8
# The interpreter pays a fixed Python cost per program, so it wants the largest block that is
# still cheap in numpy (64K fp32 values = 256 KiB per temporary).
INTERPRETER_MAX_BLOCK = 1 << 16

# How the kernel stores its fp32 result (a constexpr, so each is its own compiled variant).
_OUT_PLAIN = 0  # fp32/fp64: tl.store's conversion (exact or RNE on both interpreter and GPU)
_OUT_BF16_BITS = 1  # explicit RNE to bf16, stored as int16 bits
_OUT_FP16_BITS = 2  # RNE via .to(float16), NaN made quiet, stored as int16 bits

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


@triton.jit
def _fp32_to_bf16_bits(x):
    """fp32 values → the int16 bit patterns of bf16, rounded to nearest even.

    Adding 0x7FFF plus the lowest kept bit carries into bit 16 exactly when the dropped half
    is above one half, or exactly one half with an odd kept part: round half to even. The
    carry may run into the exponent, which is right (1.99…→2, max finite→inf); ±inf has zero
    low bits and stays ±inf. NaN would round to inf, so it becomes the quiet NaN ml_dtypes
    produces, 0x7FC0 with the sign kept.
    """
    bits = x.to(tl.uint32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = (bits + 0x7FFF + lsb) >> 16
    quiet_nan = ((bits >> 16) & 0x8000) | 0x7FC0
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, quiet_nan, rounded).to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _fp32_to_fp16_bits(x):
    """fp32 values → the int16 bit patterns of fp16, rounded to nearest even, NaN quiet.

    ``.to(tl.float16)`` already rounds to nearest even with overflow to inf and subnormals
    (cvt.rn.f16.f32 on the GPU, numpy's cast in the interpreter); NaN gets the quiet bit set
    and its top payload bits kept, as x86 and CUDA conversions do, so it never turns into a
    signalling NaN.
    """
    bits = x.to(tl.uint32, bitcast=True)
    half = x.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    quiet_nan = ((bits >> 16) & 0x8000) | 0x7E00 | ((bits >> 13) & 0x3FF)
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return tl.where(is_nan, quiet_nan, half).to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _delta(base, model_ptr, w_ptr, i: tl.constexpr, offsets, mask, FP64: tl.constexpr):
    """``w[i]·(model − base)`` for one model, loaded once, upcast to the compute dtype."""
    model = tl.load(model_ptr + offsets, mask=mask, other=0, eviction_policy="evict_first")
    if FP64:
        model = model.to(tl.float64)
    else:
        model = model.to(tl.float32)
    weight = tl.load(w_ptr + i)
    return weight * (model - base)


@triton.jit
def _weighted_delta_sum_kernel(
    out_ptr,
    acc_ptr,
    base_ptr,
    m0_ptr, m1_ptr, m2_ptr, m3_ptr, m4_ptr, m5_ptr, m6_ptr, m7_ptr,
    w_ptr,
    n_elements,
    N_MODELS: tl.constexpr,
    HAS_ACC: tl.constexpr,
    ADD_BASE: tl.constexpr,
    OUT_KIND: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    # int64: a chunk (or a whole 128256×8192 embedding) can exceed 2³¹ elements.
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    # Every input is read exactly once; evict_first keeps the streams from thrashing L2.
    base = tl.load(base_ptr + offsets, mask=mask, other=0, eviction_policy="evict_first")
    if FP64:
        base = base.to(tl.float64)
    else:
        base = base.to(tl.float32)
    # Same order as the numpy backend: Σ wᵢ·(mᵢ − base) for i ascending, then + base. Launched
    # with enable_fp_fusion=False, so no FMA changes a rounding and the bits match the CPU's.
    acc = _delta(base, m0_ptr, w_ptr, 0, offsets, mask, FP64)
    if HAS_ACC:
        acc = tl.load(acc_ptr + offsets, mask=mask, other=0, eviction_policy="evict_first") + acc
    if N_MODELS > 1:
        acc += _delta(base, m1_ptr, w_ptr, 1, offsets, mask, FP64)
    if N_MODELS > 2:
        acc += _delta(base, m2_ptr, w_ptr, 2, offsets, mask, FP64)
    if N_MODELS > 3:
        acc += _delta(base, m3_ptr, w_ptr, 3, offsets, mask, FP64)
    if N_MODELS > 4:
        acc += _delta(base, m4_ptr, w_ptr, 4, offsets, mask, FP64)
    if N_MODELS > 5:
        acc += _delta(base, m5_ptr, w_ptr, 5, offsets, mask, FP64)
    if N_MODELS > 6:
        acc += _delta(base, m6_ptr, w_ptr, 6, offsets, mask, FP64)
    if N_MODELS > 7:
        acc += _delta(base, m7_ptr, w_ptr, 7, offsets, mask, FP64)
    if ADD_BASE:
        acc += base
    if OUT_KIND == 1:
        # fp64 compute reaching bf16 rounds twice (to fp32, then bf16); fp64 inputs are rare
        # and the result stays within the 1-ulp tolerance.
        tl.store(out_ptr + offsets, _fp32_to_bf16_bits(acc.to(tl.float32)), mask=mask)
    elif OUT_KIND == 2:
        tl.store(out_ptr + offsets, _fp32_to_fp16_bits(acc.to(tl.float32)), mask=mask)
    else:
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round_kernel(x_ptr, out_ptr, n_elements, OUT_KIND: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0)
    if OUT_KIND == 1:
        tl.store(out_ptr + offsets, _fp32_to_bf16_bits(x), mask=mask)
    else:
        tl.store(out_ptr + offsets, _fp32_to_fp16_bits(x), mask=mask)


# splitmix64's constants (engine/methods/_rng.py: kernels never import engine). Triton types an
# integer literal ≥ 2⁶³ as uint64, so the products below wrap modulo 2⁶⁴ as numpy's uint64 do.
_GAMMA = tl.constexpr(0x9E3779B97F4A7C15)
_MIX1 = tl.constexpr(0xBF58476D1CE4E5B9)
_MIX2 = tl.constexpr(0x94D049BB133111EB)

# A keep limit (safeblend.methods._rng.keep_limit) that keeps every element: density 1. It does
# not fit in uint64, so the host skips the mask for such a model instead of comparing.
KEEP_ALL = 1 << 64


@triton.jit
def _dare_keep(key, index, limit):
    """DARE's keep mask: ``mix(key + (index + 1)·γ) < limit``, mix = splitmix64's finaliser.

    ``key`` and ``limit`` are uint64 scalars, ``index`` the int64 element indices within the
    tensor (≥ 0). All arithmetic is uint64: multiplies wrap modulo 2⁶⁴ and ``>>`` is a logical
    shift, so the bits equal ``safeblend.methods._rng.MaskGenerator.keep``'s.
    """
    z = key + (index + 1).to(tl.uint64, bitcast=True) * _GAMMA
    z = (z ^ (z >> 30)) * _MIX1
    z = (z ^ (z >> 27)) * _MIX2
    z = z ^ (z >> 31)
    return z < limit


@triton.jit
def _dare_keep_kernel(out_ptr, stream_ptr, first, n_elements, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    key = tl.load(stream_ptr).to(tl.uint64, bitcast=True)
    limit = tl.load(stream_ptr + 1).to(tl.uint64, bitcast=True)
    keep = _dare_keep(key, first + offsets, limit)
    tl.store(out_ptr + offsets, keep.to(tl.int8), mask=offsets < n_elements)


@triton.jit
def _dare_delta(base, model_ptr, factor_ptr, stream_ptr, i: tl.constexpr, index, offsets, mask,
                DROP: tl.constexpr):
    """``factor[i]·keepᵢ·(model − base)`` for one model, in the order numpy's merge_chunk uses."""
    model = tl.load(model_ptr + offsets, mask=mask, other=0, eviction_policy="evict_first")
    delta = model.to(tl.float32) - base
    if (DROP >> i) & 1:
        key = tl.load(stream_ptr + 2 * i).to(tl.uint64, bitcast=True)
        limit = tl.load(stream_ptr + 2 * i + 1).to(tl.uint64, bitcast=True)
        # A product with the 0/1 mask, not tl.where, as on the CPU: a dropped negative delta
        # gives −0 and a dropped NaN or ±inf delta gives NaN, so the bits stay the same.
        delta = delta * _dare_keep(key, index, limit).to(tl.float32)
    return delta * tl.load(factor_ptr + i)


@triton.jit
def _dare_linear_kernel(
    out_ptr,
    acc_ptr,
    base_ptr,
    m0_ptr, m1_ptr, m2_ptr, m3_ptr, m4_ptr, m5_ptr, m6_ptr, m7_ptr,
    factor_ptr,
    scale_ptr,
    stream_ptr,
    first,
    n_elements,
    N_MODELS: tl.constexpr,
    DROP: tl.constexpr,
    HAS_ACC: tl.constexpr,
    LAST: tl.constexpr,
    OUT_KIND: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    # The element's index in the whole tensor is the generator's counter: chunking and block
    # size change which program computes an element, never its mask.
    index = first + offsets
    base = tl.load(base_ptr + offsets, mask=mask, other=0, eviction_policy="evict_first").to(tl.float32)
    # numpy's order (engine/methods/_sparse.py, merge_chunk): Σ fᵢ·keepᵢ·(mᵢ − b) for i
    # ascending, then ·λ, then + b; no FMA (enable_fp_fusion=False), so every rounding matches.
    acc = _dare_delta(base, m0_ptr, factor_ptr, stream_ptr, 0, index, offsets, mask, DROP)
    if HAS_ACC:
        acc = tl.load(acc_ptr + offsets, mask=mask, other=0, eviction_policy="evict_first") + acc
    if N_MODELS > 1:
        acc += _dare_delta(base, m1_ptr, factor_ptr, stream_ptr, 1, index, offsets, mask, DROP)
    if N_MODELS > 2:
        acc += _dare_delta(base, m2_ptr, factor_ptr, stream_ptr, 2, index, offsets, mask, DROP)
    if N_MODELS > 3:
        acc += _dare_delta(base, m3_ptr, factor_ptr, stream_ptr, 3, index, offsets, mask, DROP)
    if N_MODELS > 4:
        acc += _dare_delta(base, m4_ptr, factor_ptr, stream_ptr, 4, index, offsets, mask, DROP)
    if N_MODELS > 5:
        acc += _dare_delta(base, m5_ptr, factor_ptr, stream_ptr, 5, index, offsets, mask, DROP)
    if N_MODELS > 6:
        acc += _dare_delta(base, m6_ptr, factor_ptr, stream_ptr, 6, index, offsets, mask, DROP)
    if N_MODELS > 7:
        acc += _dare_delta(base, m7_ptr, factor_ptr, stream_ptr, 7, index, offsets, mask, DROP)
    if LAST:
        acc = acc * tl.load(scale_ptr)
        acc = acc + base
        if OUT_KIND == 1:
            tl.store(out_ptr + offsets, _fp32_to_bf16_bits(acc), mask=mask)
        elif OUT_KIND == 2:
            tl.store(out_ptr + offsets, _fp32_to_fp16_bits(acc), mask=mask)
        else:
            tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + offsets, acc, mask=mask)  # the fp32 running sum, for the next pass


def launch_settings(n_elements: int) -> tuple[int, int]:
    """``(BLOCK_SIZE, num_warps)`` for an elementwise launch over ``n_elements``."""
    if INTERPRETED:
        return min(INTERPRETER_MAX_BLOCK, triton.next_power_of_2(max(1, n_elements))), 1
    return GPU_BLOCK_SIZE, GPU_NUM_WARPS


def weighted_delta_sum(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    out: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    block_size: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """``out = base + Σ weights[i]·(models[i] − base)``, fp32 math, one RNE rounding.

    Args:
        base: the base tensor (any shape, contiguous); bf16, fp16, fp32 or fp64.
        models: one or more tensors of base's element count, each in any of those dtypes.
        weights: one weight per model; never rounded to a tensor dtype.
        out: where to write (contiguous, same element count); allocated when None.
        out_dtype: dtype of an allocated ``out`` (default: base's).
        block_size, num_warps: override ``launch_settings`` (for benchmarks).

    Returns:
        ``out``, shaped like base when allocated here.

    Example:
        >>> merged = weighted_delta_sum(base, [ft], [0.6])  # doctest: +SKIP
    """
    if out is None:
        out = torch.empty_like(base, dtype=out_dtype or base.dtype)
    _check_operands(base, models, weights, out)
    n = base.numel()
    if n == 0:
        return out
    fp64 = any(t.dtype == torch.float64 for t in (base, *models, out))
    compute = torch.float64 if fp64 else torch.float32
    block, warps = launch_settings(n)
    block, warps = block_size or block, num_warps or warps
    flat_base = base.reshape(-1)
    flat_models = [m.reshape(-1) for m in models]
    w = _weights_tensor(weights, compute, base.device)
    final_kind, final_out = _output_view(out.reshape(-1))
    # Passes of up to eight models; between passes the running Σ wᵢ·(mᵢ − base) lives in a
    # compute-dtype scratch buffer and the last pass adds base, so N > 8 gives the same bits
    # as one long pass would.
    passes = _model_passes(len(models))
    scratch = torch.empty(n, dtype=compute, device=base.device) if len(passes) > 1 else None
    for p, indices in enumerate(passes):
        last = p == len(passes) - 1
        kind, target = (final_kind, final_out) if last else (_OUT_PLAIN, scratch)
        pointers = [flat_models[i] for i in indices]
        pointers += [flat_base] * (MAX_MODELS_PER_PASS - len(pointers))  # unused slots
        _launch(
            _weighted_delta_sum_kernel,
            triton.cdiv(n, block),
            target,
            scratch if p > 0 else flat_base,
            flat_base,
            *pointers,
            w[indices[0]:],
            n,
            N_MODELS=len(indices),
            HAS_ACC=p > 0,
            ADD_BASE=last,
            OUT_KIND=kind,
            FP64=fp64,
            BLOCK_SIZE=block,
            num_warps=warps,
        )
    return out


def lerp(
    base: torch.Tensor,
    model: torch.Tensor,
    weight: float,
    out: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    block_size: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Two-input interpolation ``(1 − λ)·base + λ·model``, computed as ``base + λ·(model − base)``.

    The N = 1 specialisation of the weighted-delta-sum kernel: two loads, one store.
    """
    return weighted_delta_sum(base, [model], [weight], out, out_dtype=out_dtype,
                              block_size=block_size, num_warps=num_warps)


def dare_linear(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    factors: Sequence[float],
    keys: Sequence[int],
    limits: Sequence[int],
    out: torch.Tensor | None = None,
    *,
    first: int = 0,
    scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
    block_size: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """DARE with a linear combination: ``out = base + scale·Σ factors[i]·keepᵢ·(models[i] − base)``.

    Bit for bit what ``dare-linear``'s numpy path computes (engine/methods/_sparse.py,
    ``merge_chunk``): in fp32, dᵢ = mᵢ − b, times the 0/1 mask, times fᵢ, summed for i
    ascending, times λ, plus b, rounded once (RNE) to out's dtype. The mask is
    ``keepᵢⱼ = mix(keys[i] + (first + j + 1)·γ) < limits[i]`` (safeblend.methods._rng).
    fp64 inputs are rounded to fp32 first, as on the CPU.

    Args:
        base, models, out, out_dtype: as for ``weighted_delta_sum``.
        factors: per model, what multiplies a kept delta; wᵢ/ρᵢ with the DARE paper's rescale
            (``SparseState.factors``, ÷ Σ w with normalize). Rounded to fp32 once.
        keys: per model, its stream key (``stream_key(seed, name, i)``), in [0, 2⁶⁴).
        limits: per model, ``keep_limit(ρᵢ)``, in [0, 2⁶⁴]; ``KEEP_ALL`` (2⁶⁴) applies no
            mask, 0 drops every element.
        first: index of base's first element within the whole tensor (the chunk's offset).
        scale: λ, applied to the sum.
        block_size, num_warps: override ``launch_settings`` (for benchmarks).

    Returns:
        ``out``, shaped like base when allocated here.

    Example:
        >>> dare_linear(base, [ft], [0.6 / 0.3], [key], [keep_limit(0.3)], first=4096)  # doctest: +SKIP
    """
    if out is None:
        out = torch.empty_like(base, dtype=out_dtype or base.dtype)
    _check_operands(base, models, factors, out)
    _check_streams(len(models), keys, limits, first, base.numel())
    n = base.numel()
    if n == 0:
        return out
    block, warps = launch_settings(n)
    block, warps = block_size or block, num_warps or warps
    flat_base = base.reshape(-1)
    flat_models = [m.reshape(-1) for m in models]
    coefficients = _weights_tensor([*factors, scale], torch.float32, base.device)  # f₀ … fₙ₋₁, λ
    streams = _streams_tensor(keys, limits, base.device)
    final_kind, final_out = _output_view(out.reshape(-1))
    # More than eight models: passes through an fp32 running sum, as weighted_delta_sum does.
    passes = _model_passes(len(models))
    scratch = torch.empty(n, dtype=torch.float32, device=base.device) if len(passes) > 1 else None
    for p, indices in enumerate(passes):
        last = p == len(passes) - 1
        kind, target = (final_kind, final_out) if last else (_OUT_PLAIN, scratch)
        pointers = [flat_models[i] for i in indices]
        pointers += [flat_base] * (MAX_MODELS_PER_PASS - len(pointers))  # unused slots
        # Bit k: model indices[k] is masked. A constexpr, so a density-1 model costs no hashing.
        drop = sum(1 << k for k, i in enumerate(indices) if limits[i] < KEEP_ALL)
        _launch(
            _dare_linear_kernel,
            triton.cdiv(n, block),
            target,
            scratch if p > 0 else flat_base,
            flat_base,
            *pointers,
            coefficients[indices[0]:],
            coefficients[len(models):],
            streams[2 * indices[0]:],
            first,
            n,
            N_MODELS=len(indices),
            DROP=drop,
            HAS_ACC=p > 0,
            LAST=last,
            OUT_KIND=kind,
            BLOCK_SIZE=block,
            num_warps=warps,
        )
    return out


def dare_keep_mask(key: int, limit: int, n: int, *, first: int = 0, device: str | torch.device = "cpu",
                   block_size: int | None = None) -> torch.Tensor:
    """Elements [first, first + n) of one DARE keep mask (bool), from the kernels' generator.

    Exposed for tests: ``safeblend.methods._rng.MaskGenerator.keep`` gives the same bits on the
    CPU. ``limit`` = ``KEEP_ALL`` (2⁶⁴) is all True, handled here, as numpy does.

    Example:
        >>> dare_keep_mask(stream_key(0, "w", 0), keep_limit(0.5), 8, first=1 << 40)  # doctest: +SKIP
    """
    _check_streams(1, [key], [limit], first, n)
    if limit >= KEEP_ALL:
        return torch.ones(n, dtype=torch.bool, device=device)
    out = torch.empty(n, dtype=torch.int8, device=device)
    if n:
        block, warps = launch_settings(n)
        block = block_size or block
        _launch(_dare_keep_kernel, triton.cdiv(n, block), out, _streams_tensor([key], [limit], out.device),
                first, n, BLOCK_SIZE=block, num_warps=warps)
    return out.view(torch.bool)


def round_fp32(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 → bf16 or fp16 with exactly the kernels' output rounding (exposed for tests).

    Example:
        >>> round_fp32(torch.tensor([1.00390625]), torch.bfloat16)  # a tie: to even, 1.0  # doctest: +SKIP
    """
    if x.dtype != torch.float32:
        raise TypeError(f"round_fp32 needs float32 input, got {x.dtype}")
    if dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"round_fp32 rounds to bfloat16 or float16, not {dtype}")
    flat = x.reshape(-1)
    out = torch.empty(flat.shape, dtype=dtype, device=x.device)
    kind, bits = _output_view(out)
    n = flat.numel()
    if n:
        block, warps = launch_settings(n)
        _launch(_round_kernel, triton.cdiv(n, block), flat, bits, n, OUT_KIND=kind, BLOCK_SIZE=block,
                num_warps=warps)
    return out.reshape(x.shape)


class TritonBackend:
    """The Backend protocol on torch tensors (CUDA, or CPU under the interpreter)."""

    name = "triton"
    fuses_dare = True

    def __init__(self, block_size: int | None = None, num_warps: int | None = None) -> None:
        self.block_size = block_size
        self.num_warps = num_warps

    def weighted_delta_sum(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float], out: torch.Tensor
    ) -> None:
        """``out = base + Σ weights[i]·(models[i] − base)``; see the module docstring."""
        weighted_delta_sum(base, models, weights, out, block_size=self.block_size, num_warps=self.num_warps)

    def lerp(self, base: torch.Tensor, model: torch.Tensor, weight: float, out: torch.Tensor) -> None:
        """``out = base + weight·(model − base)``."""
        lerp(base, model, weight, out, block_size=self.block_size, num_warps=self.num_warps)

    def dare_linear(
        self, base: torch.Tensor, models: Sequence[torch.Tensor], out: torch.Tensor, *, factors: Sequence[float],
        keys: Sequence[int], limits: Sequence[int], first: int, scale: float
    ) -> None:
        """DARE's drop, rescale and sum on one chunk, fused: ``out = base + scale·Σ fᵢ·keepᵢ·(mᵢ − base)``.

        Used by ``dare-linear``'s merge_chunk (engine/methods/_sparse.py) with its state's
        factors, stream keys and keep limits; see the module function ``dare_linear``.
        """
        dare_linear(base, models, factors, keys, limits, out, first=first, scale=scale,
                    block_size=self.block_size, num_warps=self.num_warps)


def _launch(kernel, programs: int, *args, **kwargs) -> None:
    # No FMA contraction: the CPU path rounds the product and the sum separately.
    kwargs["enable_fp_fusion"] = False
    if INTERPRETED:
        # The interpreter evaluates with numpy, which warns on inf − inf and fp16 overflow;
        # those are the specified IEEE results here, not errors.
        import numpy as np

        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            kernel[(programs,)](*args, **kwargs)
    else:
        kernel[(programs,)](*args, **kwargs)


def _model_passes(n_models: int) -> list[list[int]]:
    """Model indices in passes of at most ``MAX_MODELS_PER_PASS``."""
    return [list(range(i, min(i + MAX_MODELS_PER_PASS, n_models))) for i in range(0, n_models, MAX_MODELS_PER_PASS)]


_weights_cache: dict[tuple, torch.Tensor] = {}


def _weights_tensor(weights: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The weights as a small device tensor in the compute dtype, cached per value.

    Kernel scalar arguments are fp32 only; a tensor keeps fp64 weights exact for fp64 merges,
    and caching means one host→device copy per run, not one per chunk.
    """
    key = (tuple(float(w) for w in weights), dtype, str(device))
    tensor = _weights_cache.get(key)
    if tensor is None:
        if len(_weights_cache) > 64:
            _weights_cache.clear()
        tensor = torch.tensor(key[0], dtype=dtype, device=device)
        _weights_cache[key] = tensor
    return tensor


_streams_cache: dict[tuple, torch.Tensor] = {}


def _streams_tensor(keys: Sequence[int], limits: Sequence[int], device: torch.device) -> torch.Tensor:
    """Keys and keep limits interleaved, ``[k₀, l₀, k₁, l₁, …]``, as int64 bit patterns on ``device``.

    The kernels read them and bitcast to uint64. Not scalar arguments: triton types an int
    argument by its value (i32, i64 or u64, and 1 becomes a constant), while a load is the
    same for every key, ≥ 2⁶³ included. Cached like the weights: one copy per tensor, not per
    chunk. A ``KEEP_ALL`` limit is stored as 0 and never read (that model has no mask).
    """
    key = (tuple(keys), tuple(limits), str(device))
    tensor = _streams_cache.get(key)
    if tensor is None:
        if len(_streams_cache) > 64:
            _streams_cache.clear()
        values = []
        for k, limit in zip(keys, limits):
            values += [k, 0 if limit >= KEEP_ALL else limit]
        signed = [v - (1 << 64) if v >= 1 << 63 else v for v in values]  # same 64 bits, as int64
        tensor = torch.tensor(signed, dtype=torch.int64, device=device)
        _streams_cache[key] = tensor
    return tensor


def _check_streams(n_models: int, keys: Sequence[int], limits: Sequence[int], first: int, n: int) -> None:
    if len(keys) != n_models or len(limits) != n_models:
        raise ValueError(f"need one key and one keep limit per model, got {n_models} models, "
                         f"{len(keys)} keys, {len(limits)} limits")
    for i, (k, limit) in enumerate(zip(keys, limits)):
        if not 0 <= k < 1 << 64:
            raise ValueError(f"keys[{i}] = {k} is not an unsigned 64-bit integer")
        if not 0 <= limit <= KEEP_ALL:
            raise ValueError(f"limits[{i}] = {limit} is outside [0, 2^64]")
    if first < 0 or first + n >= 1 << 63:
        raise ValueError(f"first = {first}: element indices must lie in [0, 2^63)")


def _output_view(out: torch.Tensor) -> tuple[int, torch.Tensor]:
    """How the kernel stores into ``out``, and the view it stores through."""
    if out.dtype == torch.bfloat16:
        return _OUT_BF16_BITS, out.view(torch.int16)
    if out.dtype == torch.float16:
        return _OUT_FP16_BITS, out.view(torch.int16)
    return _OUT_PLAIN, out


def _check_operands(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[float],
                    out: torch.Tensor) -> None:
    if not models or len(models) != len(weights):
        raise ValueError(f"need one weight per model, got {len(models)} models, {len(weights)} weights")
    for what, t in (("base", base), *((f"models[{i}]", m) for i, m in enumerate(models)), ("out", out)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{what}: dtype {t.dtype} is not one of bf16, fp16, fp32, fp64")
        if t.numel() != base.numel():
            raise ValueError(f"{what}: {t.numel()} elements, but base has {base.numel()}")
        if t.device != base.device:
            raise ValueError(f"{what} is on {t.device}, base on {base.device}")
        if not t.is_contiguous():
            raise ValueError(f"{what}: must be contiguous")
