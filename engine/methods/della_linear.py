"""DELLA without sign election (mergekit's ``della_linear``).

The drop and rescale of ``della`` (keep dᵢⱼ with probability ρᵢ − εᵢ + 2εᵢ·(rⱼ − 1)/(m − 1) by
its magnitude's rank in its row; L1 rescale by default), then Δ = Σᵢ wᵢ·d̃ᵢ, divided by Σᵢ wᵢ
with normalize (default false); θ = θ_base + λ·Δ.
"""

from __future__ import annotations

from . import register
from ._sparse import SparseTaskArithmetic


@register
class DellaLinear(SparseTaskArithmetic):
    name = "della-linear"
    sparsify = "della"
    elect_signs = False
    default_normalize = False
    default_rescale = "l1"
