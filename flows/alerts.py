"""The merge flow's failure hook: one event per failed top-level run, which automations turn into alerts.

Events rather than notifications sent from here: the deploy step decides who hears about what
(deployments/operations.yaml), and a run never needs a notification block's credentials.
A quality-gate failure is its own event, since "the merge is worse" asks for another reaction
than "the pipeline broke".
"""

from __future__ import annotations

from typing import Any

from prefect.events import emit_event
from prefect.events.worker import EventsWorker

from metamerge.errors import GateError
from metamerge.progress import stage_of
from metamerge.recipe import load_any

RUN_FAILED = "metamerge.run.failed"
GATE_FAILED = "metamerge.gate.failed"
RECIPE_RESOURCE = "metamerge.recipe."  # + the recipe's name
MAX_ERROR_CHARS = 300


def recipe_name(recipe: Any) -> str:
    """The recipe's own name; its path or a placeholder when the recipe itself is what failed."""
    try:
        return load_any(recipe).name
    except Exception:  # noqa: BLE001 - an unreadable recipe is itself the failure being reported
        return str(recipe) if isinstance(recipe, str) else "<recipe parameters>"


def one_line(exc: BaseException | None, fallback: str) -> str:
    if exc is None:
        return fallback.splitlines()[0][:MAX_ERROR_CHARS] if fallback else "unknown error"
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line[:MAX_ERROR_CHARS]


def failure_event(exc: BaseException | None, recipe: str, message: str) -> tuple[str, dict[str, str]]:
    """(event name, payload) naming the recipe, the stage that failed and the error in one line."""
    if isinstance(exc, GateError):
        return GATE_FAILED, {"recipe": recipe, "stage": "gate", "error": one_line(exc, message)}
    stage = (stage_of(exc) if exc is not None else None) or "setup"
    return RUN_FAILED, {"recipe": recipe, "stage": stage, "error": one_line(exc, message)}


def alert_on_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """on_failure hook of merge_flow; subflows (best-of candidates, Dask) leave it to the top-level run."""
    if flow_run.parent_task_run_id is not None:
        return
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - a result that cannot be read still gets its alert
        exc = None
    if not isinstance(exc, BaseException):
        exc = None
    name = recipe_name(flow_run.parameters.get("recipe"))
    event, payload = failure_event(exc, name, state.message or "")
    payload["flow_run_name"] = flow_run.name
    emit_event(event=event, resource={"prefect.resource.id": RECIPE_RESOURCE + name, "prefect.resource.name": name},
               related=[{"prefect.resource.id": f"prefect.flow-run.{flow_run.id}", "prefect.resource.role": "flow-run",
                         "prefect.resource.name": flow_run.name}],
               payload=payload)
    EventsWorker.drain_all()  # a worker's run process exits right after its hooks
