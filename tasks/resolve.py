"""The resolve task: a ref becomes a local folder and a content fingerprint."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from metamerge.pipeline.inputs import resolve
from metamerge.refs import ResolvedModel
from metamerge_prefect.tasks.caching import resolve_key
from metamerge_prefect.tasks.policy import NETWORK_RETRY


@task(name="resolve", task_run_name="resolve {ref}", cache_key_fn=resolve_key, persist_result=True, **NETWORK_RETRY)
def resolve_model(ref: str, workdir: str, endpoint_url: str | None = None, download: bool = True) -> ResolvedModel:
    """Network stage (s3://, hf:// refs download; `download=False`: s3:// is only listed): retried with backoff."""
    return resolve(ref, Path(workdir), endpoint_url, download)
