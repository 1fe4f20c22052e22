"""Nightly schedule + new-fine-tune trigger, end to end against a real `prefect server`.

Every command here is one of docs/operations.md: start the server, create the pool, deploy,
start a worker, run the watch deployment; the trigger then starts the merge. Finally a
headless Chromium opens the merge run in the Prefect UI and saves a screenshot for the README.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from metamerge.storage import latest_manifest, s3_client
from tests.flowtools import REPO, zoo_recipe
from tests.prefectserver import BIN, running_prefect_server
from tests.prefectserver import wait_for as _wait

pytestmark = pytest.mark.slow


def _upload_folder(client, folder: Path, bucket: str, prefix: str) -> None:
    for f in folder.iterdir():
        if f.is_file():
            client.upload_file(str(f), bucket, f"{prefix}/{f.name}")


@pytest.fixture
def prefect_server(tmp_path):
    """`prefect server start` on a free loopback port with its own PREFECT_HOME; stopped after."""
    with running_prefect_server(tmp_path) as server:
        yield server


def _cli(env, *args, timeout=180) -> str:
    out = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out.stdout


def test_watch_event_triggers_a_merge_and_the_ui_shows_it(zoo, s3_endpoint, bucket, prefect_server, tmp_path):
    env = dict(prefect_server["env"])
    client = s3_client(s3_endpoint)
    recipe_dict = zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work", skills=["capitals", "reverse"],
                             endpoint_url=s3_endpoint, name="zoo-nightly")
    recipe_path = tmp_path / "nightly.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe_dict))

    # the registry: the new fine-tune of our base, and one of another base (to be ignored)
    registry = f"s3://{bucket}/registry"
    (tmp_path / "shift-meta.json").write_text(json.dumps({"base": str(zoo.base), "tasks": ["zoo_shift"]}))
    _upload_folder(client, zoo.finetunes["shift"], bucket, "registry/shift")
    client.upload_file(str(tmp_path / "shift-meta.json"), bucket, "registry/shift/finetune.json")
    client.put_object(Bucket=bucket, Key="registry/alien/finetune.json", Body=b'{"base": "/other/base", "tasks": []}')

    env.update({"METAMERGE_PROJECT_DIR": str(REPO), "METAMERGE_RECIPE": str(recipe_path),
                "METAMERGE_REGISTRY": registry, "METAMERGE_TIMEZONE": "Europe/Berlin"})
    _cli(env, "work-pool", "create", "metamerge", "--type", "process")
    _cli(env, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    worker_log = open(tmp_path / "worker.log", "w")  # noqa: SIM115
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "metamerge"], env=env, cwd=REPO,
                              stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
    prefect_server["processes"].append(worker)

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server["api"]}), get_client(sync_client=True) as api:
        nightly = api.read_deployment_by_name("metagpt-merge/nightly")
        watch = api.read_deployment_by_name("watch-finetunes/watch")
        crons = [s.schedule for s in nightly.schedules]
        assert any(getattr(c, "cron", None) == "0 2 * * *" and c.timezone == "Europe/Berlin" for c in crons), crons
        assert any(getattr(s.schedule, "interval", None) for s in watch.schedules)

        _cli(env, "deployment", "run", "watch-finetunes/watch")

        def merge_runs():
            """Runs of the nightly deployment started by the trigger (the cron's are only Scheduled)."""
            runs = api.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id])))
            return [r for r in runs if "finetune_refs" in r.parameters]

        runs = _wait(merge_runs, 240, "a merge run created by the trigger", step=2)
        assert len(runs) == 1
        run = runs[0]
        shift_ref = f"s3://{bucket}/registry/shift"
        assert run.parameters["finetune_refs"] == [shift_ref]
        assert run.parameters["recipe"] == str(recipe_path)

        def finished():
            state = api.read_flow_run(run.id).state
            return state if state.is_final() else None

        state = _wait(finished, 420, "the triggered merge run to finish", step=3)
        assert state.is_completed(), (state.message, (tmp_path / "worker.log").read_text()[-4000:])
        artifacts = api.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        keys = {a.key for a in artifacts}
        assert {"merge-coefficients", "task-vector-cosine", "merge-scores", "merge-report", "published-manifest"} <= keys

        manifest = latest_manifest(f"s3://{bucket}/merges", "zoo-nightly", s3_endpoint)
        assert manifest is not None and shift_ref in manifest["inputs"]["finetunes"]

        # nothing new now: the watcher emits no event and no second merge appears
        _cli(env, "deployment", "run", "watch-finetunes/watch")

        def second_watch_done():
            done = [r for r in api.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[watch.id])))
                    if r.state and r.state.is_final()]
            return len(done) >= 2 and done

        done = _wait(second_watch_done, 180, "the second watch run", step=2)
        assert all(r.state.is_completed() for r in done)
        time.sleep(5)
        assert len(merge_runs()) == 1
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        def watch_logs():
            logs = api.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in done])))
            text = "\n".join(entry.message for entry in logs)
            return text if "no new fine-tunes" in text else None

        messages = _wait(watch_logs, 30, "the watch runs' logs in the API")
        assert f"ignoring s3://{bucket}/registry/alien" in messages

    _screenshot(prefect_server["url"], run.id, tmp_path)


def _screenshot(ui: str, flow_run_id, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium)")
    url = f"{ui}/runs/flow-run/{flow_run_id}"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=20000", "--window-size=1400,1000"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert "metagpt-merge" in dom and "nightly" in dom and "Completed" in dom, dom[:2000]
    # the run page draws its artifacts on a canvas; the artifacts page lists them as text
    artifacts_page = subprocess.run([chromium, *flags, "--dump-dom", f"{ui}/artifacts"], capture_output=True,
                                    text=True, timeout=120).stdout
    for key in ("merge-coefficients", "task-vector-cosine", "merge-scores", "merge-report"):
        assert key in artifacts_page, key
    out_dir = REPO / "docs" / "img"
    out_dir.mkdir(parents=True, exist_ok=True)
    shot = out_dir / "merge-flow-run.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000
