"""Model Breadcrumbs with TIES's sign election (mergekit's ``breadcrumbs_ties``).

The trim of ``breadcrumbs`` (drop the ⌊γᵢ·n⌋ largest |dᵢ|, keep the next ⌊ρᵢ·n⌋), then the
election of ``ties``: eᵢ = wᵢ·d̃ᵢ; S = Σᵢ eᵢ ("sum", default) or Σᵢ sign(eᵢ) ("count");
σ = +1 where S ≥ 0, −1 elsewhere; Δ = Σ agreeing eᵢ, divided by Σ agreeing wᵢ with normalize
(default false, as in mergekit; a zero divisor counts as 1); θ = θ_base + λ·Δ.
"""

from __future__ import annotations

from . import register
from ._sparse import SparseTaskArithmetic


@register
class BreadcrumbsTies(SparseTaskArithmetic):
    name = "breadcrumbs-ties"
    sparsify = "outliers"
    elect_signs = True
    default_normalize = False
