"""watch_flow: finds fine-tunes of the recipe's base that the last published merge lacks.

It emits `model.finetune.discovered` with every fine-tune ref to merge; the merge deployment's
event trigger turns that event into a merge_flow run (deployments/prefect.yaml).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.events import emit_event

from metamerge.pipeline.finetunes import discover
from metamerge.recipe import load_any

EVENT = "model.finetune.discovered"


@flow(name="watch-finetunes", log_prints=True)
def watch_flow(recipe: str | dict[str, Any], registry: str) -> dict[str, Any]:
    logger = get_run_logger()
    rec = load_any(recipe)
    found = discover(rec, registry)
    for entry in found.ignored:
        logger.info("ignoring %s: a fine-tune of %s, not of %s", entry.ref, entry.base, rec.base)
    if not found.new:
        logger.info("no new fine-tunes of %s in %s", rec.base, registry)
        return {"new": [], "event": None}
    new = [e.ref for e in found.new]
    logger.info("new fine-tunes: %s", new)
    event = emit_event(
        event=EVENT,
        resource={"prefect.resource.id": f"metamerge.registry.{rec.name}", "prefect.resource.name": registry},
        payload={"recipe": recipe if isinstance(recipe, str) else None, "refs": list(found.refs),
                 "new": new, "model": rec.name},
    )
    return {"new": new, "event": str(event.id) if event else None}
