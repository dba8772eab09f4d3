"""DARE (Yu et al., 2024) with a linear combination: drop and rescale, then add.

For task vectors dᵢ = θ_ftᵢ − θ_base, weights wᵢ (default 1), densities ρᵢ (default 1),
scale λ (default 1):

    drop:     mᵢⱼ ~ Bernoulli(ρᵢ) from the counter-based generator keyed by
              (seed, tensor name, i, j) (``safeblend.methods._rng``)
    rescale:  d̃ᵢ = sᵢ·mᵢ·dᵢ with sᵢ = 1/ρᵢ (rescale "density", the DARE paper's rule and the
              default), ‖dᵢ‖₁ / ‖mᵢ·dᵢ‖₁ ("l1": the kept entries carry the task vector's
              whole L1 norm; 1 where either norm is below 1e-7, as in mergekit, whose
              recipes' ``rescale: true`` means this) or 1 ("none")
    merge:    Δ = Σᵢ wᵢ·d̃ᵢ, divided by Σᵢ wᵢ with normalize (default false)
    θ = θ_base + λ·Δ

The same seed (default 0) gives the same output for any chunk size, thread count or device.
The L1 norms come from one reduce pass over the chunks, on the CPU. Without them (rescale
"density" or "none") the per-element work also runs on a GPU, in one fused Triton kernel
(``safeblend.kernels.triton_backend.dare_linear``) that reproduces the CPU's mask and arithmetic bit for
bit.
"""

from __future__ import annotations

from . import register
from ._sparse import SparseTaskArithmetic


@register
class DareLinear(SparseTaskArithmetic):
    name = "dare-linear"
    sparsify = "random"
    elect_signs = False
    default_normalize = False
