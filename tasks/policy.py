"""Retry policy shared by every task: retry the world, never a deterministic input error."""

from __future__ import annotations

from prefect.tasks import exponential_backoff

from metamerge.errors import is_retryable

NETWORK_RETRIES = 4
NETWORK_BACKOFF = exponential_backoff(backoff_factor=1)
JITTER = 0.5


def retry_unless_input_error(task, task_run, state) -> bool:
    """A shape mismatch or bad recipe fails the same way every time: fail at once."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the exception itself is the question
        return is_retryable(exc)
    return True
