from __future__ import annotations

from prefect import task
from prefect.artifacts import create_link_artifact

from metamerge import stages
from metamerge.recipe import Recipe
from tasks.policy import JITTER, NETWORK_BACKOFF, NETWORK_RETRIES, retry_unless_input_error


@task(name="publish", retries=NETWORK_RETRIES, retry_delay_seconds=NETWORK_BACKOFF,
      retry_jitter_factor=JITTER, retry_condition_fn=retry_unless_input_error)
def publish_model(recipe: Recipe, merged: stages.MergeOutput, run_id: str, documents: dict[str, str]) -> dict:
    """Network stage: retried; idempotent because uploads skip objects whose sha256 matches."""
    result = stages.publish(recipe, merged, run_id, documents)
    create_link_artifact(key="published-manifest", link=result.manifest_uri, link_text=result.manifest_uri,
                         description="manifest of the published merge")
    return {"run_uri": result.run_uri, "manifest_uri": result.manifest_uri,
            "uploaded": result.uploaded, "skipped": result.skipped}
