from __future__ import annotations

from pathlib import Path

from prefect import task

from metamerge import stages
from metamerge.refs import ResolvedModel
from tasks.caching import resolve_key
from tasks.policy import JITTER, NETWORK_BACKOFF, NETWORK_RETRIES, retry_unless_input_error


@task(name="resolve", retries=NETWORK_RETRIES, retry_delay_seconds=NETWORK_BACKOFF,
      retry_jitter_factor=JITTER, retry_condition_fn=retry_unless_input_error,
      task_run_name="resolve {ref}", cache_key_fn=resolve_key, persist_result=True)
def resolve_model(ref: str, workdir: str, endpoint_url: str | None = None) -> ResolvedModel:
    """Network stage (s3://, hf:// refs download): retried with backoff and jitter."""
    return stages.resolve(ref, Path(workdir), endpoint_url)
