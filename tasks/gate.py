from __future__ import annotations

from prefect import task

from metamerge import stages
from metamerge.gate import GateDecision
from metamerge.recipe import Recipe
from tasks.policy import JITTER, NETWORK_BACKOFF, NETWORK_RETRIES, retry_unless_input_error


@task(name="quality-gate", task_run_name="quality gate", retries=NETWORK_RETRIES, retry_delay_seconds=NETWORK_BACKOFF,
      retry_jitter_factor=JITTER, retry_condition_fn=retry_unless_input_error)
def check_quality_gate(recipe: Recipe, normalized_average: float) -> GateDecision:
    """Never cached: the last published merge it compares with may have changed since."""
    return stages.check_gate(recipe, normalized_average)
