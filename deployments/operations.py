"""The deploy step that creates the concurrency limits and the alert automations of operations.yaml.

A Prefect deploy step (prefect.yaml `build:`) rather than a manual checklist: a fresh server
gets the same limits and alerts as the last one, and re-deploying converges (limits are
updated in place, our automations replaced by name, nothing else touched).
"""

from __future__ import annotations

import re
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from prefect.blocks.core import Block
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from metamerge.errors import RecipeError
from metamerge_prefect.flows.alerts import GATE_FAILED, RECIPE_RESOURCE, RUN_FAILED
from metamerge_prefect.tasks.slots import STAGE_LIMITS

DEFAULT_FILE = Path(__file__).with_name("operations.yaml")
AUTOMATION_PREFIX = "metamerge: "  # the automations this step owns (and replaces) are named so
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | int | float) -> timedelta:
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is no duration: write e.g. 26h, 90m, 20s or 1d")
    return timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])


def _duration_text(span: timedelta) -> str:
    seconds = span.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{seconds:g} s"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Notifications(_Strict):
    block: str = Field(default="custom-webhook/metamerge-alerts", pattern=r"^[a-z0-9-]+/[A-Za-z0-9_-]+$")
    webhook_url: str | None = Field(default=None, pattern=r"^https?://")


class MissedNight(_Strict):
    deployment: str = Field(default="metagpt-merge/nightly", pattern=r"^[^/]+/[^/]+$")
    within: timedelta = timedelta(hours=26)

    @field_validator("within", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> timedelta:
        return value if isinstance(value, timedelta) else parse_duration(value)


class Alerts(_Strict):
    failed_run: bool = True
    gate_failed: bool = True
    missed_night: MissedNight | None = MissedNight()


class Operations(_Strict):
    concurrency_limits: dict[str, int] = Field(default_factory=lambda: dict.fromkeys(STAGE_LIMITS, 1))
    notifications: Notifications = Notifications()
    alerts: Alerts = Alerts()

    @field_validator("concurrency_limits")
    @classmethod
    def _known_limits(cls, limits: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(limits) - set(STAGE_LIMITS))
        if unknown:
            raise ValueError(f"unknown limit(s) {unknown}: the flow takes slots of {list(STAGE_LIMITS)} only")
        bad = {k: v for k, v in limits.items() if v < 1}
        if bad:
            raise ValueError(f"a limit needs at least one slot: {bad}")
        return limits


def load_operations(file: str | Path = DEFAULT_FILE, webhook_url: str | None = None,
                    missed_night_within: str | None = None) -> Operations:
    """The file, with the deploy-time overrides; a bad file is one line naming the file and the field."""
    path = Path(file)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        if webhook_url:
            raw.setdefault("notifications", {})["webhook_url"] = webhook_url
        if missed_night_within and (raw.get("alerts") or {}).get("missed_night") is not None:
            raw["alerts"]["missed_night"]["within"] = missed_night_within
        return Operations.model_validate(raw)
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError(f"{path}: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RecipeError(f"{path}: {where}: {first['msg']}") from exc


def automations(ops: Operations, block_id: Any) -> list[AutomationCore]:
    """The alert automations: each sends one notification through the block."""
    def notify(subject: str, body: str) -> list[SendNotification]:
        return [SendNotification(block_document_id=block_id, subject=subject, body=body)]

    def on_run_event(name: str, description: str, event: str, subject: str) -> AutomationCore:
        """Reacts to one event our failure hook emits, naming the recipe, the stage and the error."""
        return AutomationCore(
            name=AUTOMATION_PREFIX + name, description=description,
            trigger=EventTrigger(expect={event}, match={"prefect.resource.id": RECIPE_RESOURCE + "*"},
                                 posture=Posture.Reactive, threshold=1),
            actions=notify(subject, "{{ event.payload.error }}\nflow run: {{ event.payload.flow_run_name }}"))

    found: list[AutomationCore] = []
    if ops.alerts.failed_run:
        found.append(on_run_event("run failed", "a merge run failed: recipe, stage and error", RUN_FAILED,
                                  "metamerge: {{ event.payload.recipe }} failed at stage {{ event.payload.stage }}"))
    if ops.alerts.gate_failed:
        found.append(on_run_event("quality gate failed", "a merge missed its quality gate; not published", GATE_FAILED,
                                  "metamerge: {{ event.payload.recipe }} did not pass its quality gate (not published)"))
    missed = ops.alerts.missed_night
    if missed is not None:
        flow_name, deployment = missed.deployment.split("/")
        window = _duration_text(missed.within)
        found.append(AutomationCore(
            name=AUTOMATION_PREFIX + f"missed night ({missed.deployment})",
            description=f"no completed run of {missed.deployment} within {window}",
            trigger=EventTrigger(
                expect={"prefect.flow-run.Completed"}, match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related=[{"prefect.resource.role": "flow", "prefect.resource.name": flow_name},
                               {"prefect.resource.role": "deployment", "prefect.resource.name": deployment}],
                posture=Posture.Proactive, threshold=1, within=missed.within),
            actions=notify(f"metamerge: no completed run of {missed.deployment} in the last {window}",
                           f"The nightly merge {missed.deployment} has not completed a run within {window}: "
                           "check its schedule, its work pool and its worker.")))
    return found


def notification_block_id(notifications: Notifications) -> Any | None:
    """The block alerts go through: saved from the webhook URL, or the named one; None if there is none."""
    if notifications.webhook_url:
        block = CustomWebhookNotificationBlock(name="metamerge", url=notifications.webhook_url,
                                               json_data={"subject": "{{subject}}", "body": "{{body}}"})
        return block.save(notifications.block.split("/", 1)[1], overwrite=True)
    try:
        return Block.load(notifications.block)._block_document_id
    except (ValueError, ObjectNotFound):
        return None


def apply_operations(file: str | None = None, webhook_url: str | None = None,
                     missed_night_within: str | None = None) -> dict[str, Any]:
    """Deploy step: concurrency limits first (runs need them), then the notification block and the alerts.

    Without a notification block the alerts cannot be delivered: they are left out with a warning
    the deploy prints, rather than failing the deployment of the merge itself.
    """
    ops = load_operations(file or DEFAULT_FILE, webhook_url, missed_night_within)
    with get_client(sync_client=True) as client:
        for name, slots in ops.concurrency_limits.items():
            try:
                client.read_global_concurrency_limit_by_name(name)
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=slots, active=True))
            except ObjectNotFound:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
        alerting = ops.alerts.failed_run or ops.alerts.gate_failed or ops.alerts.missed_night is not None
        block_id = notification_block_id(ops.notifications) if alerting else None
        wanted = automations(ops, block_id) if block_id is not None else []
        if alerting and block_id is None:
            warnings.warn(f"metamerge: no notification block {ops.notifications.block!r} and no webhook_url "
                          "(METAMERGE_ALERT_WEBHOOK): alerts not created", stacklevel=2)
        for old in client.read_automations():
            if old.name.startswith(AUTOMATION_PREFIX):
                client.delete_automation(old.id)
        for automation in wanted:
            client.create_automation(automation)
    return {"concurrency_limits": ops.concurrency_limits, "automations": [a.name for a in wanted]}
