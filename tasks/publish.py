from __future__ import annotations

from prefect import task

from metamerge import stages
from metamerge.recipe import Recipe
from tasks.caching import publish_key
from tasks.policy import JITTER, NETWORK_BACKOFF, NETWORK_RETRIES, retry_unless_input_error


@task(name="publish", task_run_name="publish", retries=NETWORK_RETRIES, retry_delay_seconds=NETWORK_BACKOFF,
      retry_jitter_factor=JITTER, retry_condition_fn=retry_unless_input_error,
      cache_key_fn=publish_key, persist_result=True)
def publish_model(recipe: Recipe, merged: stages.MergeOutput, run_id: str, documents: dict[str, str],
                  normalized_average: float | None = None) -> dict:
    """Network stage: retried; idempotent because uploads skip objects whose sha256 matches."""
    result = stages.publish(recipe, merged, run_id, documents, normalized_average)
    return {"run_uri": result.run_uri, "manifest_uri": result.manifest_uri,
            "uploaded": result.uploaded, "skipped": result.skipped}
