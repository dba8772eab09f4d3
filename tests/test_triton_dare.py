"""DARE on the Triton path: the drop mask and the fused dare-linear kernel.

The mask must be the CPU's bit for bit (safeblend.methods._rng.MaskGenerator.keep), for any key,
offset and density, so that the same --seed gives the same merge on either device and for
any chunking. The kernel must give the numpy engine's bits (``dare-linear``'s merge_chunk)
and stay within the tolerance of safeblend.tolerance of a float64 reference written here from the formula,
with the generator re-implemented from its specification (engine/methods/_rng.py docstring).

Under Triton's CPU interpreter unless a CUDA GPU is present (tests/triton_env.py); sizes stay
near 100K–200K elements because the interpreter is slow.
"""

from __future__ import annotations

import itertools
import zlib

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import safeblend  # noqa: E402
import safeblend.api  # noqa: E402
from safeblend.methods import create_method  # noqa: E402
from safeblend.methods._rng import MaskGenerator, keep_limit, stream_key  # noqa: E402
from safeblend.methods.base import ChunkContext, TensorContext  # noqa: E402
from safeblend.kernels.numpy_backend import NumpyBackend  # noqa: E402
from tests.helpers import assert_within_tolerance, load_checkpoint, write_checkpoint  # noqa: E402
from tests import triton_env  # noqa: E402
from tests.triton_env import import_triton_backend, to_numpy  # noqa: E402

tb = import_triton_backend()
DEVICE = "cpu" if tb.INTERPRETED else "cuda"

NP = {"bf16": np.dtype(ml_dtypes.bfloat16), "fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32)}
TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPES = list(NP)
NAME = "model.layers.3.mlp.down_proj.weight"
BIG = 1 << 16  # the interpreter's largest block (tb.INTERPRETER_MAX_BLOCK)


def to_torch(a: np.ndarray) -> "torch.Tensor":
    return triton_env.to_torch(a, DEVICE)


def assert_same_bits(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Bit-identical, except that NaN only has to meet NaN (payloads may differ)."""
    int_type = triton_env.INT_OF_WIDTH[got.dtype.itemsize]
    with np.errstate(invalid="ignore"):
        nan_both = np.isnan(got.astype(np.float64)) & np.isnan(want.astype(np.float64))
    same = (got.view(int_type) == want.view(int_type)) | nan_both
    if not same.all():
        idx = np.flatnonzero(~same)[:5]
        details = ", ".join(f"[{i}] {float(got[i])!r} vs numpy {float(want[i])!r}" for i in idx)
        raise AssertionError(f"{what}: {int(np.sum(~same))} of {same.size} elements differ from numpy; {details}")


# -- the generator, re-implemented from its specification -------------------------------------

_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


def _mix(z: np.ndarray) -> np.ndarray:
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _mix_int(z: int) -> int:
    return int(_mix(np.array([z & _M64], dtype=np.uint64))[0])


def ref_key(seed: int, name: str, model: int) -> int:
    h = 0xCBF29CE484222325
    for byte in name.encode():
        h = ((h ^ byte) * 0x100000001B3) & _M64
    return _mix_int(_mix_int(_mix_int(seed + _GAMMA) ^ h) + (model + 1) * _GAMMA)


def ref_keep(seed: int, name: str, model: int, first: int, n: int, density: float) -> np.ndarray:
    """keep_j = u_j < ⌊p·2⁵³⌋·2¹¹, written here as (u_j >> 11) < ⌊p·2⁵³⌋."""
    if density >= 1:
        return np.ones(n, dtype=bool)
    j = np.arange(first, first + n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        u = _mix(np.uint64(ref_key(seed, name, model)) + (j + np.uint64(1)) * np.uint64(_GAMMA))
    return (u >> np.uint64(11)) < np.uint64(int(density * 2**53))


def ref_dare_linear(base, models, weights, densities, seed, name, first=0, scale=1.0) -> np.ndarray:
    """θ = b + λ·Σ wᵢ·keepᵢ·(mᵢ − b)/ρᵢ in float64 (unrounded); a dropped ±inf/NaN delta is NaN,
    as IEEE 0·inf is."""
    b = base.astype(np.float64)
    total = np.zeros_like(b)
    with np.errstate(all="ignore"):
        for i, (m, w, p) in enumerate(zip(models, weights, densities)):
            keep = ref_keep(seed, name, i, first, b.size, p)
            rescale = 1.0 if p >= 1 else (1.0 / p if p > 0 else 0.0)
            total += w * rescale * (keep * (m.astype(np.float64) - b))
        return b + scale * total


def eval_magnitude(base, models, weights, densities, scale=1.0) -> np.ndarray:
    """|b| + |λ|·Σ|wᵢ/ρᵢ|·(|mᵢ| + |b|): what fp32 evaluation errors are relative to."""
    b = np.abs(base.astype(np.float64))
    terms = sum(abs(w / p if 0 < p < 1 else w) * (np.abs(m.astype(np.float64)) + b)
                for m, w, p in zip(models, weights, densities))
    return b + abs(scale) * terms


def assert_near_reference(got, ref, base, models, weights, densities, what, scale=1.0) -> None:
    """The tolerance rule (safeblend.tolerance), with the absolute term sized for this formula: 1 ulp of the output
    dtype, or (2N + 3)·2⁻²⁴ of the operands' magnitude (the 2N + 3 fp32 roundings of N
    subtractions and products by fᵢ, N − 1 sums, ·λ and + b; 1 ulp of fp32 is finer than that)."""
    n = len(models)
    # assert_within_tolerance's absolute term is 2⁻²²·max|inputs|: pass a scaled magnitude.
    bound_scale = (2 * n + 3) / 4 * eval_magnitude(base, models, weights, densities, scale)
    assert_within_tolerance(got, ref, [base, *models, bound_scale], what)


def inputs(rng: np.random.Generator, n: int, dtypes: list[str], spread: float = 0.05) -> list[np.ndarray]:
    """A base ~ N(0, 1) and fine-tunes of it, base + spread·N(0, 1), in the given dtypes."""
    base = rng.standard_normal(n)
    arrays = [base.astype(NP[dtypes[0]])]
    for d in dtypes[1:]:
        arrays.append((base + spread * rng.standard_normal(n)).astype(NP[d]))
    return arrays


def engine_dare_linear(base, models, out_dt, chunk: int, first: int = 0, **params) -> tuple[np.ndarray, object]:
    """The numpy engine's dare-linear over [first, first + n) of tensor NAME, in chunks of
    ``chunk`` elements; returns the output and the method (for its state)."""
    method = create_method("dare-linear", len(models), **params)
    context = TensorContext(NAME, first + base.size)
    state = method.prepare(context)
    assert method.reduce_passes(state) == 0
    out = np.empty(base.size, NP[out_dt])
    for lo in range(0, base.size, chunk):
        hi = min(base.size, lo + chunk)
        method.merge_chunk(NumpyBackend(), base[lo:hi], [m[lo:hi] for m in models], out[lo:hi],
                           ChunkContext(context, first + lo), state)
    return out, method


def triton_dare_linear(base, models, out_dt, chunk: int, method, first: int = 0) -> np.ndarray:
    """The fused kernel on the same tensor, in chunks of ``chunk`` elements, through the same
    method state (factors, keys, limits) as the engine's run."""
    state = method.prepare(TensorContext(NAME, first + base.size))
    factors = state.factors()
    if state.normalize and abs(sum(state.weights)) >= 1e-8:
        factors = [f / sum(state.weights) for f in factors]
    b, ms = to_torch(base), [to_torch(m) for m in models]
    out = torch.empty(base.size, dtype=TORCH[out_dt], device=DEVICE)
    backend = tb.TritonBackend()
    for lo in range(0, base.size, chunk):
        hi = min(base.size, lo + chunk)
        backend.dare_linear(b[lo:hi], [m[lo:hi] for m in ms], out[lo:hi], factors=factors, keys=state.keys,
                            limits=state.limits, first=first + lo, scale=state.scale)
    return to_numpy(out)


# -- the mask --------------------------------------------------------------------------------

KEYS = [
    stream_key(0, NAME, 0),
    stream_key(2**64 - 1, NAME, 5),  # the largest seed
    0,
    1,
    2**63 - 1,
    2**63,  # the sign bit alone: mishandled as int64 it would flip additions and comparisons
    2**64 - 1,
]
FIRSTS = [0, 1, 4097, 2**31 + 3, 2**32 + 7, 2**40 + 12345]
# Densities: the usual, the edges (nothing kept, everything kept), the smallest and largest
# representable below 1; and raw limits on both sides of 2⁶³, where a signed compare breaks.
DENSITIES = [0.1, 0.5, 0.9, 0.0, 1.0, 2.0**-53, 1.0 - 2.0**-53]
RAW_LIMITS = [1, 2**63 - 1, 2**63, 2**63 + 2048, 2**64 - 1]


@pytest.mark.parametrize("first", FIRSTS)
@pytest.mark.parametrize("key", KEYS, ids=lambda k: f"{k:#x}")
def test_keep_mask_matches_mask_generator(key, first):
    n = BIG + 4097  # two blocks, the second ragged
    generator = MaskGenerator(n)
    limits = [keep_limit(p) for p in DENSITIES] + RAW_LIMITS
    for limit in limits:
        got = tb.dare_keep_mask(key, limit, n, first=first, device=DEVICE).cpu().numpy()
        want = generator.keep(key, first, limit, np.empty(n, dtype=bool))
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, (f"key {key:#x}, first {first}, limit {limit:#x}: {bad.size} of {n} differ; "
                               f"first at {bad[:5].tolist()}")
    # Not vacuous: half kept at density 0.5, none at 0, all at 1.
    half = tb.dare_keep_mask(key, keep_limit(0.5), n, first=first, device=DEVICE).cpu().numpy()
    assert 0.48 < half.mean() < 0.52
    assert not tb.dare_keep_mask(key, 0, n, first=first, device=DEVICE).cpu().numpy().any()
    assert tb.dare_keep_mask(key, tb.KEEP_ALL, n, first=first, device=DEVICE).cpu().numpy().all()


@pytest.mark.parametrize("n", [1, 7, 4097, BIG + 1, 3 * BIG + 123])
def test_keep_mask_for_sizes_and_blocks(n):
    """Sizes that are not multiples of the block, with the default and a small block: the
    mask of an element depends on its index only."""
    key, limit, first = stream_key(7, NAME, 1), keep_limit(0.3), 2**33 + 1
    want = MaskGenerator(n).keep(key, first, limit, np.empty(n, dtype=bool))
    np.testing.assert_array_equal(tb.dare_keep_mask(key, limit, n, first=first, device=DEVICE).cpu().numpy(), want)
    small = tb.dare_keep_mask(key, limit, n, first=first, device=DEVICE, block_size=1024).cpu().numpy()
    np.testing.assert_array_equal(small, want)


def test_reference_generator_agrees_with_the_engine():
    """The spec re-implementation above is the engine's generator (else the float64 reference
    below would test nothing)."""
    for seed, model, p, first in [(0, 0, 0.5, 0), (2**64 - 1, 3, 0.1, 2**40), (11, 1, 0.9, 77)]:
        key = stream_key(seed, NAME, model)
        assert ref_key(seed, NAME, model) == key
        want = MaskGenerator(5000).keep(key, first, keep_limit(p), np.empty(5000, dtype=bool))
        np.testing.assert_array_equal(ref_keep(seed, NAME, model, first, 5000, p), want)


# -- the fused dare-linear kernel -------------------------------------------------------------

# Two chunkings on the Triton side: the whole tensor in one call, and ragged chunks that are
# not multiples of any block. The engine runs in 64K-element chunks.
N = 2 * BIG + 1001
TRITON_CHUNKS = [N, 40_000 + 3]


@pytest.mark.parametrize("base_dt,ft_dt,out_dt", [
    *((d, d, d) for d in DTYPES),
    ("bf16", "fp16", "bf16"), ("fp16", "fp32", "bf16"), ("fp32", "bf16", "fp16"), ("bf16", "bf16", "fp32"),
])
def test_dare_linear_matches_numpy_engine_and_reference(base_dt, ft_dt, out_dt):
    rng = np.random.default_rng(zlib.crc32(f"{base_dt}{ft_dt}{out_dt}".encode()))
    base, ft1, ft2 = inputs(rng, N, [base_dt, ft_dt, "bf16"])
    weights, densities, seed = [0.6, 0.4], [0.3, 0.9], 2**64 - 3
    want, method = engine_dare_linear(base, [ft1, ft2], out_dt, BIG, weight=weights, density=densities, seed=seed)
    for chunk in TRITON_CHUNKS:
        got = triton_dare_linear(base, [ft1, ft2], out_dt, chunk, method)
        what = f"{base_dt}+{ft_dt}->{out_dt}, chunks of {chunk}"
        assert_same_bits(got, want, what)
    ref = ref_dare_linear(base, [ft1, ft2], weights, densities, seed, NAME)
    assert_near_reference(got, ref, base, [ft1, ft2], weights, densities, f"{base_dt}+{ft_dt}->{out_dt}")
    # Not vacuous: about 30% of model 0's deltas survive, 90% of model 1's.
    kept = np.mean(ref_keep(seed, NAME, 0, 0, N, 0.3))
    assert 0.28 < kept < 0.32


@pytest.mark.parametrize("case", ["far-offset", "lambda-normalize", "edge-densities", "nine-models"])
def test_dare_linear_parameters(case):
    """Chunk offsets past 2³², λ with normalize, densities 0 and 1 beside 0.5, and more than
    eight models (two kernel passes through an fp32 running sum)."""
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    first, scale, normalize = 0, 1.0, False
    n = BIG + 4099
    if case == "far-offset":
        dtypes, weights, densities, first = ["bf16"] * 3, [0.7, 0.3], [0.5, 0.2], 2**33 + 17
    elif case == "lambda-normalize":
        dtypes, weights, densities, scale, normalize = ["fp16", "bf16", "fp32"], [2.0, 1.0], [0.4, 0.6], 0.7, True
    elif case == "edge-densities":
        dtypes, weights, densities = ["bf16"] * 4, [0.5, 0.25, 1.0], [0.0, 1.0, 0.5]
    else:
        dtypes = ["bf16", *(["fp16", "bf16", "fp32"] * 3)]
        weights, densities = [0.1 * i - 0.2 for i in range(9)], [0.1 * i + 0.1 for i in range(9)]
    base, *models = inputs(rng, n, dtypes)
    want, method = engine_dare_linear(base, models, "bf16", BIG, first=first, weight=weights, density=densities,
                                      lambda_=scale, normalize=normalize, seed=99)
    for chunk in (n, 20_000 + 1):
        assert_same_bits(triton_dare_linear(base, models, "bf16", chunk, method, first=first), want,
                         f"{case}, chunks of {chunk}")
    if normalize:
        weights = [w / sum(weights) for w in weights]
    ref = ref_dare_linear(base, models, weights, densities, 99, NAME, first=first, scale=scale)
    assert_near_reference(want, ref, base, models, weights, densities, case, scale)


@pytest.mark.parametrize("in_dt,out_dt", list(itertools.product(DTYPES, DTYPES)))
def test_dare_linear_nan_and_inf(in_dt, out_dt):
    """Every pair of specials, each repeated so that both kept and dropped elements occur:
    NaN stays NaN, ±inf stays ±inf where kept, and a dropped ±inf delta is NaN (0·inf), on
    both backends alike."""
    specials = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -2.5]
    pairs = np.array(list(itertools.product(specials, specials)) * 40, dtype=np.float64)
    base, ft = pairs[:, 0].astype(NP[in_dt]), pairs[:, 1].astype(NP[in_dt])
    want, method = engine_dare_linear(base, [ft], out_dt, BIG, weight=0.6, density=0.5, seed=3)
    got = triton_dare_linear(base, [ft], out_dt, base.size, method)
    assert_same_bits(got, want, f"{in_dt}->{out_dt}")
    ref = ref_dare_linear(base, [ft], [0.6], [0.5], 3, NAME)
    assert_near_reference(got, ref, base, [ft], [0.6], [0.5], f"{in_dt}->{out_dt}")
    nan_bits = got[np.isnan(got.astype(np.float64))].view(triton_env.INT_OF_WIDTH[got.dtype.itemsize])
    quiet = {"bf16": 0x0040, "fp16": 0x0200, "fp32": 0x00400000}[out_dt]
    assert np.all(nan_bits & quiet), f"{out_dt}: NaN results must be quiet NaNs"


def test_dare_linear_operand_errors():
    a = torch.zeros(8, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="one key and one keep limit per model"):
        tb.dare_linear(a, [a], [1.0], [1, 2], [0])
    with pytest.raises(ValueError, match="not an unsigned 64-bit integer"):
        tb.dare_linear(a, [a], [1.0], [2**64], [0])
    with pytest.raises(ValueError, match=r"outside \[0, 2\^64\]"):
        tb.dare_linear(a, [a], [1.0], [1], [2**64 + 1])
    with pytest.raises(ValueError, match="element indices"):
        tb.dare_linear(a, [a], [1.0], [1], [0], first=-1)


# -- wiring: --device cuda runs dare-linear through the kernel ---------------------------------


@pytest.mark.parametrize("method,params,expected", [
    ("dare-linear", {}, True),
    ("dare-linear", {"rescale": "none"}, True),
    ("dare-linear", {"rescale": True}, True),
    ("dare-linear", {"rescale": "l1"}, False),  # its L1 norms need a reduce pass
    ("dare-linear", {"rescale": [{"filter": "mlp", "value": "l1"}, {"value": "density"}]}, False),
    ("dare-ties", {}, False),
    ("ties", {}, False),
    ("linear", {}, True),
    ("slerp", {}, False),
])
def test_which_methods_run_on_the_gpu(method, params, expected):
    assert create_method(method, 1, **params).runs_on_gpu() is expected


def test_device_cuda_dare_linear_matches_cpu_bit_for_bit(tmp_path, monkeypatch):
    """safeblend.merge(device="cuda") against device="cpu": the same bytes, for small chunks.
    Without a GPU the CUDA pipeline runs with the CPU stand-ins of tests/test_cuda_pipeline.py."""
    if tb.INTERPRETED:
        from tests.test_cuda_pipeline import StandInExecutor, _select_stand_in

        monkeypatch.setattr(safeblend.api, "_select_backend", _select_stand_in)
        monkeypatch.setattr(safeblend.api, "CudaExecutor", StandInExecutor)
    rng = np.random.default_rng(12)
    shapes = {"model.embed_tokens.weight": (300, 64), "model.layers.0.mlp.up_proj.weight": (96, 64),
              "model.norm.weight": (64,)}
    base = {name: rng.standard_normal(shape).astype(ml_dtypes.bfloat16) for name, shape in shapes.items()}
    fts = [{name: (t.astype(np.float64) + 0.05 * rng.standard_normal(t.shape)).astype(dt)
            for name, t in base.items()} for dt in (ml_dtypes.bfloat16, np.float16)]
    for i, ckpt in enumerate([base, *fts]):
        write_checkpoint(tmp_path / f"in{i}", ckpt)
    models = [tmp_path / "in1", tmp_path / "in2"]
    kwargs = dict(method="dare-linear", weight=[0.6, 0.4], density=[0.3, 0.7], seed=2**63 + 5,
                  chunk_size=4096, on_warning=lambda m: None)
    cuda = safeblend.merge(tmp_path / "in0", models, tmp_path / "cuda", device="cuda", **kwargs)
    cpu = safeblend.merge(tmp_path / "in0", models, tmp_path / "cpu", device="cpu", **kwargs)
    assert (cuda.device, cpu.device) == ("cuda", "cpu")
    assert (tmp_path / "cuda" / "model.safetensors").read_bytes() == (tmp_path / "cpu" / "model.safetensors").read_bytes()
    out = load_checkpoint(tmp_path / "cuda")
    name = "model.layers.0.mlp.up_proj.weight"
    assert np.mean(out[name].view(np.int16) != base[name].view(np.int16)) > 0.5  # the merge did something
