"""DARE sparsification (Yu et al., 2024) followed by TIES sign election.

For task vectors dᵢ = θ_ftᵢ − θ_base, weights wᵢ (default 1), densities ρᵢ (default 1),
scale λ (default 1):

    drop:     mᵢⱼ ~ Bernoulli(ρᵢ) from the counter-based generator keyed by
              (seed, tensor name, i, j) (``safeblend.methods._rng``)
    rescale:  d̃ᵢ = sᵢ·mᵢ·dᵢ with sᵢ = 1/ρᵢ ("density", default), ‖dᵢ‖₁ / ‖mᵢ·dᵢ‖₁ ("l1") or 1
    elect:    eᵢ = wᵢ·d̃ᵢ;  S = Σᵢ eᵢ ("sum", default) or Σᵢ sign(eᵢ) ("count");
              σ = +1 where S ≥ 0, −1 elsewhere;  aᵢ = [sign(eᵢ) = σ]
    merge:    Δ = Σᵢ aᵢ·eᵢ, divided by Σᵢ aᵢ·wᵢ with normalize (default false, as in
              mergekit; a zero divisor counts as 1)
    θ = θ_base + λ·Δ

The same seed (default 0) gives the same output for any chunk size, thread count or device.
The per-element work is numpy (CPU) for now.
"""

from __future__ import annotations

from . import register
from ._sparse import SparseTaskArithmetic


@register
class DareTies(SparseTaskArithmetic):
    name = "dare-ties"
    sparsify = "random"
    elect_signs = True
    default_normalize = False
