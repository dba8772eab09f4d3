"""The Triton kernels against the numpy backend and a float64 reference.

Without a GPU they run under Triton's CPU interpreter on torch CPU tensors; on a machine with
a CUDA GPU (and TRITON_INTERPRET unset) the same tests run the compiled kernels on the GPU.
tests/triton_env.py switches the interpreter on only while kernels/triton_backend.py is
imported, so other test modules and the subprocesses they start never see it.
"""

from __future__ import annotations

import itertools
import sys

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from safeblend.kernels.numpy_backend import NumpyBackend  # noqa: E402
from tests.helpers import assert_within_tolerance  # noqa: E402
from tests import triton_env  # noqa: E402
from tests.triton_env import import_triton_backend, to_numpy  # noqa: E402


tb = import_triton_backend()
DEVICE = "cpu" if tb.INTERPRETED else "cuda"

NP = {"bf16": np.dtype(ml_dtypes.bfloat16), "fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32),
      "fp64": np.dtype(np.float64)}
TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
DTYPES = ["bf16", "fp16", "fp32"]
# 1 element; odd counts; one past the GPU block (4096) and past the interpreter's largest
# block (65536); several blocks with a ragged tail.
SIZES = [1, 7, 4097, 65537, 3 * 65536 + 123]


def to_torch(a: np.ndarray) -> "torch.Tensor":
    return triton_env.to_torch(a, DEVICE)


def inputs(rng: np.random.Generator, n: int, dtypes: list[str], scale: float = 0.05) -> list[np.ndarray]:
    """A base and fine-tunes of it: base ~ N(0, 1), each model = base + scale·N(0, 1)."""
    base = rng.standard_normal(n)
    arrays = [base.astype(NP[dtypes[0]])]
    for d in dtypes[1:]:
        arrays.append((base + scale * rng.standard_normal(n)).astype(NP[d]))
    return arrays


def reference(base: np.ndarray, models: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """base + Σ wᵢ·(mᵢ − base) in float64 on upcast inputs (unrounded)."""
    b = base.astype(np.float64)
    with np.errstate(all="ignore"):
        return b + sum(w * (m.astype(np.float64) - b) for m, w in zip(models, weights))


def run_both(base: np.ndarray, models: list[np.ndarray], weights: list[float], out_dtype: str):
    """(triton result, numpy backend result) for the same inputs."""
    out = torch.empty(base.shape[0], dtype=TORCH[out_dtype], device=DEVICE)
    tb.TritonBackend().weighted_delta_sum(to_torch(base), [to_torch(m) for m in models], weights, out)
    expected = np.empty(base.shape[0], dtype=NP[out_dtype])
    NumpyBackend().weighted_delta_sum(base, models, weights, expected)
    return to_numpy(out), expected


def assert_same_bits(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Bit-identical, except that NaN only has to meet NaN (payloads may differ)."""
    int_type = triton_env.INT_OF_WIDTH[got.dtype.itemsize]
    with np.errstate(invalid="ignore"):
        nan_got, nan_want = np.isnan(got.astype(np.float64)), np.isnan(want.astype(np.float64))
    same = (got.view(int_type) == want.view(int_type)) | (nan_got & nan_want)
    if not same.all():
        idx = np.flatnonzero(~same)[:5]
        details = ", ".join(f"[{i}] {float(got[i])!r} vs numpy {float(want[i])!r}" for i in idx)
        raise AssertionError(f"{what}: {int(np.sum(~same))} of {same.size} elements differ from numpy; {details}")


@pytest.mark.parametrize("base_dt,ft_dt,out_dt", list(itertools.product(DTYPES, DTYPES, DTYPES)))
def test_lerp_every_dtype_combination(base_dt, ft_dt, out_dt):
    rng = np.random.default_rng(hash((base_dt, ft_dt, out_dt)) % 2**32)
    for n in (1, 4097, 3 * 65536 + 123):
        base, ft = inputs(rng, n, [base_dt, ft_dt])
        got, want = run_both(base, [ft], [0.6], out_dt)
        what = f"{base_dt}+{ft_dt}->{out_dt} n={n}"
        assert_same_bits(got, want, what)
        assert_within_tolerance(got, reference(base, [ft], [0.6]), [base, ft], what)


@pytest.mark.parametrize("n", SIZES)
def test_sizes_around_the_block(n):
    rng = np.random.default_rng(n)
    base, ft = inputs(rng, n, ["bf16", "bf16"])
    got, want = run_both(base, [ft], [0.3], "bf16")
    assert_same_bits(got, want, f"n={n}")
    assert_within_tolerance(got, reference(base, [ft], [0.3]), [base, ft], f"n={n}")


@pytest.mark.parametrize("dtypes,weights", [
    (["bf16", "fp16"], [0.5]),
    (["bf16", "bf16", "fp32"], [0.4, 0.6]),
    (["fp32", "bf16", "fp16", "fp32"], [0.2, -0.3, 1.4]),
    (["bf16"] * 9, [0.125] * 8),  # eight models: one full pass
    (["bf16", *(["fp16", "bf16", "fp32"] * 3)], [0.1 * i - 0.2 for i in range(9)]),  # nine: two passes
    (["fp16"] * 18, [1 / 17] * 17),  # three passes
])
@pytest.mark.parametrize("out_dt", DTYPES)
def test_n_models_mixed_dtypes(dtypes, weights, out_dt):
    rng = np.random.default_rng(len(dtypes))
    arrays = inputs(rng, 65536 + 3, dtypes)
    got, want = run_both(arrays[0], arrays[1:], weights, out_dt)
    what = f"{len(weights)} models -> {out_dt}"
    assert_same_bits(got, want, what)
    ref = reference(arrays[0], arrays[1:], weights)
    if out_dt == "fp32" and len(weights) > 1:
        assert_fp32_evaluation_bound(got, ref, arrays[0], arrays[1:], weights, what)
    else:
        assert_within_tolerance(got, ref, arrays, what)


def assert_fp32_evaluation_bound(got, ref, base, models, weights, what) -> None:
    """Several models into fp32 output: the 1-ulp rule is finer than fp32 evaluation itself
    (each of the 2N+1 operations rounds), so bound the error by the standard forward-error
    estimate, (2N + 1)·2⁻²⁴·(|b| + Σ|wᵢ|·(|mᵢ| + |b|)). numpy gives the same bits (checked above)."""
    b = np.abs(base.astype(np.float64))
    magnitude = b + sum(abs(w) * (np.abs(m.astype(np.float64)) + b) for m, w in zip(models, weights))
    bound = (2 * len(weights) + 1) * 2.0**-24 * magnitude
    err = np.abs(got.astype(np.float64) - ref)
    assert np.all(err <= bound), f"{what}: {int(np.sum(err > bound))} elements beyond the fp32 evaluation bound"


@pytest.mark.parametrize("weight", [0.0, 1.0, -0.5, 1.7, 3.0, -2.25])
def test_weights_outside_unit_interval(weight):
    rng = np.random.default_rng(7)
    base, ft = inputs(rng, 70001, ["bf16", "bf16"], scale=0.5)
    got, want = run_both(base, [ft], [weight], "bf16")
    assert_same_bits(got, want, f"weight={weight}")
    assert_within_tolerance(got, reference(base, [ft], [weight]), [base, ft], f"weight={weight}")
    if weight in (0.0, 1.0):  # the endpoints reproduce an input exactly
        assert np.array_equal(got.view(np.int16), (base if weight == 0.0 else ft).view(np.int16))


@pytest.mark.parametrize("in_dt,out_dt", list(itertools.product(DTYPES, DTYPES)))
def test_nan_and_inf(in_dt, out_dt):
    specials = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0]
    pairs = np.array(list(itertools.product(specials, specials)), dtype=np.float64)
    base, ft = pairs[:, 0].astype(NP[in_dt]), pairs[:, 1].astype(NP[in_dt])
    got, want = run_both(base, [ft], [0.6], out_dt)
    assert_same_bits(got, want, f"{in_dt}->{out_dt}")
    assert_within_tolerance(got, reference(base, [ft], [0.6]), [base, ft], f"{in_dt}->{out_dt}")
    nan_bits = got[np.isnan(got.astype(np.float64))].view(triton_env.INT_OF_WIDTH[got.dtype.itemsize])
    quiet = {"bf16": 0x0040, "fp16": 0x0200, "fp32": 0x00400000}[out_dt]
    assert np.all(nan_bits & quiet), f"{out_dt}: NaN results must be quiet NaNs"


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_overflow_rounds_to_inf():
    big = np.array([3.0e38, -3.0e38, 65504.0, 65519.0, 65520.0], dtype=np.float32)
    ft = big * np.float32(1.1)  # fp32 inf for the first two
    for out_dt in ("bf16", "fp16", "fp32"):
        got, want = run_both(big, [ft], [2.0], out_dt)
        assert_same_bits(got, want, out_dt)
        assert_within_tolerance(got, reference(big, [ft], [2.0]), [big, ft], out_dt)


def test_fp64_operands_compute_in_fp64():
    rng = np.random.default_rng(3)
    base, ft = inputs(rng, 5000, ["fp64", "fp32"])
    for out_dt in ("fp64", "fp32"):
        got, want = run_both(base, [ft], [0.6], out_dt)
        assert_same_bits(got, want, out_dt)


def _tricky_fp32_bits() -> np.ndarray:
    """Bit patterns where rounding goes wrong: every bf16 value's ties and neighbours,
    subnormals, max finite, infinities and NaNs of both signs, quiet and signalling."""
    highs = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    named = np.array([
        0x00000000, 0x80000000, 0x00000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x00800000,
        0x3F808000, 0x3F818000, 0x3F7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7FFFFF,
        0x7F800000, 0xFF800000, 0x7F800001, 0x7FC00000, 0xFFC00000, 0x7FBFFFFF, 0xFF800001,
        0x7FFFFFFF, 0xFFFFFFFF, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x33000000, 0x33000001,
    ], dtype=np.uint32)
    return np.concatenate([(highs[:, None] | lows[None, :]).ravel(), named])


def test_bf16_rounding_matches_ml_dtypes_bit_for_bit():
    bits = _tricky_fp32_bits()
    x = bits.view(np.float32)
    got = to_numpy(tb.round_fp32(to_torch(x), torch.bfloat16)).view(np.uint16)
    with np.errstate(all="ignore"):
        want = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, (
        f"{bad.size} of {bits.size} patterns differ from ml_dtypes; first: "
        + ", ".join(f"{bits[i]:#010x} -> {got[i]:#06x} (want {want[i]:#06x})" for i in bad[:5])
    )


def test_fp16_rounding_matches_numpy_and_nan_is_quiet():
    bits = _tricky_fp32_bits()
    x = bits.view(np.float32)
    got = to_numpy(tb.round_fp32(to_torch(x), torch.float16)).view(np.uint16)
    with np.errstate(all="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    bad = np.flatnonzero((got != want) & ~nan)
    assert bad.size == 0, (
        f"{bad.size} patterns differ from numpy; first: "
        + ", ".join(f"{bits[i]:#010x} -> {got[i]:#06x} (want {want[i]:#06x})" for i in bad[:5])
    )
    # NaN: still NaN, quiet, sign kept (numpy's own cast may leave a signalling NaN).
    assert np.all((got[nan] & 0x7E00) == 0x7E00)
    assert np.array_equal(got[nan] & 0x8000, (bits[nan] >> 16).astype(np.uint16) & 0x8000)


def test_lerp_launcher_allocates_and_keeps_shape():
    rng = np.random.default_rng(11)
    base, ft = inputs(rng, 6 * 35, ["bf16", "fp32"])
    b, f = to_torch(base).reshape(6, 35), to_torch(ft).reshape(6, 35)
    out = tb.lerp(b, f, 0.25)
    assert out.shape == (6, 35) and out.dtype == torch.bfloat16
    want = tb.weighted_delta_sum(b, [f], [0.25], out_dtype=torch.bfloat16)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))
    assert tb.lerp(b, f, 0.25, out_dtype=torch.float32).dtype == torch.float32


def test_empty_input_is_a_no_op():
    empty = torch.empty(0, dtype=torch.bfloat16, device=DEVICE)
    assert tb.weighted_delta_sum(empty, [empty], [0.5]).numel() == 0


def test_operand_errors_name_the_problem():
    a = torch.zeros(8, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="one weight per model"):
        tb.weighted_delta_sum(a, [a, a], [0.5])
    with pytest.raises(ValueError, match=r"models\[0\]: 7 elements"):
        tb.weighted_delta_sum(a, [a[:7]], [0.5])
    with pytest.raises(TypeError, match="int32"):
        tb.weighted_delta_sum(a, [a.to(torch.int32)], [0.5])
    with pytest.raises(ValueError, match="contiguous"):
        tb.weighted_delta_sum(a.reshape(2, 4).t(), [a.reshape(2, 4).t()], [0.5])


def test_launch_settings():
    block, warps = tb.launch_settings(5)
    if tb.INTERPRETED:
        assert (block, warps) == (8, 1)
        assert tb.launch_settings(10**7)[0] == tb.INTERPRETER_MAX_BLOCK
    else:
        assert (block, warps) == (tb.GPU_BLOCK_SIZE, tb.GPU_NUM_WARPS)


def test_engine_does_not_import_torch_or_triton():
    """The CPU path must work without torch/triton: engine imports neither at module level."""
    import subprocess

    code = "import sys, safeblend, safeblend.api, safeblend.execute_cuda, safeblend.kernels; " \
           "print('torch' in sys.modules, 'triton' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
