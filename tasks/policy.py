"""Retry policy shared by every task: retry the world, never a deterministic input error."""

from __future__ import annotations

import os

from prefect.tasks import exponential_backoff

from metamerge.errors import is_retryable

NETWORK_RETRIES = int(os.environ.get("METAMERGE_NETWORK_RETRIES", "4"))
# seconds before retry k: factor · 2^k (tests shrink the factor; production waits 2, 4, 8, 16 s)
NETWORK_BACKOFF = exponential_backoff(backoff_factor=float(os.environ.get("METAMERGE_RETRY_BACKOFF", "2")))
JITTER = 0.5


def retry_unless_input_error(task, task_run, state) -> bool:
    """A shape mismatch or bad recipe fails the same way every time: fail at once."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the exception itself is the question
        return is_retryable(exc)
    return True


# the options of every network-facing task (resolve, gate, publish, shard transfers)
NETWORK_RETRY = {"retries": NETWORK_RETRIES, "retry_delay_seconds": NETWORK_BACKOFF, "retry_jitter_factor": JITTER,
                 "retry_condition_fn": retry_unless_input_error}
