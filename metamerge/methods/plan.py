"""A merge plan: every method of the paper as three independent choices.

Every method is `sparsify` (none | magnitude top-k = TIES trim | random drop with rescale = DARE),
then `consensus` (none | TIES sign election), then a weighted combination with per-task weights
w_t, optionally normalized by the weight of the entries that survived (TIES' disjoint mean),
times a global scale. The registry maps each named method onto one plan; the kernels and the
engine only ever see plans, so a new method that is a new combination needs no engine change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# magnitude: TIES' top-k; outliers: Breadcrumbs (top-k without the largest γ·n); random: DARE; ranked: DELLA
Sparsify = Literal["none", "magnitude", "outliers", "random", "ranked"]
Consensus = Literal["none", "ties"]
Weighting = Literal["uniform", "constant", "metagpt"]
Spectral = Literal["none", "iso"]


@dataclass(frozen=True)
class MergePlan:
    sparsify: Sparsify = "none"
    density: float = 1.0
    seed: int | None = None
    consensus: Consensus = "none"
    weighting: Weighting = "metagpt"
    weight: float = 1.0  # per-task weight when weighting == "constant"
    scale: float = 1.0
    normalize: bool = False
    granularity: str = "model"
    gamma: float = 0.0  # Breadcrumbs: share of largest |τ| removed as outliers
    epsilon: float = 0.0  # DELLA: keep probabilities span density ± epsilon, by magnitude rank in a row
    spectral: Spectral = "none"  # iso: Iso-C's flattened spectrum of each weight matrix's merged update

    @property
    def needs_norms(self) -> bool:
        return self.weighting == "metagpt"

    @property
    def random(self) -> bool:
        """Drops entries at random: needs a seed, and tied tensors must share their masks."""
        return self.sparsify in ("random", "ranked")

    @property
    def linear(self) -> bool:
        """Δ = scale · Σ w_t τ_t, element-wise: the engine's one-pass path."""
        return (self.sparsify == "none" and self.consensus == "none" and not self.normalize
                and self.spectral == "none")
