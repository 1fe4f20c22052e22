"""Operating the nightly merge against a real `prefect server`: limits, alerts, assets, the UI.

The deploy step of deployments/prefect.yaml creates the concurrency limits and the alert
automations; a real notification block posts to a webhook receiver on 127.0.0.1, which
records what arrives. Three deployment runs start at once (two good recipes and one whose
fine-tune does not fit its base), a gate-failing run follows in this process, and the
missed-night window is shortened to seconds so that it elapses during the test.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.flowtools import REPO, zoo_recipe
from tests.helpers import random_family
from tests.prefectserver import BIN, browse, events, running_prefect_server, screenshot_folder, using_api, wait_for

pytestmark = pytest.mark.slow
MISSED_WINDOW_S = 20


class Receiver:
    """A webhook endpoint on loopback that keeps every JSON body posted to it, with its arrival time."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server protocol
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append((time.time(), json.loads(body or b"{}")))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_args) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def with_subject(self, text: str) -> list[dict]:
        return [body for _, body in self.received if text in body.get("subject", "")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def prefect_server(tmp_path):
    with running_prefect_server(tmp_path) as server:
        yield server


def _cli(env, *args) -> str:
    out = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out.stdout + out.stderr


def _recipe(tmp_path: Path, name: str, base: Path, finetunes: list[Path], method: str) -> Path:
    recipe = {"name": name, "base": str(base), "method": {"name": method},
              "finetunes": [{"ref": str(p), "name": f"ft{i}"} for i, p in enumerate(finetunes)],
              "merge": {"device": "cpu"}, "workdir": str(tmp_path / f"work-{name}"),
              "publish": {"target": str(tmp_path / "published")}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_deploy_creates_limits_and_alerts_that_serialize_merges_and_notify(
        zoo, s3_endpoint, bucket, prefect_server, receiver, tmp_path):
    base, fts, _, _ = random_family(tmp_path / "family", n_finetunes=2, hidden=64)
    _, wide, _, _ = random_family(tmp_path / "wide", n_finetunes=1, hidden=80)  # not of this base's shapes
    recipes = {"ok-a": _recipe(tmp_path, "ok-a", base, fts, "average"),
               "ok-b": _recipe(tmp_path, "ok-b", base, fts, "task_arithmetic"),
               "bad": _recipe(tmp_path, "bad", base, [fts[0], wide[0]], "average")}
    (tmp_path / "registry").mkdir()
    env = {**prefect_server["env"], "METAMERGE_PROJECT_DIR": str(REPO), "METAMERGE_RECIPE": str(recipes["ok-a"]),
           "METAMERGE_REGISTRY": str(tmp_path / "registry"), "METAMERGE_TIMEZONE": "UTC",
           "METAMERGE_ALERT_WEBHOOK": receiver.url, "METAMERGE_MISSED_NIGHT_WINDOW": f"{MISSED_WINDOW_S}s",
           # each merge lasts ≥ 3 s, so that runs started together would overlap without the limit
           "METAMERGE_TEST_PAUSE_AT": "merge", "METAMERGE_TEST_PAUSE_S": "3",
           # and the two good runs wait for each other just before the merge slot: both are running then,
           # however slowly the worker starts them (under load one could otherwise finish first)
           "METAMERGE_TEST_RENDEZVOUS_AT": "merge-slot", "METAMERGE_TEST_RENDEZVOUS_N": "2",
           "METAMERGE_TEST_RENDEZVOUS_DIR": str(tmp_path / "rendezvous")}
    _cli(env, "work-pool", "create", "metamerge", "--type", "process")
    _cli(env, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    _cli(env, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")  # converges

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with using_api(prefect_server["api"]), get_client(sync_client=True) as api:
        limits = {name: api.read_global_concurrency_limit_by_name(name) for name in ("merge-gpu", "eval")}
        assert {name: (lim.limit, lim.active) for name, lim in limits.items()} == {"merge-gpu": (1, True),
                                                                                    "eval": (1, True)}
        names = sorted(a.name for a in api.read_automations())
        assert names == ["metamerge: missed night (metagpt-merge/nightly)", "metamerge: quality gate failed",
                         "metamerge: run failed", "nightly__automation_1"], names  # deployed twice, each once
        # (the last is prefect.yaml's new-fine-tune trigger)
        missed = next(a for a in api.read_automations() if "missed" in a.name)
        assert missed.trigger.posture == "Proactive" and missed.trigger.within.total_seconds() == MISSED_WINDOW_S

        worker_log = open(tmp_path / "worker.log", "w")  # noqa: SIM115
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "metamerge"], env=env,
                                  cwd=REPO, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
        worker_log.close()
        prefect_server["processes"].append(worker)

        nightly = api.read_deployment_by_name("metagpt-merge/nightly")
        runs = {name: api.create_flow_run_from_deployment(nightly.id, parameters={"recipe": str(path)})
                for name, path in recipes.items()}

        def final_states():
            states = {name: api.read_flow_run(run.id) for name, run in runs.items()}
            return states if all(r.state.is_final() for r in states.values()) else None

        done = wait_for(final_states, 480, "three nightly runs to finish", step=2)
        log = (tmp_path / "worker.log").read_text()[-4000:]
        assert done["ok-a"].state.is_completed() and done["ok-b"].state.is_completed(), log
        assert done["bad"].state.is_failed(), log

        # the two good runs ran at the same time, but their merges one after the other
        assert max(r.start_time for r in (done["ok-a"], done["ok-b"])) < min(r.end_time for r in (done["ok-a"], done["ok-b"]))
        merges = []
        for name in ("ok-a", "ok-b"):
            tasks = api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[runs[name].id])))
            merge = [t for t in tasks if t.name == "merge"]
            assert len(merge) == 1 and merge[0].state.name == "Completed", [(t.name, t.state.name) for t in tasks]
            merges.append((merge[0].start_time, merge[0].end_time))
        merges.sort()
        assert merges[0][1] - merges[0][0] >= _seconds(3) and merges[0][1] <= merges[1][0], merges

        # the failed run's alert: its recipe, the stage that failed, and the error in one line
        failed = wait_for(lambda: receiver.with_subject("failed at stage"), 60, "the failed-run alert")
        assert [m["subject"] for m in failed] == ["metamerge: bad failed at stage extract"], failed
        assert "CheckpointError" in failed[0]["body"] or "ShapeError" in failed[0]["body"], failed[0]
        assert "shape" in failed[0]["body"] and done["bad"].name in failed[0]["body"]

        # each published merge is an asset, the base and both fine-tunes upstream
        from metamerge_prefect.tasks.assets import asset_uri

        def materialized():
            found = events(prefect_server["api"], ["prefect.asset.materialization.succeeded"])
            return found if len(found) >= 2 else None

        made = wait_for(materialized, 30, "both asset materializations")
        assert sorted(e["resource"]["prefect.resource.id"].rsplit("/", 2)[-2] for e in made) == ["ok-a", "ok-b"]
        for event in made:
            upstream = {r["prefect.resource.id"] for r in event["related"] if r["prefect.resource.role"] == "asset"}
            assert upstream == {asset_uri(str(p)) for p in (base, *fts)}

        # a merge that misses its quality gate: a different alert, and no failed-run alert
        from metamerge_prefect.flows.merge_flow import merge_flow

        gated = zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work-gated", skills=["capitals", "reverse"],
                           name="zoo-gated", endpoint_url=s3_endpoint, gate={"min_avg_norm": 1.5})
        state = merge_flow(gated, return_state=True)
        assert state.is_failed() and "gate" in state.message.lower(), state.message
        gate_alert = wait_for(lambda: receiver.with_subject("quality gate"), 60, "the gate alert")
        assert [m["subject"] for m in gate_alert] == [
            "metamerge: zoo-gated did not pass its quality gate (not published)"]
        assert "1.5" in gate_alert[0]["body"]
        assert len(receiver.with_subject("failed at stage")) == 1

        # no nightly run completed in the (shortened) window since the last one: the proactive alert
        last_completed = max(r.end_time for r in (done["ok-a"], done["ok-b"])).timestamp()
        missed_alerts = wait_for(lambda: [t for t, body in receiver.received
                                          if "no completed run of metagpt-merge/nightly" in body.get("subject", "")
                                          and t > last_completed], 4 * MISSED_WINDOW_S + 30, "the missed-night alert")
        assert missed_alerts

        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        history = api.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["nightly-history-ok-a"])))
    ok_a = next(e for e in made if "/ok-a/" in e["resource"]["prefect.resource.id"])
    _pictures(prefect_server["url"], ok_a, history[-1].id, tmp_path)


def _seconds(n: float):
    from datetime import timedelta

    return timedelta(seconds=n)


def _pictures(ui: str, materialized: dict, history_id, tmp_path: Path) -> None:
    """The UI pages docs/operations.md shows: each rendered (asserted) and photographed."""
    folder = screenshot_folder(tmp_path)
    profile = tmp_path / "chromium"
    day = materialized["occurred"][:10]
    pages = {"concurrency-limits.png": (f"{ui}/concurrency-limits", ["merge-gpu", "eval"]),
             "automations.png": (f"{ui}/automations", ["metamerge: run failed", "metamerge: missed night"]),
             "asset-materialization.png": (f"{ui}/events/event/{day}/{materialized['id']}",
                                           ["asset.materialization.succeeded", "family/ft1", "/ok-a/"]),
             "nightly-history.png": (f"{ui}/artifacts/artifact/{history_id}", ["nightly-history-ok-a"])}
    for picture, (url, expected) in pages.items():
        dom = browse(url, profile, folder / picture, expect=tuple(expected))
        if dom is None:
            return
        for text in expected:
            assert text in dom, (url, text, dom[:1500])
