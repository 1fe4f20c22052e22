"""The publish task, and the rule for trusting its cached result."""

from __future__ import annotations

from prefect import task

from metamerge.errors import TransientError
from metamerge.pipeline.merge import MergeOutput
from metamerge.pipeline.publish import publish, published_intact
from metamerge.recipe import Recipe
from metamerge_prefect.tasks.caching import publish_key
from metamerge_prefect.tasks.policy import NETWORK_RETRY


@task(name="publish", task_run_name="publish", cache_key_fn=publish_key, persist_result=True, **NETWORK_RETRY)
def publish_model(recipe: Recipe, merged: MergeOutput, run_id: str, documents: dict[str, str],
                  normalized_average: float | None = None) -> dict:
    """Network stage: retried; idempotent because uploads skip objects whose sha256 matches."""
    result = publish(recipe, merged, run_id, documents, normalized_average)
    return {"run_uri": result.run_uri, "manifest_uri": result.manifest_uri,
            "uploaded": result.uploaded, "skipped": result.skipped}


def publish_unless_intact(publish_task, rec: Recipe, merged: MergeOutput, run_id: str, asked_run_id: str | None,
                          documents: dict[str, str], normalized_average: float | None) -> dict:
    """The publish task, whose cached result is trusted only while what it claims is still stored.

    Before the call: is the publication still there (latest.json → a manifest of this merge and
    these documents → every listed object present)? If not, the cache is refreshed and the
    publish really runs (idempotent: objects still there are skipped). After a cache hit, its
    manifest must be the one just checked; a result cached elsewhere that points at another run
    is not trusted either. Validation rather than a key that folds in existence: the published
    location depends on the cached result itself (its run id carries the day it was made), and
    a key that changes whenever objects vanish would leave stale entries that match again later.
    """
    try:
        intact = published_intact(rec, merged.fingerprint, documents, asked_run_id)
    except TransientError:
        intact = None  # cannot tell: publish again (the task retries, uploads are idempotent)
    args = (rec, merged, run_id, documents, normalized_average)
    published = publish_task.with_options(refresh_cache=intact is None)(*args)
    if intact is not None and published["manifest_uri"] != intact:
        published = publish_task.with_options(refresh_cache=True)(*args)
    return published
