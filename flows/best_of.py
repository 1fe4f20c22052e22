"""Best of several (`candidates:` in a recipe): merge and score each, publish the best.

Each candidate is a merge_flow subflow with publishing and the gate off, over the same cached
pipeline (resolve, extract and the base's and fine-tunes' scores run once). The winner by
normalized average is then run once more with the full recipe: every stage is a cache hit, so
that run only gates and publishes, with every candidate's scores in its report and artifacts.
"""

from __future__ import annotations

from typing import Any

from prefect import Flow, get_run_logger
from prefect.artifacts import create_table_artifact

from metamerge.evaluation.compare import choose_best, method_label
from metamerge.recipe import Recipe


def best_of(flow: Flow, rec: Recipe, run_id: str | None) -> dict[str, Any]:
    logger = get_run_logger()
    runs: dict[str, dict[str, Any]] = {}
    # candidates may differ only in their seed: the label names it then
    by_label = {method_label(method) + (f":seed={method.seed}" if method.seed is not None else ""): method
                for method in rec.candidates}
    for label, method in by_label.items():
        variant = rec.model_copy(update={"method": method, "candidates": (), "publish": None, "gate": None})
        parameters = variant.model_dump(mode="json", by_alias=True, exclude_none=True)
        runs[label] = flow.with_options(flow_run_name=f"{rec.name} · candidate {label}")(parameters)
        logger.info("candidate %s: avg_norm %.4f", label, runs[label]["normalized_average"] or 0.0)
    best, records = choose_best(runs)
    create_table_artifact(key="merge-candidates", table=records,
                          description=f"best of {len(records)} by normalized average: {best}")
    winner = rec.model_copy(update={"method": by_label[best], "candidates": ()})
    parameters = winner.model_dump(mode="json", by_alias=True, exclude_none=True)
    summary = flow.with_options(flow_run_name=f"{rec.name} · {best} (best of {len(records)})")(
        parameters, run_id, candidates=records)
    return {**summary, "candidates": records, "chosen": best}
