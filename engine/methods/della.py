"""DELLA (Deep, Sen et al., 2024; mergekit's ``della``): magnitude-ranked random drop, L1
rescale, TIES's sign election.

For task vectors dᵢ = θ_ftᵢ − θ_base, weights wᵢ, densities ρᵢ, ``epsilon`` εᵢ (default 0.15)
and scale λ (default 1), per row (the last dimension; a vector is one row) of m entries:

    drop:    keep dᵢⱼ with probability ρᵢ − εᵢ + 2εᵢ·(rⱼ − 1)/(m − 1), rⱼ ∈ 1..m the rank of
             |dᵢⱼ| in its row (ascending; ties in index order), from the counter-based generator
             keyed by (seed, tensor name, i, j) (``safeblend.methods._rng``); ρᵢ ≥ 1 keeps dᵢ
             whole, ρᵢ ≤ 0 drops it; 0 < ρᵢ < 1 needs ρᵢ ± εᵢ in (0, 1)
    rescale: ``l1`` (default, mergekit's ``rescale: true``): the kept entries scaled by
             ‖dᵢ‖₁/‖keptᵢ‖₁ (1 where either is below 1e-7); ``none``
    elect:   eᵢ = wᵢ·d̃ᵢ; σ = +1 where Σ eᵢ ≥ 0 ("sum", default; "count": Σ sign eᵢ), −1 elsewhere
    merge:   Δ = Σ agreeing eᵢ, ÷ Σ agreeing wᵢ with normalize (default true); θ = θ_base + λ·Δ

Ranks need whole rows: a chunk's rows are ranked from the chunk, and a row a chunk cuts is
read whole for the purpose (at most two per chunk, so memory stays a row per model). The L1
norms come from one reduce pass. Tensors of 3 or more dimensions are refused (mergekit ranks
them along dimension 1).
"""

from __future__ import annotations

from . import register
from ._sparse import SparseTaskArithmetic


@register
class Della(SparseTaskArithmetic):
    name = "della"
    sparsify = "della"
    elect_signs = True
    default_normalize = True
    default_rescale = "l1"
