"""Every merge method against an independent whole-tensor float64 reference.

The references below are written from the formulas in each method's docstring (and the
README), on whole tensors upcast to float64, never calling engine code. The engine runs
through ``safeblend.merge`` with a chunk size small enough that every larger tensor is cut into
many chunks, so the reduce passes and the per-chunk arithmetic are both exercised.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import pytest

import safeblend
from safeblend.errors import SpecError
from safeblend.methods._sparse import COMBINE_BLOCK
from helpers import NUMPY_DTYPES, assert_within_tolerance, load_checkpoint, random_tensor, ref_slerp, write_checkpoint

# Shapes that always include the weird ones: one element, odd sizes, many chunks at a small
# chunk size (test_large_chunks_span_several_compute_blocks covers several blocks in a chunk).
SHAPES = {
    "model.embed_tokens.weight": (1,),
    "model.layers.0.self_attn.q_proj.weight": (7,),
    "model.layers.0.mlp.up_proj.weight": (33, 17),
    "model.layers.1.self_attn.q_proj.weight": (301, 129),
    "model.layers.1.mlp.up_proj.weight": (3, 47_001),
    "model.norm.weight": (129,),
}
SMALL_CHUNK = 4096  # bytes: ~1-2K elements per chunk
DTYPES = ["bf16", "fp16", "fp32"]


# -- inputs -----------------------------------------------------------------------------------

def make_inputs(rng: np.random.Generator, dtype: str, n_models: int, shapes=SHAPES, spread: float = 0.3):
    """A base and ``n_models`` fine-tunes = base + spread·noise (realistic, mostly small deltas)."""
    base = {name: random_tensor(rng, shape, dtype) for name, shape in shapes.items()}
    models = []
    for _ in range(n_models):
        models.append({
            name: (t.astype(np.float64) + spread * rng.standard_normal(t.shape)).astype(NUMPY_DTYPES[dtype])
            for name, t in base.items()
        })
    return base, models


def write_inputs(tmp_path: Path, base: dict, models: list[dict]) -> tuple[Path, list[Path]]:
    b = write_checkpoint(tmp_path / "base", base)
    ms = [write_checkpoint(tmp_path / f"ft{i}", m) for i, m in enumerate(models)]
    return b, ms


def run(tmp_path: Path, base: dict, models: list[dict], method: str, out: str = "out",
        chunk_size: int = SMALL_CHUNK, **params) -> dict[str, np.ndarray]:
    b, ms = write_inputs(tmp_path, base, models) if not (tmp_path / "base").exists() else (
        tmp_path / "base", [tmp_path / f"ft{i}" for i in range(len(models))])
    safeblend.merge(b, ms, tmp_path / out, method=method, chunk_size=chunk_size, on_warning=lambda m: None,
                 **params)
    return load_checkpoint(tmp_path / out)


# -- float64 references, whole tensor ----------------------------------------------------------

def f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def ref_linear(base, models, weights, normalize=False, scale=1.0):
    b = f64(base)
    w = np.array(weights, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    return b + scale * sum(wi * (f64(m) - b) for wi, m in zip(w, models))




def ref_trim(delta: np.ndarray, density: float) -> np.ndarray:
    """TIES trim: keep |d| ≥ the k-th largest |d|, k = ⌊density·n⌋ (ties at the threshold kept)."""
    n = delta.size
    k = math.floor(density * n)
    if k <= 0:
        return np.zeros_like(delta)
    if k >= n:
        return delta.copy()
    tau = np.sort(np.abs(delta).ravel())[::-1][k - 1]
    return np.where(np.abs(delta) >= tau, delta, 0.0)


def ref_breadcrumbs_trim(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Breadcrumbs: drop the t = ⌊γ·n⌋ largest |d|, keep the next k = ⌊ρ·n⌋ (t lowered to
    n − k where they exceed n); ties at either threshold all on the same side."""
    if density >= 1:
        return delta.copy()
    n = delta.size
    k, t = math.floor(density * n), math.floor(gamma * n)
    t = min(t, n - k)
    magnitudes = np.sort(np.abs(delta).ravel())[::-1]
    keep = np.abs(delta) >= magnitudes[k + t - 1] if k + t > 0 else np.zeros(delta.shape, bool)
    if t > 0:
        keep &= np.abs(delta) < magnitudes[t - 1]
    return np.where(keep, delta, 0.0)


def ref_breadcrumbs(base, models, weights, densities, gammas, elect, normalize=False, scale=1.0):
    deltas = [ref_breadcrumbs_trim(f64(m) - f64(base), p, g) for m, p, g in zip(models, densities, gammas)]
    return ref_combine(base, deltas, weights, elect, normalize, scale)


def ref_combine(base, deltas, weights, elect, normalize, scale, consensus="sum"):
    b = f64(base)
    e = [w * d for w, d in zip(weights, deltas)]
    if not elect:
        total = sum(e)
        if normalize and abs(sum(weights)) >= 1e-8:
            total = total / sum(weights)
        return b + scale * total
    votes = sum(e) if consensus == "sum" else sum(np.sign(x) for x in e)
    sigma = np.where(votes >= 0, 1.0, -1.0)
    agree = [np.sign(x) == sigma for x in e]
    mixed = sum(np.where(a, x, 0.0) for a, x in zip(agree, e))
    if normalize:
        div = sum(np.where(a, w, 0.0) for a, w in zip(agree, weights))
        mixed = mixed / np.where(div == 0, 1.0, div)
    return b + scale * mixed


def ref_ties(base, models, weights, densities, normalize=True, scale=1.0, consensus="sum", rescale=False):
    deltas = [ref_trim(f64(m) - f64(base), p) for m, p in zip(models, densities)]
    if rescale:  # mergekit's rescale: the kept entries carry the task vector's L1 norm
        full = [np.abs(f64(m) - f64(base)).sum() for m in models]
        deltas = [d * (f / np.abs(d).sum()) if p < 1 and min(f, np.abs(d).sum()) >= 1e-7 else d
                  for d, f, p in zip(deltas, full, densities)]
    return ref_combine(base, deltas, weights, True, normalize, scale, consensus)


# DARE's generator, re-implemented from its specification (engine/methods/_rng.py docstring).
_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


def _mix_int(z: int) -> int:
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _mix_array(z: np.ndarray) -> np.ndarray:
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def ref_dare_keep(seed: int, name: str, model: int, n: int, density: float) -> np.ndarray:
    h = 0xCBF29CE484222325
    for byte in name.encode():
        h = ((h ^ byte) * 0x100000001B3) & _M64
    key = _mix_int(_mix_int(_mix_int(seed + _GAMMA) ^ h) + (model + 1) * _GAMMA)
    j = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        u = _mix_array(np.uint64(key) + (j + np.uint64(1)) * np.uint64(_GAMMA))
    if density >= 1:
        return np.ones(n, dtype=bool)
    return (u >> np.uint64(11)) < np.uint64(int(density * 2**53))


def ref_dare(name, base, models, weights, densities, elect, normalize=False, scale=1.0, rescale="density",
             seed=0, consensus="sum"):
    deltas = []
    for i, (m, p) in enumerate(zip(models, densities)):
        d = f64(m) - f64(base)
        keep = ref_dare_keep(seed, name, i, d.size, p).reshape(d.shape)
        kept = np.where(keep, d, 0.0)
        if p < 1 and rescale == "density":
            kept = kept / p
        elif p < 1 and rescale == "l1" and min(np.abs(kept).sum(), np.abs(d).sum()) >= 1e-7:
            kept = kept * (np.abs(d).sum() / np.abs(kept).sum())
        deltas.append(kept)
    return ref_combine(base, deltas, weights, elect, normalize, scale, consensus)


def ref_model_stock(base, models):
    b = f64(base)
    ds = [(f64(m) - b).ravel() for m in models]
    n = len(ds)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            ni, nj = np.linalg.norm(ds[i]), np.linalg.norm(ds[j])
            cosines.append(ds[i] @ ds[j] / (ni * nj) if ni > 1e-12 and nj > 1e-12 else 0.0)
    cos = float(np.mean(cosines))
    t = n * cos / (1 + (n - 1) * cos)
    return t * sum(f64(m) for m in models) / n + (1 - t) * b


# -- each method against its reference, over dtypes and shapes -------------------------------

CASES = {
    # method: (models, engine params, reference(name, base, models))
    "linear": (3, dict(weight=[0.2, 0.5, 0.3]),
               lambda n, b, ms: ref_linear(b, ms, [0.2, 0.5, 0.3])),
    "linear-normalize": (2, dict(weight=[1.0, 3.0], normalize=True),
                         lambda n, b, ms: ref_linear(b, ms, [1.0, 3.0], normalize=True)),
    "task-arithmetic": (3, dict(weight=[0.5, 1.0, -0.25], lambda_=0.7),
                        lambda n, b, ms: ref_linear(b, ms, [0.5, 1.0, -0.25], scale=0.7)),
    "slerp": (1, dict(weight=0.3), lambda n, b, ms: ref_slerp(b, ms[0], 0.3)),
    "ties": (3, dict(weight=[1.0, 0.5, 0.8], density=0.3),
             lambda n, b, ms: ref_ties(b, ms, [1.0, 0.5, 0.8], [0.3] * 3)),
    "ties-count": (3, dict(weight=0.6, density=[0.2, 0.5, 0.9], consensus="count", normalize=False, lambda_=0.8),
                   lambda n, b, ms: ref_ties(b, ms, [0.6] * 3, [0.2, 0.5, 0.9], normalize=False, scale=0.8,
                                             consensus="count")),
    "ties-l1": (3, dict(weight=[1.0, 0.5, 0.8], density=[0.3, 0.6, 1.0], rescale="l1"),
                lambda n, b, ms: ref_ties(b, ms, [1.0, 0.5, 0.8], [0.3, 0.6, 1.0], rescale=True)),
    "breadcrumbs": (3, dict(weight=[1.0, 0.5, 0.8], density=[0.3, 0.6, 1.0], gamma=[0.01, 0.2, 0.1]),
                    lambda n, b, ms: ref_breadcrumbs(b, ms, [1.0, 0.5, 0.8], [0.3, 0.6, 1.0], [0.01, 0.2, 0.1],
                                                     elect=False)),
    "breadcrumbs-ties": (3, dict(weight=[1.0, 0.5, 0.8], density=0.5, gamma=[0.05, 0.6, 0.0], normalize=True,
                                 lambda_=0.9),
                         lambda n, b, ms: ref_breadcrumbs(b, ms, [1.0, 0.5, 0.8], [0.5] * 3, [0.05, 0.6, 0.0],
                                                          elect=True, normalize=True, scale=0.9)),
    "dare-linear": (2, dict(weight=[0.6, 0.4], density=0.4),
                    lambda n, b, ms: ref_dare(n, b, ms, [0.6, 0.4], [0.4] * 2, elect=False)),
    "dare-linear-l1": (2, dict(weight=[0.6, 0.4], density=[0.3, 0.7], rescale="l1", normalize=True, seed=7),
                       lambda n, b, ms: ref_dare(n, b, ms, [0.6, 0.4], [0.3, 0.7], elect=False, normalize=True,
                                                 rescale="l1", seed=7)),
    "dare-ties": (3, dict(weight=[1.0, 0.5, 0.8], density=0.5, normalize=True),
                  lambda n, b, ms: ref_dare(n, b, ms, [1.0, 0.5, 0.8], [0.5] * 3, elect=True, normalize=True)),
    "model-stock": (3, {}, lambda n, b, ms: ref_model_stock(b, ms)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_method_matches_float64_reference(tmp_path, case, dtype):
    n_models, params, reference = CASES[case]
    method = case.removesuffix("-normalize").removesuffix("-count").removesuffix("-l1")
    rng = np.random.default_rng(zlib.crc32(f"{case}/{dtype}".encode()))
    base, models = make_inputs(rng, dtype, n_models)
    out = run(tmp_path, base, models, method, **params)
    assert set(out) == set(base)
    for name in base:
        ms = [m[name] for m in models]
        ref = reference(name, base[name], ms)
        assert out[name].dtype == base[name].dtype
        assert_within_tolerance(out[name], ref, [base[name], *ms, operand_scale(method, base[name], ms)],
                                f"{case} {dtype} {name}")


def operand_scale(method: str, base: np.ndarray, models: list[np.ndarray]) -> np.ndarray:
    """The magnitude the tolerance's absolute term is relative to, per element.

    The tolerance rule (safeblend.tolerance, 2⁻²²·max|inputs|) is written for two inputs. With N fine-tuned models
    the fp32 arithmetic rounds ~3N times, each relative to the terms being added, so the
    term here is the sum of the operands' magnitudes, |base| + Σ|ftᵢ|; DARE's rescale
    (1/density ≤ 4 in these cases) multiplies the deltas that enter the sum.
    """
    total = np.abs(f64(base)) + sum(np.abs(f64(m)) for m in models)
    if method.startswith("dare"):
        total = total + 4 * sum(np.abs(f64(m) - f64(base)) for m in models)
    return total


@pytest.mark.parametrize("method", ["slerp", "ties", "dare-ties", "model-stock"])
def test_output_dtype_differs_from_inputs(tmp_path, method):
    """Mixed input dtypes and a forced output dtype: still one rounding of the fp64 result."""
    rng = np.random.default_rng(3)
    shapes = {"model.layers.0.mlp.up_proj.weight": (57, 31)}
    base, models = make_inputs(rng, "bf16", 2 if method != "slerp" else 1, shapes)
    models[0] = {k: v.astype(np.float32) for k, v in models[0].items()}
    params = {"density": 0.5} if method in ("ties", "dare-ties") else {}
    b, ms = write_inputs(tmp_path, base, models)
    safeblend.merge(b, ms, tmp_path / "out", method=method, dtype="fp16", chunk_size=512, on_warning=lambda m: None,
                 **params)
    out = load_checkpoint(tmp_path / "out")
    name = next(iter(shapes))
    m = [x[name] for x in models]
    ref = {"slerp": lambda: ref_slerp(base[name], m[0], 0.5),
           "ties": lambda: ref_ties(base[name], m, [1.0, 1.0], [0.5, 0.5]),
           "dare-ties": lambda: ref_dare(name, base[name], m, [1.0, 1.0], [0.5, 0.5], elect=True),
           "model-stock": lambda: ref_model_stock(base[name], m)}[method]()
    assert out[name].dtype == np.float16
    extra = [(f64(x) - f64(base[name])) * 2 for x in m]
    assert_within_tolerance(out[name], ref, [base[name], *m, *extra], method)


# -- TIES: the threshold is the exact k-th largest magnitude, ties included -----------------

def test_kth_largest_matches_sort_on_hard_values():
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.standard_normal(5000).astype(np.float32),
        np.zeros(300, np.float32), -np.zeros(300, np.float32),
        np.full(700, 0.125, np.float32), np.full(700, -0.125, np.float32),  # many ties
        np.array([np.inf, -np.inf, 1e-45, -1e-45, 3e38], np.float32),  # inf, subnormals
        (rng.standard_normal(500) * 1e-40).astype(np.float32),
    ])
    rng.shuffle(values)
    magnitudes = np.sort(np.abs(values.astype(np.float64)))[::-1]
    for k in [1, 2, 5, 700, 1400, 1401, 3000, values.size - 601, values.size - 1, values.size]:
        threshold = _threshold_of(values, k, chunk=777)  # uneven chunks
        assert float(threshold) == magnitudes[k - 1], k


def _threshold_of(values: np.ndarray, k: int, chunk: int, sample=None, passes: list | None = None) -> np.float32:
    """Run KthLargest over ``values`` in chunks as the engine does (pass 0 sees each chunk's
    sample ranges, or ``sample(chunk_values)`` when given); returns the threshold value and
    appends the number of passes run to ``passes``."""
    from safeblend.methods._select import KthLargest, magnitude_bits

    selector = KthLargest(values.size, k)
    p = 0
    while p < selector.passes and not selector.done:
        for lo in range(0, values.size, chunk):
            part = values[lo:lo + chunk]
            if p == 0:
                part = sample(part) if sample else np.concatenate(
                    [part[a:b] for a, b in selector.sample_ranges(part.size)])
            selector.add(p, magnitude_bits(part, np.empty(part.size, np.uint32)),
                         np.empty(part.size, np.intp), np.empty(part.size, bool))
        selector.end_pass(p)
        p += 1
    if passes is not None:
        passes.append(p)
    return np.array([selector.threshold_bits], np.uint32).view(np.float32)[0]


@pytest.mark.parametrize("sample", ["spread", "misleading"])
def test_kth_largest_is_exact_on_a_large_tensor_whatever_the_sample(sample):
    """Above the small-tensor size the first pass only looks at a sample; the answer stays
    exact, and a sample that misleads (here: only the smallest magnitudes) costs two more
    passes, never a wrong threshold."""
    from safeblend.methods import _select

    rng = np.random.default_rng(5)
    n = _select.SMALL * 2 + 12345
    values = rng.standard_normal(n).astype(np.float32)
    values[rng.choice(n, 5000, replace=False)] = 0.5  # a tie
    magnitudes = np.sort(np.abs(values.astype(np.float64)))[::-1]
    smallest = lambda part: np.sort(np.abs(part))[: max(1, part.size // 64)]  # noqa: E731
    passes: list[int] = []
    for k in [1, 1000, int(0.3 * n), int(0.9 * n), n - 1]:
        threshold = _threshold_of(values, k, chunk=1 << 18, sample=smallest if sample == "misleading" else None,
                                  passes=passes)
        assert float(threshold) == magnitudes[k - 1], (sample, k)
    if sample == "spread":  # a fair sample: 2 passes, 3 where the range is wide (the tails)
        assert max(passes) <= 3 and passes[2] == 2, passes  # k = 0.3·n: TIES's usual density
    else:  # misled: the classic two passes after the first two
        assert 4 in passes, passes


@pytest.mark.parametrize("fold", [0, 1 << 40])
def test_kth_largest_counts_a_range_by_histogram_or_by_distinct_values(monkeypatch, fold):
    """Pass 1 counts a block's in-range magnitudes with a whole-range histogram, or by their
    distinct values when they are few (SPARSE_FOLD); forced either way, the answer is exact."""
    from safeblend.methods import _select

    monkeypatch.setattr(_select, "SPARSE_FOLD", fold)
    rng = np.random.default_rng(11)
    n = _select.SMALL + 54321
    values = rng.standard_normal(n).astype(np.float32)
    values[rng.choice(n, 3000, replace=False)] = -0.75  # a tie
    magnitudes = np.sort(np.abs(values.astype(np.float64)))[::-1]
    for k in [1, 777, n // 4, n // 2, int(0.75 * n), n - 2]:
        assert float(_threshold_of(values, k, chunk=1 << 17)) == magnitudes[k - 1], (fold, k)


def test_ties_keeps_every_entry_tied_at_the_threshold(tmp_path):
    """Magnitudes from a small set, so the k-th largest value is shared by many entries."""
    rng = np.random.default_rng(1)
    n = 5000
    levels = np.array([0.25, 0.5, 0.75, 1.0, 1.25], np.float32)
    delta = rng.choice(levels, n) * rng.choice([-1.0, 1.0], n).astype(np.float32)
    base = {"model.layers.0.w": np.zeros(n, np.float32)}
    models = [{"model.layers.0.w": delta}]
    for density in [0.1, 0.2, 0.33, 0.5, 0.999, 1.0, 0.0]:
        out = run(tmp_path, base, models, "ties", out=f"out-{density}", density=density)["model.layers.0.w"]
        k = math.floor(density * n)
        expected = ref_trim(delta.astype(np.float64), density)
        np.testing.assert_array_equal(out, expected.astype(np.float32), err_msg=f"density {density}")
        if 0 < k < n:
            tau = np.sort(np.abs(delta))[::-1][k - 1]
            assert np.count_nonzero(out) == np.count_nonzero(np.abs(delta) >= tau) >= k


def test_ties_sign_election_sum_and_count(tmp_path):
    """Hand-made case: the sum rule and the count rule elect different signs."""
    base = {"w": np.zeros(2, np.float32)}
    models = [{"w": np.array([3.0, 1.0], np.float32)}, {"w": np.array([-1.0, -1.0], np.float32)},
              {"w": np.array([-1.0, 2.0], np.float32)}]
    total = run(tmp_path, base, models, "ties", out="sum", density=1.0)["w"]
    count = run(tmp_path, base, models, "ties", out="count", density=1.0, consensus="count")["w"]
    # element 0: sum 1 > 0 elects +, only model 0 agrees → 3; count 1 vs 2 elects − → mean(−1, −1)
    # element 1: sum 2 elects +, models 0 and 2 agree → 1.5; count 2 vs 1 elects + → 1.5
    np.testing.assert_array_equal(total, [3.0, 1.5])
    np.testing.assert_array_equal(count, [-1.0, 1.5])


# -- DARE: reproducible, unbiased, the density it was asked for -------------------------------

def dare_inputs(rng, n=200_003):
    shapes = {"model.layers.0.mlp.up_proj.weight": (n,), "model.layers.1.mlp.up_proj.weight": (1000,)}
    return make_inputs(rng, "bf16", 2, shapes)


@pytest.mark.parametrize("method", ["dare-linear", "dare-ties"])
def test_dare_same_output_for_any_chunk_size(tmp_path, method):
    base, models = dare_inputs(np.random.default_rng(5))
    outs = [run(tmp_path, base, models, method, out=f"out-{c}", chunk_size=c, density=0.3, seed=11)
            for c in (256, 4096, 1 << 20, 64 << 20)]
    for other in outs[1:]:
        for name in base:
            np.testing.assert_array_equal(outs[0][name].view(np.uint16), other[name].view(np.uint16))


def test_dare_seed_changes_the_mask_and_default_seed_is_fixed(tmp_path):
    base, models = dare_inputs(np.random.default_rng(6), n=20_000)
    a = run(tmp_path, base, models, "dare-linear", out="a", density=0.5)
    b = run(tmp_path, base, models, "dare-linear", out="b", density=0.5, seed=0)
    c = run(tmp_path, base, models, "dare-linear", out="c", density=0.5, seed=1)
    name = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_array_equal(a[name].view(np.uint16), b[name].view(np.uint16))
    assert np.mean(a[name].view(np.uint16) != c[name].view(np.uint16)) > 0.3
    meta = json_metadata(tmp_path / "a")
    assert meta["seed"] == 0


def json_metadata(directory: Path) -> dict:
    import json

    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="numpy") as f:
        return json.loads(f.metadata()["safeblend_recipe"])


def test_dare_keeps_density_fraction_and_preserves_expectation(tmp_path):
    """A constant task vector: the kept fraction is ≈ p and the mean of the rescaled result ≈ d."""
    n, p, d = 400_000, 0.3, 0.5
    base = {"w": np.zeros(n, np.float32)}
    models = [{"w": np.full(n, d, np.float32)}]
    out = run(tmp_path, base, models, "dare-linear", density=p, chunk_size=1 << 20)["w"]
    kept = np.count_nonzero(out) / n
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - p) < 5 * sigma
    assert set(np.unique(out)) == {np.float32(0), np.float32(d / p)}
    assert abs(out.astype(np.float64).mean() - d) < 5 * sigma * d / p
    l1 = run(tmp_path, base, models, "dare-linear", out="l1", density=p, rescale="l1", chunk_size=1 << 20)["w"]
    assert abs(np.abs(l1.astype(np.float64)).sum() - n * d) < 1e-3 * n * d  # L1 norm preserved


def test_dare_masks_differ_between_models_and_tensors():
    from safeblend.methods._rng import MaskGenerator, keep_limit, stream_key

    gen = MaskGenerator(4096)
    masks = [gen.keep(stream_key(0, name, i), 0, keep_limit(0.5), np.empty(4096, bool)).copy()
             for name in ("a", "b") for i in range(2)]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            assert 0.4 < np.mean(masks[i] != masks[j]) < 0.6
    # offsets: a block starting at 1000 equals the tail of a block starting at 0
    tail = gen.keep(stream_key(0, "a", 0), 1000, keep_limit(0.5), np.empty(3096, bool))
    np.testing.assert_array_equal(tail, masks[0][1000:])


# -- SLERP and Model Stock edge cases ----------------------------------------------------------

def test_slerp_endpoints_and_fallbacks(tmp_path):
    rng = np.random.default_rng(8)
    a = rng.standard_normal(1001).astype(np.float32)
    b = rng.standard_normal(1001).astype(np.float32)  # nearly orthogonal: a real slerp
    base = {"orth": a, "colinear": a, "zero": np.zeros(1001, np.float32), "antiparallel": a}
    ft = {"orth": b, "colinear": 2 * a, "zero": b, "antiparallel": -a}
    for t in (0.0, 0.4, 1.0):
        out = run(tmp_path, base, [ft], "slerp", out=f"out-{t}", weight=t)
        for name in base:
            ref = ref_slerp(base[name], ft[name], t)
            assert_within_tolerance(out[name], ref, [base[name], ft[name]], f"slerp t={t} {name}")
        if t == 0.4:
            # colinear and antiparallel fall back to the linear interpolation
            for name in ("colinear", "antiparallel"):
                lerp = 0.6 * f64(base[name]) + 0.4 * f64(ft[name])
                assert_within_tolerance(out[name], lerp, [base[name], ft[name]], name)
            # a zero base is orthogonal to everything (mergekit's rule): sin(t·π/2)·θ_ft
            assert_within_tolerance(out["zero"], math.sin(0.4 * math.pi / 2) * f64(b), [b], "zero")
            # the spherical one keeps the norm between the endpoints' norms, unlike the lerp
            assert np.linalg.norm(out["orth"]) > np.linalg.norm(0.6 * a + 0.4 * b) * 1.2


def test_model_stock_colinear_zero_and_orthogonal(tmp_path):
    rng = np.random.default_rng(9)
    base_t = rng.standard_normal(999).astype(np.float32)
    d = rng.standard_normal(999).astype(np.float32)
    q = rng.standard_normal(999)
    q -= (q @ d) / (d @ d) * d  # orthogonal to d
    base = {"colinear": base_t, "zero": base_t, "orthogonal": base_t}
    ft1 = {"colinear": base_t + d, "zero": base_t.copy(), "orthogonal": base_t + d}
    ft2 = {"colinear": base_t + 2 * d, "zero": base_t + d, "orthogonal": (base_t + q).astype(np.float32)}
    out = run(tmp_path, base, [ft1, ft2], "model-stock")
    # colinear: cos 1, t = 1 → the average of the fine-tunes
    assert_within_tolerance(out["colinear"], (f64(ft1["colinear"]) + f64(ft2["colinear"])) / 2,
                            [base_t, ft1["colinear"], ft2["colinear"]], "colinear")
    # a zero task vector counts as cos 0, and orthogonal ones give cos ≈ 0: t ≈ 0 → the base
    assert_within_tolerance(out["zero"], f64(base_t), [base_t, ft2["zero"]], "zero")
    ref = ref_model_stock(base["orthogonal"], [ft1["orthogonal"], ft2["orthogonal"]])
    assert_within_tolerance(out["orthogonal"], ref, [base_t, ft1["orthogonal"], ft2["orthogonal"]], "orthogonal")
    assert np.max(np.abs(f64(out["orthogonal"]) - base_t)) < 0.05


def test_model_stock_ratio_formula():
    from safeblend.methods.model_stock import interpolation_ratio

    gram = np.array([[4.0, 2.0, 1.0], [0.0, 4.0, 0.0], [0.0, 0.0, 1.0]])  # upper triangle is read
    cos = (2.0 / 4.0 + 1.0 / 2.0 + 0.0) / 3
    assert interpolation_ratio(gram) == pytest.approx(3 * cos / (1 + 2 * cos))
    # antiparallel pair: 1 + (N − 1)·cos = 0, where mergekit divides by zero; safeblend gives t = 0
    assert interpolation_ratio(np.array([[1.0, -1.0], [0.0, 1.0]])) == 0.0


# -- per-tensor parameters ---------------------------------------------------------------------

def test_weights_by_filter_and_layer_gradient(tmp_path):
    rng = np.random.default_rng(10)
    shapes = {f"model.layers.{i}.{kind}.weight": (5, 3) for i in range(3) for kind in ("self_attn.q", "mlp.up")}
    shapes["model.embed_tokens.weight"] = (4, 3)
    shapes["lm_head.weight"] = (4, 3)
    base, models = make_inputs(rng, "fp32", 1, shapes)
    rules = [{"filter": "self_attn", "value": 0.2}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]
    out = run(tmp_path, base, models, "linear", weight=rules)
    for name in shapes:
        if "self_attn" in name:
            w = 0.2
        elif "mlp" in name:
            w = int(name.split(".")[2]) / 2  # layers 0, 1, 2 → t = 0, 0.5, 1
        else:
            w = 0.5
        ref = ref_linear(base[name], [models[0][name]], [w])
        assert_within_tolerance(out[name], ref, [base[name], models[0][name]], name)


def test_layer_positions_follow_mergekit():
    from safeblend.methods.params import layer_positions, setting

    names = ["model.embed_tokens.weight", "model.layers.0.a", "model.layers.3.a", "model.norm.weight",
             "lm_head.weight"]
    positions = layer_positions(names)
    # tensors after the last layer sit at the first anchor, like the embeddings (mergekit >= 0.1.2)
    assert positions == {"model.embed_tokens.weight": 0.0, "model.layers.0.a": 0.0, "model.layers.3.a": 1.0,
                         "model.norm.weight": 0.0, "lm_head.weight": 0.0}
    gradient = setting([0.0, 0.5, 1.0, 0.0], "t")
    assert gradient.at("x", 0.5) == pytest.approx(0.75)
    assert gradient.at("x", 1.0) == 0.0
    assert setting([{"filter": "mlp", "value": 1}], "t").at("attn", 0) is None


# -- parameter validation ----------------------------------------------------------------------

@pytest.mark.parametrize("method,models,params,message", [
    ("slerp", 2, {}, "at most 1"),
    ("model-stock", 1, {}, "at least 2"),
    ("model-stock", 2, {"weight": 0.5}, "takes no parameter 'weight'"),
    ("linear", 1, {"density": 0.5}, "takes no parameter 'density'"),
    ("ties", 2, {"density": 1.5}, "density must be a number in [0, 1]"),
    ("ties", 2, {"seed": 3}, "takes no parameter 'seed'"),
    ("dare-linear", 2, {"consensus": "count"}, "takes no parameter 'consensus'"),
    ("dare-ties", 2, {"rescale": "l2"}, "rescale: expected one of density, l1, none"),
    ("ties", 2, {"rescale": "density"}, "rescale: expected one of l1, none"),
    ("ties", 2, {"consensus": "majority"}, "consensus: expected one of sum, count"),
    ("ties", 3, {"weight": [1, 2]}, "got 2 weight values for 3"),
    ("linear", 2, {"weight": [0.5, -0.5], "normalize": True}, "sum to zero"),
])
def test_invalid_parameters_are_clear_errors(tmp_path, method, models, params, message):
    rng = np.random.default_rng(0)
    base, fts = make_inputs(rng, "fp32", models, {"w": (4,)})
    b, ms = write_inputs(tmp_path, base, fts)
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        safeblend.merge(b, ms, tmp_path / "out", method=method, **params)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_large_chunks_span_several_compute_blocks(tmp_path, case):
    """The default 16 MiB chunk holds whole tensors, each cut into several compute blocks."""
    n_models, params, reference = CASES[case]
    method = case.removesuffix("-normalize").removesuffix("-count").removesuffix("-l1")
    # 3 rows of just over half a block: the tensor spans two compute blocks, the second partial.
    shapes = {"model.layers.0.mlp.up_proj.weight": (3, COMBINE_BLOCK // 2 + 1), "model.layers.1.mlp.up_proj.weight": (5,)}
    base, models = make_inputs(np.random.default_rng(zlib.crc32(case.encode())), "bf16", n_models, shapes)
    out = run(tmp_path, base, models, method, chunk_size=16 << 20, **params)
    for name in base:
        ms = [m[name] for m in models]
        assert_within_tolerance(out[name], reference(name, base[name], ms),
                                [base[name], *ms, operand_scale(method, base[name], ms)], f"{case} {name}")


@pytest.mark.parametrize("case", ["ties", "ties-count"])
@pytest.mark.parametrize("chunk_size", ["1MiB", "16MiB"])
def test_ties_on_a_tensor_large_enough_to_be_sampled(tmp_path, case, chunk_size):
    """Above _select.SMALL elements the threshold's first pass reads only a sample of each
    chunk (safeblend.methods._sparse, _accumulate_sample); the merge still equals the float64
    reference, whose thresholds come from a full sort."""
    from safeblend.methods import _select

    n_models, params, reference = CASES[case]
    rows = _select.SMALL // 1024 + 77  # just above SMALL elements, not a multiple of the sample stride
    shapes = {"model.layers.0.mlp.up_proj.weight": (rows, 1024)}
    base, models = make_inputs(np.random.default_rng(zlib.crc32(case.encode())), "bf16", n_models, shapes)
    out = run(tmp_path, base, models, "ties", chunk_size=chunk_size, **params)
    for name in base:
        ms = [m[name] for m in models]
        assert_within_tolerance(out[name], reference(name, base[name], ms),
                                [base[name], *ms, operand_scale("ties", base[name], ms)], f"{case} {name}")


def test_breadcrumbs_on_a_tensor_above_the_sampling_size(tmp_path):
    """Both thresholds through the sampled selection (tensors above _select.SMALL elements)."""
    from safeblend.methods._select import SMALL

    rng = np.random.default_rng(31)
    shapes = {"model.layers.0.mlp.up_proj.weight": (SMALL // 512 + 7, 1024)}
    base, models = make_inputs(rng, "fp32", 2, shapes)
    out = run(tmp_path, base, models, "breadcrumbs-ties", chunk_size="1MiB", weight=[0.7, 0.5], density=0.2,
              gamma=[0.02, 0.1])
    name = next(iter(shapes))
    ms = [m[name] for m in models]
    ref = ref_breadcrumbs(base[name], ms, [0.7, 0.5], [0.2, 0.2], [0.02, 0.1], elect=True)
    assert_within_tolerance(out[name], ref, [base[name], *ms, operand_scale("breadcrumbs-ties", base[name], ms)],
                            name)


# -- DELLA ------------------------------------------------------------------------------------------

def ref_counters(seed: int, name: str, model: int, n: int) -> np.ndarray:
    """u_j of the counter-based generator (engine/methods/_rng.py docstring), j < n."""
    h = 0xCBF29CE484222325
    for byte in name.encode():
        h = ((h ^ byte) * 0x100000001B3) & _M64
    key = _mix_int(_mix_int(_mix_int(seed + _GAMMA) ^ h) + (model + 1) * _GAMMA)
    j = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix_array(np.uint64(key) + (j + np.uint64(1)) * np.uint64(_GAMMA))


def ref_della(name, base, models, weights, densities, epsilons, elect, normalize, scale=1.0, rescale=True, seed=0):
    """DELLA from its formula: per row, keep with probability ρ − ε + 2ε·(rank − 1)/(m − 1)."""
    deltas = []
    for i, (m, p, e) in enumerate(zip(models, densities, epsilons)):
        d = f64(m) - f64(base)
        if p >= 1:
            deltas.append(d)
            continue
        if p <= 0:
            deltas.append(np.zeros_like(d))
            continue
        rows = np.abs(d).reshape(-1, d.shape[-1] if d.ndim else 1)
        ranks = np.argsort(np.argsort(rows, axis=1, kind="stable"), axis=1, kind="stable").astype(np.float64)
        norm = ranks / (rows.shape[1] - 1) if rows.shape[1] > 1 else ranks * 0
        probability = ((p - e) + 2 * e * norm).ravel()
        u = ref_counters(seed, name, i, d.size)
        keep = ((u >> np.uint64(11)) < np.floor(probability * 2.0**53).astype(np.uint64)).reshape(d.shape)
        kept = np.where(keep, d, 0.0)
        before, after = np.abs(d).sum(), np.abs(kept).sum()
        if rescale and min(before, after) >= 1e-7:
            kept = kept * (before / after)
        deltas.append(kept)
    return ref_combine(base, deltas, weights, elect, normalize, scale)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])  # deltas exact in fp32: the ranks are the formula's
@pytest.mark.parametrize("method", ["della", "della-linear"])
def test_della_matches_float64_reference(tmp_path, method, dtype):
    rng = np.random.default_rng(zlib.crc32(f"{method}/{dtype}".encode()))
    base, models = make_inputs(rng, dtype, 3)
    weights, densities, epsilons = [1.0, 0.5, 0.8], [0.4, 0.7, 1.0], [0.1, 0.25, 0.05]
    elect = method == "della"
    out = run(tmp_path, base, models, method, weight=weights, density=densities, epsilon=epsilons, seed=5,
              lambda_=0.9)
    for name in base:
        ms = [m[name] for m in models]
        ref = ref_della(name, base[name], ms, weights, densities, epsilons, elect, normalize=elect, scale=0.9,
                        seed=5)
        assert_within_tolerance(out[name], ref, [base[name], *ms, operand_scale(method, base[name], ms)],
                                f"{method} {dtype} {name}")


def test_della_is_the_same_for_any_chunking(tmp_path):
    rng = np.random.default_rng(4)
    base, models = make_inputs(rng, "bf16", 2)
    first = run(tmp_path, base, models, "della", out="a", chunk_size=4096, density=0.5, epsilon=0.2)
    second = run(tmp_path, base, models, "della", out="b", chunk_size="1MiB", density=0.5, epsilon=0.2)
    for name in base:
        np.testing.assert_array_equal(first[name], second[name])


@pytest.mark.parametrize("method", ["della", "della-linear"])
def test_della_ranks_rows_cut_by_chunks_and_rows_longer_than_a_block(tmp_path, method):
    """A row a chunk cuts is ranked whole (read through the tensor's reader), also a row longer
    than the combine block (a 300,000-element vector is one row) and rows of odd length: the
    float64 reference, through 4 KiB chunks."""
    rng = np.random.default_rng(17)
    shapes = {"model.norm.weight": (300_000,), "model.layers.0.mlp.up_proj.weight": (9, 1001)}
    base = {n: rng.standard_normal(s).astype(np.float16) for n, s in shapes.items()}
    models = [{n: (t.astype(np.float32) + 0.1 * rng.standard_normal(t.shape)).astype(np.float16)
               for n, t in base.items()} for _ in range(2)]
    weights, densities, epsilons = [0.6, 0.9], [0.5, 0.3], [0.2, 0.1]
    elect = method == "della"
    out = run(tmp_path, base, models, method, chunk_size=4096, weight=weights, density=densities,
              epsilon=epsilons, seed=3)
    for name in base:
        ms = [m[name] for m in models]
        ref = ref_della(name, base[name], ms, weights, densities, epsilons, elect, normalize=elect, seed=3)
        assert_within_tolerance(out[name], ref, [base[name], *ms, operand_scale(method, base[name], ms)], name)


@pytest.mark.parametrize("params,message", [
    ({"density": 0.1, "epsilon": 0.15}, "density ± epsilon must lie in \\(0, 1\\)"),
    ({"density": 0.9, "epsilon": 0.2}, "density ± epsilon must lie in \\(0, 1\\)"),
])
def test_della_refuses_epsilon_outside_the_density(tmp_path, params, message):
    rng = np.random.default_rng(5)
    base, models = make_inputs(rng, "bf16", 1, {"model.layers.0.w": (4, 4)})
    with pytest.raises(SpecError, match=message):
        run(tmp_path, base, models, "della", **params)
