"""The nightly-history task: the published nights of this model as a keyed table and a trend.

Keyed artifacts are versioned by Prefect, so the UI's artifact page shows one version per night.
"""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from metamerge.pipeline.history import artifact_key, history, trend_lines
from metamerge.recipe import Recipe
from metamerge_prefect.tasks.caching import history_key
from metamerge_prefect.tasks.policy import NETWORK_RETRY


@task(name="nightly-history", task_run_name="nightly history", cache_key_fn=history_key, persist_result=True,
      **NETWORK_RETRY)
def record_history(recipe: Recipe, manifest_uri: str) -> int:
    """Reads every committed publish of the recipe's model; returns how many nights there are.

    Cached by the publish it follows: a night that published nothing new shows nothing new.
    """
    assert recipe.publish is not None
    rows = history(recipe.publish.target, recipe.name, recipe.publish.endpoint_url or recipe.endpoint_url)
    key = artifact_key(recipe.name)
    table = [{**row, "lambda": ", ".join(f"{k} {v:.3f}" for k, v in row["lambda"].items())} for row in rows]
    create_table_artifact(key=key, table=table, description=f"every published night of {recipe.name}")
    create_markdown_artifact(key=f"{key}-trend", markdown="Normalized average per night\n\n```\n"
                             + "\n".join(trend_lines(rows)) + "\n```\n", description=f"trend of {recipe.name}")
    return len(rows)
