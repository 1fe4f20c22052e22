from __future__ import annotations

from pathlib import Path

from prefect import task

from metamerge import stages
from metamerge.refs import ResolvedModel
from tasks.policy import JITTER, NETWORK_BACKOFF, NETWORK_RETRIES, retry_unless_input_error


@task(name="resolve", retries=NETWORK_RETRIES, retry_delay_seconds=NETWORK_BACKOFF,
      retry_jitter_factor=JITTER, retry_condition_fn=retry_unless_input_error,
      task_run_name="resolve {ref}")
def resolve_model(ref: str, workdir: str) -> ResolvedModel:
    """Network stage (s3://, hf:// refs download): retried with backoff and jitter."""
    return stages.resolve(ref, Path(workdir))
