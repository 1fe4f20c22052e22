from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact

from metamerge import stages
from metamerge.coefficients import Coefficients
from metamerge.methods import MergePlan
from metamerge.shared import SharedStore
from tasks.caching import solve_key


@task(name="solve", task_run_name="solve", cache_key_fn=solve_key, persist_result=True)
def solve_coefficients(labels: list[str], stats_files: list[str], plan: MergePlan, method_name: str,
                       store: SharedStore | None = None) -> dict:
    """Closed-form λ; published as a table artifact so the UI shows what each fine-tune got."""
    coefficients = stages.solve(labels, [Path(p) for p in stats_files], plan, method_name, store)
    norms = stages.relative_norms(stages.load_stats([Path(p) for p in stats_files], store))
    create_table_artifact(key="merge-coefficients", table=stages.coefficient_records(coefficients, plan, norms),
                          description=f"λ and relative task-vector norm ‖τ‖/‖θ₀‖ per fine-tune ({method_name}, "
                                      "model level)")
    return {"json": coefficients.to_json()}


def coefficients_of(solved: dict) -> Coefficients:
    return Coefficients.from_json(solved["json"])
