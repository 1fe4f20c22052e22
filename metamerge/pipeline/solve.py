"""The solve stage: the coefficients, in closed form from the statistics (no data, no search)."""

from __future__ import annotations

from pathlib import Path

from metamerge.engine.coefficients import Coefficients, solve_constant, solve_metagpt
from metamerge.engine.taskvectors import TaskVectorStats
from metamerge.io.shared import SharedStore
from metamerge.methods.plan import MergePlan


def solve(labels: list[str], stats_files: list[Path], plan: MergePlan, method_name: str,
          store: SharedStore | None = None) -> Coefficients:
    if plan.weighting == "metagpt":
        stats = [TaskVectorStats.load(store.ensure(Path(p)) if store else Path(p)) for p in stats_files]
        return solve_metagpt(labels, {s.label: s.sq_norms for s in stats}, plan.granularity, method_name)
    weight = 1.0 / len(labels) if plan.weighting == "uniform" else plan.weight
    return solve_constant(labels, weight, method_name)
