"""ram and ramplus-tl through safeblend.merge, on fine-tunes that each move only part of the
entries (so entries moved by one model, by several and by none all occur), many chunks per
tensor, against float64 references of mergekit's formulas (merge_methods/ram.py)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_within_tolerance
from test_methods import SHAPES, f64, run


def sparse_inputs(seed: int, n_models: int = 3):
    rng = np.random.default_rng(seed)
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    models = []
    for i in range(n_models):
        model = {}
        for n, t in base.items():
            moved = rng.random(t.shape) < (0.3 + 0.2 * i)  # each model moves its own share of entries
            step = rng.standard_normal(t.shape) * np.where(rng.random(t.shape) < 0.1, 1e-7, 0.5)  # some below ε
            model[n] = np.where(moved, t + step, t).astype(np.float32)
        models.append(model)
    return base, models


def ref_ram(base, models, epsilon=1e-5, r=None, alpha=None):
    b = f64(base)
    d = np.stack([f64(m) - b for m in models]).reshape(len(models), -1)
    nonzero = np.abs(d) > epsilon
    counts = nonzero.sum(0, keepdims=True)
    overlap, unique = counts > 1, counts == 1
    scale = np.ones((len(models), 1))
    if r is not None:
        shared_counts = (nonzero & overlap).sum(1)
        unique_counts = (nonzero & unique).sum(1)
        rho = shared_counts / np.maximum(unique_counts, epsilon)
        scale = (1 + r * np.clip(rho, 0, alpha))[:, None]
    dz = d * nonzero
    merged = (dz * unique * scale + dz * overlap / np.maximum(counts, 1)).sum(0)
    return b + merged.reshape(b.shape)


def check(out, base, models, reference, what, most=1.0):
    """``most``: the largest factor a delta is scaled by (RAM+'s λ), for the tolerance's scale."""
    for name in SHAPES:
        ms = [m[name] for m in models]
        scale = np.abs(f64(base[name])) + sum(np.abs(f64(m)) for m in ms) + \
            most * sum(np.abs(f64(m) - f64(base[name])) for m in ms)
        assert_within_tolerance(out[name], reference(name), [base[name], *ms, scale], f"{what} {name}")


@pytest.mark.parametrize("epsilon", [1e-5, 0.3])
def test_ram(tmp_path, epsilon):
    base, models = sparse_inputs(1)
    out = run(tmp_path, base, models, "ram", epsilon=epsilon)
    check(out, base, models, lambda n: ref_ram(base[n], [m[n] for m in models], epsilon), "ram")


@pytest.mark.parametrize("r,alpha", [(0.1, 0.2), (0.05, 1.0), (2.0, 5.0)])
def test_ramplus_tl(tmp_path, r, alpha):
    base, models = sparse_inputs(2)
    out = run(tmp_path, base, models, "ramplus-tl", r=r, alpha=alpha)
    check(out, base, models, lambda n: ref_ram(base[n], [m[n] for m in models], 1e-5, r, alpha), "ramplus-tl",
          most=1 + r * alpha)
    # the unique entries are scaled: not plain RAM
    plain = run(tmp_path, base, models, "ram", out="plain")
    name = "model.layers.1.self_attn.q_proj.weight"
    assert np.max(np.abs(out[name] - plain[name])) > 1e-3


def ref_sce(base, models, density):
    """mergekit's sce_merge(): variance selection, energy weights, sign erasure."""
    b = f64(base)
    tv = np.stack([f64(m) - b for m in models])
    if density < 1:
        var = tv.var(axis=0)
        k = int(np.count_nonzero(var) * density)
        if density <= 0 or k == 0:
            tv = tv * 0
        else:
            tau = np.sort(var.ravel())[::-1][k - 1]  # ties at the threshold all kept
            tv = tv * (var >= tau)
    energy = (tv ** 2).reshape(len(models), -1).mean(axis=1)
    weights = np.full(len(models), 1 / len(models)) if abs(energy.sum()) < 1e-6 else energy / energy.sum()
    w = weights.reshape(-1, *([1] * b.ndim))
    sigma = np.where(tv.sum(0) >= 0, 1.0, -1.0)
    erased = w * (np.sign(tv) == sigma)
    return b + (tv * erased).sum(0) / np.maximum(erased.sum(0), 1e-6)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.1, 0.0])
def test_sce(tmp_path, density):
    base, models = sparse_inputs(3)
    out = run(tmp_path, base, models, "sce", select_topk=density)
    check(out, base, models, lambda n: ref_sce(base[n], [m[n] for m in models], density), f"sce {density}",
          most=3.0)
