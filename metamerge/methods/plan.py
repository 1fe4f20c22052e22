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

Sparsify = Literal["none", "magnitude", "random"]
Consensus = Literal["none", "ties"]


Weighting = Literal["uniform", "constant", "metagpt"]


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

    @property
    def needs_norms(self) -> bool:
        return self.weighting == "metagpt"
