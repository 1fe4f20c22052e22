"""The quality-gate task: never cached, since the last publish it compares with may have changed."""

from __future__ import annotations

from prefect import task

from metamerge.evaluation.gate import GateDecision
from metamerge.pipeline.publish import check_gate
from metamerge.recipe import Recipe
from metamerge_prefect.tasks.policy import NETWORK_RETRY


@task(name="quality-gate", task_run_name="quality gate", **NETWORK_RETRY)
def check_quality_gate(recipe: Recipe, normalized_average: float) -> GateDecision:
    """Never cached: the last published merge it compares with may have changed since."""
    return check_gate(recipe, normalized_average)
