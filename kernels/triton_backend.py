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
    passes = [list(range(i, min(i + MAX_MODELS_PER_PASS, len(models))))
              for i in range(0, len(models), MAX_MODELS_PER_PASS)]
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
