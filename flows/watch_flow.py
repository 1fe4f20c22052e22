"""watch_flow: finds fine-tunes of the recipe's base that the last published merge lacks.

It emits `model.finetune.discovered` with every fine-tune ref to merge; the merge deployment's
event trigger turns that event into a merge_flow run (deployments/prefect.yaml).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.events import emit_event

from flows.merge_flow import load
from metamerge.registry import list_registry, published_finetune_refs, same_base

EVENT = "model.finetune.discovered"


@flow(name="watch-finetunes", log_prints=True)
def watch_flow(recipe: str | dict[str, Any], registry: str) -> dict[str, Any]:
    logger = get_run_logger()
    rec = load(recipe)
    entries = list_registry(registry, rec.endpoint_url)
    candidates = []
    for entry in entries:
        if not same_base(entry, rec):
            logger.info("ignoring %s: a fine-tune of %s, not of %s", entry.ref, entry.base, rec.base)
            continue
        candidates.append(entry)
    in_recipe = {ft.ref.rstrip("/") for ft in rec.finetunes}
    published = published_finetune_refs(rec)
    new = [e for e in candidates if e.ref not in published and e.ref.rstrip("/") not in in_recipe]
    if not new:
        logger.info("no new fine-tunes of %s in %s", rec.base, registry)
        return {"new": [], "event": None}
    refs = [e.ref for e in candidates if e.ref.rstrip("/") not in in_recipe]
    logger.info("new fine-tunes: %s", [e.ref for e in new])
    event = emit_event(
        event=EVENT,
        resource={"prefect.resource.id": f"metamerge.registry.{rec.name}", "prefect.resource.name": registry},
        payload={"recipe": recipe if isinstance(recipe, str) else None, "refs": refs,
                 "new": [e.ref for e in new], "model": rec.name},
    )
    return {"new": [e.ref for e in new], "event": str(event.id) if event else None}
