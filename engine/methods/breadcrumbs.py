"""Model Breadcrumbs (Davari & Belilovsky, 2023): drop each task vector's smallest entries and
its largest outliers, then add, as mergekit's ``breadcrumbs`` does.

For task vectors dᵢ = θ_ftᵢ − θ_base of one tensor (n elements), weights wᵢ, densities ρᵢ
(default 1), outlier fractions γᵢ (``gamma``, default 0.01) and scale λ (default 1):

    trim:  with kᵢ = ⌊ρᵢ·n⌋ and tᵢ = ⌊γᵢ·n⌋ (tᵢ lowered to n − kᵢ where kᵢ + tᵢ > n), drop the
           tᵢ largest |dᵢ| and keep the next kᵢ:  d̃ᵢ = dᵢ where τᵢ ≤ |dᵢ| < τ'ᵢ, τ'ᵢ the tᵢ-th
           largest |dᵢ| (nothing dropped from the top when tᵢ = 0) and τᵢ the (kᵢ + tᵢ)-th
           largest; ρᵢ ≥ 1 keeps dᵢ whole; ``rescale: l1`` scales d̃ᵢ by ‖dᵢ‖₁/‖d̃ᵢ‖₁
    merge: Δ = Σᵢ wᵢ·d̃ᵢ, divided by Σᵢ wᵢ with normalize (default false)
    θ = θ_base + λ·Δ

Both thresholds are exact, from the streaming selection TIES uses (``safeblend.methods._select``),
two selectors per task vector in the same passes. Ties at a threshold are all kept (or all
dropped as outliers). Where tᵢ = 0 mergekit's slice ``[bottom:-0]`` keeps nothing at all;
safeblend keeps the kᵢ largest, which is what the method means.
"""

from __future__ import annotations

from . import register
from ._sparse import SparseTaskArithmetic


@register
class Breadcrumbs(SparseTaskArithmetic):
    name = "breadcrumbs"
    sparsify = "outliers"
    elect_signs = False
    default_normalize = False
