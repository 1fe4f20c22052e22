"""One-process setup: both deployments served from this process (no work pool, no worker).

    METAMERGE_RECIPE=/abs/recipe.yaml METAMERGE_REGISTRY=s3://bucket/registry \
    METAMERGE_TIMEZONE=UTC python deployments/serve.py

Runs need a Prefect API (`prefect server start`, PREFECT_API_URL). The trigger's automation
outlives this process: delete it (`prefect automation delete ...`) when retiring the setup.
"""

from __future__ import annotations

import os

from prefect import serve
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.schedules import Cron, Interval

from metamerge_prefect.deployments.operations import apply_operations
from metamerge_prefect.flows.merge_flow import merge_flow
from metamerge_prefect.flows.watch_flow import EVENT, watch_flow


def build_deployments(recipe: str, registry: str, timezone: str = "UTC", cron: str = "0 2 * * *", watch_every_s: int = 900):
    nightly = merge_flow.to_deployment(
        name="nightly",
        parameters={"recipe": recipe},
        schedules=[Cron(cron, timezone=timezone)],
        triggers=[DeploymentEventTrigger(
            expect={EVENT}, match={"prefect.resource.id": "metamerge.registry.*"},
            parameters={"recipe": "{{ event.payload.recipe }}", "finetune_refs": "{{ event.payload.refs }}"},
        )],
    )
    watch = watch_flow.to_deployment(name="watch", parameters={"recipe": recipe, "registry": registry},
                                     schedules=[Interval(watch_every_s)])
    return nightly, watch


if __name__ == "__main__":
    # the same concurrency limits and alerts as `prefect deploy` creates (deployments/operations.yaml)
    apply_operations(webhook_url=os.environ.get("METAMERGE_ALERT_WEBHOOK"),
                     missed_night_within=os.environ.get("METAMERGE_MISSED_NIGHT_WINDOW"))
    serve(*build_deployments(os.environ["METAMERGE_RECIPE"], os.environ["METAMERGE_REGISTRY"],
                             os.environ.get("METAMERGE_TIMEZONE", "UTC")))
