"""karcher, multislerp, nuslerp and nearswap through safeblend.merge on fp32 models far apart
(so that the iterations and angles matter), many chunks per tensor, against the float64
references of mergekit's formulas in test_mergekit_examples.py."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_within_tolerance
from test_mergekit_examples import ref_karcher, ref_multislerp, ref_nuslerp
from test_methods import SHAPES, f64, make_inputs, run


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(77)
    return make_inputs(rng, "fp32", 3, SHAPES, spread=2.0)  # fine-tunes far from the base and each other


def check(out, base, models, reference, what):
    for name in SHAPES:
        ms = [m[name] for m in models]
        scale = np.abs(f64(base[name])) + sum(np.abs(f64(m)) for m in ms)
        assert_within_tolerance(out[name], reference(name), [base[name], *ms, scale], f"{what} {name}")


@pytest.mark.parametrize("max_iter", [0, 1, 10])
def test_karcher_iterations(tmp_path, inputs, max_iter):
    base, models = inputs
    out = run(tmp_path, base, models, "karcher", max_iter=max_iter, tol=1e-7)
    check(out, base, models, lambda n: ref_karcher([f64(base[n])] + [f64(m[n]) for m in models], max_iter, 1e-7),
          f"karcher max_iter={max_iter}")
    if max_iter == 10:  # the iterations move the result away from the normalised mean
        first = run(tmp_path, base, models, "karcher", out="o0", max_iter=0, tol=1e-7)
        name = "model.layers.1.self_attn.q_proj.weight"
        assert np.max(np.abs(first[name] - out[name])) > 1e-3


@pytest.mark.parametrize("weights", [[0.5, 1.0, 2.0], [1.0, -0.3, 0.6]])
def test_multislerp_with_base(tmp_path, inputs, weights):
    base, models = inputs
    out = run(tmp_path, base, models, "multislerp", weight=weights)
    check(out, base, models, lambda n: ref_multislerp([f64(m[n]) for m in models], weights, f64(base[n])),
          "multislerp")


def test_multislerp_without_base(tmp_path, inputs):
    base, models = inputs
    out = run(tmp_path, base, models[:2], "multislerp", weight=[0.7, 0.2], base_weight=0.4)
    check(out, base, models[:2],
          lambda n: ref_multislerp([f64(base[n]), f64(models[0][n]), f64(models[1][n])], [0.4, 0.7, 0.2], None),
          "multislerp (no base)")


@pytest.mark.parametrize("row_wise,flatten", [(False, True), (False, False), (True, False)])
def test_nuslerp(tmp_path, inputs, row_wise, flatten):
    base, models = inputs
    out = run(tmp_path, base, models[:2], "nuslerp", weight=[0.3, 0.9], row_wise=row_wise, flatten=flatten)
    for name in SHAPES:
        b, d0, d1 = f64(base[name]), f64(models[0][name]) - f64(base[name]), f64(models[1][name]) - f64(base[name])
        ref = b + ref_nuslerp(0.75, d0, d1, row_wise, flatten)
        # fp32 adds c₀·d₀ and c₁·d₁: where short vectors (3 elements per column here) are nearly
        # colinear the coefficients are large and the terms cancel, so the tolerance's scale is theirs
        terms = np.abs(b) + np.abs(d0) + np.abs(d1) + ref_nuslerp(0.75, d0, d1, row_wise, flatten, magnitude=True)
        assert_within_tolerance(out[name], ref, [base[name], models[0][name], models[1][name], terms],
                                f"nuslerp row_wise={row_wise} flatten={flatten} {name}")


def test_nearswap(tmp_path, inputs):
    base, models = inputs
    out = run(tmp_path, base, models[:1], "nearswap", t=0.8)

    def ref(n):
        a, b = f64(base[n]), f64(models[0][n])
        w = np.clip(0.8 / np.maximum(np.abs(a - b), 1e-6), 0, 1)
        return w * b + (1 - w) * a
    check(out, base, models[:1], ref, "nearswap")


def test_arcee_fusion_fp32_far_apart(tmp_path, inputs):
    """Rows cut by chunks (the softmax normalisers and KL sums combine across them), fp32."""
    from test_mergekit_examples import ref_arcee_fusion

    base, models = inputs
    out = run(tmp_path, base, models[:1], "arcee-fusion")
    for name in SHAPES:
        ref = ref_arcee_fusion(f64(base[name]), f64(models[0][name]))
        assert_within_tolerance(out[name], ref, [base[name], models[0][name]], f"arcee-fusion {name}")
