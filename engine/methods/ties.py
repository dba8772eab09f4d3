"""TIES merging (Yadav et al., 2023): trim, elect signs, disjoint merge.

For task vectors dᵢ = θ_ftᵢ − θ_base of one tensor (n elements), weights wᵢ (default 1),
densities ρᵢ (default 1) and scale λ (default 1):

    trim:    d̃ᵢ = dᵢ where |dᵢ| ≥ τᵢ, else 0;  τᵢ = the kᵢ-th largest |dᵢ|, kᵢ = ⌊ρᵢ·n⌋
             (every entry equal to τᵢ is kept; kᵢ = 0 keeps nothing)
    elect:   eᵢ = wᵢ·d̃ᵢ;  S = Σᵢ eᵢ (consensus "sum", default) or Σᵢ sign(eᵢ) ("count");
             σ = +1 where S ≥ 0, −1 elsewhere;  aᵢ = [sign(eᵢ) = σ]
    merge:   Δ = Σᵢ aᵢ·eᵢ / Σᵢ aᵢ·wᵢ   (the average over the models that agree; with
             normalize: false the division is skipped; a zero divisor counts as 1)
    θ = θ_base + λ·Δ

τᵢ is exact, found by streaming selection over the bit patterns of the fp32 magnitudes
(``safeblend.methods._select``): a sampled histogram pass, then an exact count in the range it
points to (a third or fourth pass only when that range is wide or the sample misled), no sort
and no copy of the tensor. Every
parameter may vary by tensor. The per-element work is numpy (CPU) for now.
"""

from __future__ import annotations

from . import register
from ._sparse import SparseTaskArithmetic


@register
class Ties(SparseTaskArithmetic):
    name = "ties"
    sparsify = "magnitude"
    elect_signs = True
    default_normalize = True
