"""The solve task: closed-form coefficients, shown in the UI as a table."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact

from metamerge.io.shared import SharedStore
from metamerge.methods.plan import MergePlan
from metamerge.pipeline.extract import load_stats, relative_norms
from metamerge.pipeline.report import coefficient_records
from metamerge.pipeline.solve import solve
from metamerge_prefect.tasks.caching import solve_key
from metamerge_prefect.tasks.payloads import solved_payload


@task(name="solve", task_run_name="solve", cache_key_fn=solve_key, persist_result=True)
def solve_coefficients(labels: list[str], stats_files: list[str], plan: MergePlan, method_name: str,
                       store: SharedStore | None = None) -> dict:
    """Closed-form λ; published as a table artifact so the UI shows what each fine-tune got."""
    coefficients = solve(labels, [Path(p) for p in stats_files], plan, method_name, store)
    norms = relative_norms(load_stats([Path(p) for p in stats_files], store))
    create_table_artifact(key="merge-coefficients", table=coefficient_records(coefficients, plan, norms),
                          description=f"λ and relative task-vector norm ‖τ‖/‖θ₀‖ per fine-tune ({method_name}, "
                                      "model level)")
    return solved_payload(coefficients)
