"""compare_flow: the same recipe merged with every method, one scored table (docs/design.md §6).

Each method is a `merge_flow` subflow over the same cached pipeline, so the base and the
fine-tunes are resolved, extracted and scored once, and only the merges and their
evaluations differ. Comparisons never publish and never gate: they inform the choice of the
method a nightly recipe then uses.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from metamerge import progress
from metamerge.evaluation.compare import DEFAULT_METHODS, Comparison, method_label, parse_method
from metamerge.recipe import load_any
from metamerge_prefect.flows.merge_flow import merge_flow


@flow(name="metagpt-compare", log_prints=True)
def compare_flow(recipe: str | dict[str, Any], methods: list[str] | None = None, seed: int = 0) -> dict[str, Any]:
    logger = get_run_logger()
    rec = load_any(recipe)
    chosen = [parse_method(spec, seed) for spec in (methods or DEFAULT_METHODS)]
    runs: dict[str, dict[str, Any]] = {}
    for method in chosen:
        label = method_label(method)
        variant = rec.model_copy(update={"method": method, "candidates": (), "publish": None, "gate": None})
        parameters = variant.model_dump(mode="json", by_alias=True, exclude_none=True)  # a flow parameter is JSON
        with progress.scoped(label):  # the CLI shows one line per method
            runs[label] = merge_flow.with_options(flow_run_name=f"{rec.name} · {label}")(parameters)
        logger.info("%s: avg_norm %.4f", label, runs[label]["normalized_average"] or 0.0)
    comparison = Comparison.from_runs(runs)
    create_table_artifact(key="method-comparison", table=comparison.records(),
                          description="absolute scores per task; avg_norm = merged / own fine-tune")
    create_markdown_artifact(key="method-comparison-report", markdown=comparison.to_markdown(),
                             description=f"methods compared on {rec.name}")
    return {"recipe": rec.name, "tasks": list(comparison.tasks), "rows": comparison.rows, "kinds": comparison.kinds,
            "coefficients": comparison.coefficients, "best": comparison.best_method()}
