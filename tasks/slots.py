"""Global concurrency slots around the heavy stages, so that runs share a GPU without colliding.

The nightly run, a trigger run and a second recipe may all reach the merge at once; the limits
(created by the deploy step from deployments/operations.yaml) let one merge and one evaluation
hold the machine at a time. Without the limits (a local `metamerge run`) the stages run freely.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound

MERGE_SLOTS = "merge-gpu"  # one slot per GPU of the merging machine; a CPU merge takes it too
EVAL_SLOTS = "eval"
STAGE_LIMITS = (MERGE_SLOTS, EVAL_SLOTS)
# a slot's lease is renewed while its holder lives; a run killed with SIGKILL frees it when the lease ends
LEASE_SECONDS = 300.0


def limit_exists(name: str) -> bool:
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return False
    return True


@contextmanager
def stage_slot(limit: str, needed: bool = True) -> Iterator[None]:
    """Holds one slot of `limit` while the stage runs; waits for it first if another run holds it.

    `needed=False` (a stage whose output is already there) takes no slot: a nightly run with
    nothing new must not queue behind another recipe's hour-long merge.
    """
    if not needed or not limit_exists(limit):
        yield
        return
    get_run_logger().info("waiting for a slot of the %r concurrency limit", limit)
    with concurrency(limit, occupy=1, lease_duration=LEASE_SECONDS, strict=True):
        get_run_logger().info("holding a slot of %r", limit)
        yield
