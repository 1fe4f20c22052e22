"""The pieces of operations that need no server: the operations file, alert events, asset keys, stages."""

from __future__ import annotations

import pickle
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from metamerge.errors import CheckpointError, GateError, RecipeError
from metamerge.progress import StageClock, stage_of
from metamerge_prefect.deployments.operations import DEFAULT_FILE, automations, load_operations, parse_duration
from metamerge_prefect.flows.alerts import GATE_FAILED, RUN_FAILED, failure_event, recipe_name
from metamerge_prefect.tasks.assets import asset_uri
from metamerge_prefect.tasks.slots import STAGE_LIMITS


def test_the_shipped_operations_file_asks_for_both_limits_and_three_alerts():
    ops = load_operations(DEFAULT_FILE)
    assert ops.concurrency_limits == {"merge-gpu": 1, "eval": 1} and set(ops.concurrency_limits) == set(STAGE_LIMITS)
    assert ops.alerts.missed_night.within == timedelta(hours=26)
    made = automations(ops, "00000000-0000-0000-0000-000000000000")
    assert [a.name for a in made] == ["metamerge: run failed", "metamerge: quality gate failed",
                                      "metamerge: missed night (metagpt-merge/nightly)"]
    missed = made[-1].trigger
    assert missed.posture == "Proactive" and missed.expect == {"prefect.flow-run.Completed"}
    assert [r.root for r in missed.match_related] == [
        {"prefect.resource.role": "flow", "prefect.resource.name": "metagpt-merge"},
        {"prefect.resource.role": "deployment", "prefect.resource.name": "nightly"}]
    assert made[0].trigger.expect == {RUN_FAILED} and made[1].trigger.expect == {GATE_FAILED}
    assert "26 h" in made[-1].actions[0].subject


def test_deploy_time_overrides_and_durations():
    ops = load_operations(DEFAULT_FILE, webhook_url="http://127.0.0.1:9/x", missed_night_within="90m")
    assert ops.notifications.webhook_url == "http://127.0.0.1:9/x"
    assert ops.alerts.missed_night.within == timedelta(minutes=90)
    assert [parse_duration(t) for t in ("20s", "1.5h", "2d", 30)] == [
        timedelta(seconds=20), timedelta(minutes=90), timedelta(days=2), timedelta(seconds=30)]


@pytest.mark.parametrize(("content", "says"), [
    ({"concurrency_limits": {"merge-gpu": 1, "gpu": 2}}, "unknown limit(s) ['gpu']"),
    ({"concurrency_limits": {"merge-gpu": 0}}, "at least one slot"),
    ({"alerts": {"missed_night": {"within": "tomorrow"}}}, "alerts.missed_night.within"),
    ({"alerts": {"missed_nite": {}}}, "alerts.missed_nite"),
    ({"notifications": {"webhook_url": "ftp://x"}}, "notifications.webhook_url"),
    ({"notifications": {"block": "no-slash"}}, "notifications.block"),
])
def test_a_bad_operations_file_is_one_line_naming_the_file_and_the_field(tmp_path, content, says):
    path = tmp_path / "ops.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(RecipeError) as failure:
        load_operations(path)
    message = str(failure.value)
    assert message.startswith(f"{path}: ") and says in message and "\n" not in message


def test_unreadable_operations_yaml_is_one_line(tmp_path):
    path = tmp_path / "ops.yaml"
    path.write_text("alerts: [unclosed")
    with pytest.raises(RecipeError, match=str(path)):
        load_operations(path)
    with pytest.raises(RecipeError, match="missing.yaml"):
        load_operations(tmp_path / "missing.yaml")


def test_failures_name_their_stage_even_after_pickling():
    clock = StageClock()
    with pytest.raises(CheckpointError) as failure, clock.stage("merge"), clock.stage("extract"):
        raise CheckpointError("shape mismatch for 'w': base (2, 3) vs fine-tune (2, 4)")
    assert stage_of(failure.value) == "extract"  # the innermost stage
    copy = pickle.loads(pickle.dumps(failure.value))
    event, payload = failure_event(copy, "nightly", "")
    assert event == RUN_FAILED
    assert payload == {"recipe": "nightly", "stage": "extract",
                       "error": "CheckpointError: shape mismatch for 'w': base (2, 3) vs fine-tune (2, 4)"}


def test_a_gate_failure_is_its_own_event_and_errors_stay_on_one_line():
    event, payload = failure_event(GateError("avg_norm 0.61 < min 0.8 — not published"), "nightly", "")
    assert (event, payload["stage"]) == (GATE_FAILED, "gate")
    _, long = failure_event(ValueError("x" * 1000 + "\nsecond line"), "r", "")
    assert long["stage"] == "setup" and len(long["error"]) == 300 and "\n" not in long["error"]
    _, unread = failure_event(None, "r", "Flow run crashed\nstack")
    assert unread["error"] == "Flow run crashed"


def test_recipe_name_falls_back_to_what_was_passed(tmp_path):
    good = tmp_path / "r.yaml"
    good.write_text(yaml.safe_dump({"name": "nightly-7b", "base": str(tmp_path), "finetunes": [
        {"ref": str(tmp_path / "a")}, {"ref": str(tmp_path / "b")}]}))
    assert recipe_name(str(good)) == "nightly-7b"
    assert recipe_name(str(tmp_path / "absent.yaml")) == str(tmp_path / "absent.yaml")
    assert recipe_name({"not": "a recipe"}) == "<recipe parameters>"


def test_asset_keys_are_uris_prefect_accepts(tmp_path):
    from prefect.assets import Asset

    odd = tmp_path / "my models #2" / "base 100%"
    key = asset_uri(str(odd))
    assert key.startswith("file:///") and key.endswith("/my_models__2/base_100_")
    assert asset_uri("s3://bucket/merges/nightly/20261126-ab") == "s3://bucket/merges/nightly/20261126-ab"
    assert asset_uri("hf://org/model") == "hf://org/model"
    long = asset_uri("s3://b/" + "x" * 600)
    assert len(long) <= 512 and long.startswith("s3://b/") and long != asset_uri("s3://b/" + "x" * 599 + "y")
    for k in (key, long, asset_uri(str(Path("relative/dir")))):
        Asset(key=k)  # validates
