"""Nightly schedule + new-fine-tune trigger, end to end against a real `prefect server`.

Every command here is one of docs/operations.md: start the server, create the pool, deploy,
start a worker, run the watch deployment; the trigger then starts the merge. Finally a
headless Chromium opens the merge run in the Prefect UI (and, with METAMERGE_UPDATE_SCREENSHOT=1,
saves the README's screenshot). `deployments/serve.py`, the one-process setup, gets the same check.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml

from metamerge.io.manifests import latest_manifest
from metamerge.io.s3 import s3_client
from tests.flowtools import REPO, zoo_recipe
from tests.prefectserver import BIN, browse, running_prefect_server, screenshot_folder
from tests.prefectserver import events as _events
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
    worker_log.close()  # the child has its own descriptor
    prefect_server["processes"].append(worker)

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server["api"]}), get_client(sync_client=True) as api:
        nightly = api.read_deployment_by_name("metagpt-merge/nightly")
        watch = api.read_deployment_by_name("watch-finetunes/watch")
        crons = [s.schedule for s in nightly.schedules]
        assert any(getattr(c, "cron", None) == "0 2 * * *" and c.timezone == "Europe/Berlin" for c in crons), crons
        intervals = [getattr(s.schedule, "interval", None) for s in watch.schedules]
        assert intervals == [timedelta(seconds=900)], intervals  # every 15 minutes, as documented

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
        # the event log, not a sleep: the worker reports `executed-flow-run` once the second watch
        # run's process has exited, and that process drains its own events (any discovery) on exit
        second = max(done, key=lambda r: r.start_time)

        def executed():
            events = _events(prefect_server["api"], ["prefect.worker.executed-flow-run"])
            return [e for e in events if any(r["prefect.resource.id"] == f"prefect.flow-run.{second.id}"
                                             for r in e.get("related", []))]

        _wait(executed, 60, "the worker's executed-flow-run event of the second watch run")
        assert len(_events(prefect_server["api"], ["model.finetune.discovered"])) == 1
        assert len(_events(prefect_server["api"], ["prefect.automation.action.executed"])) == 1  # one run started
        assert len(merge_runs()) == 1
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        def watch_logs():
            logs = api.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in done])))
            text = "\n".join(entry.message for entry in logs)
            return text if "no new fine-tunes" in text else None

        messages = _wait(watch_logs, 30, "the watch runs' logs in the API")
        assert f"ignoring s3://{bucket}/registry/alien" in messages

    _ui_check(prefect_server["url"], run.id, tmp_path)


def _ui_check(ui: str, flow_run_id, tmp_path: Path) -> None:
    """Headless Chromium renders the run and the artifacts pages (asserted); the screenshot is a by-product.

    No Chromium here (`make browser` installs it): a warning, not a skip, since the pipeline checks
    above passed. The screenshot goes to tmp_path, or to docs/img with METAMERGE_UPDATE_SCREENSHOT=1.
    """
    url = f"{ui}/runs/flow-run/{flow_run_id}"
    run_page = ("metagpt-merge", "nightly", "Completed")
    dom = browse(url, tmp_path / "chromium", screenshot_folder(tmp_path) / "merge-flow-run.png", expect=run_page)
    if dom is None:
        return
    assert all(text in dom for text in run_page), dom[:2000]
    # the run page draws its artifacts on a canvas; the artifacts page lists them as text
    keys = ("merge-coefficients", "task-vector-cosine", "merge-scores", "merge-report")
    artifacts_page = browse(f"{ui}/artifacts", tmp_path / "chromium", expect=keys)
    for key in keys:
        assert key in artifacts_page, key


def test_serve_py_runs_the_schedule_watch_and_trigger_in_one_process(tmp_path, prefect_server):
    """README: `deployments/serve.py` does the same as prefect.yaml + a worker, in one process.

    Small random checkpoints (no evaluation) keep this to about a minute: the served watch run
    finds a new fine-tune in a local registry, its event triggers the served merge deployment,
    and that run publishes the merge of the recipe's fine-tune and the new one.
    """
    import sys

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from safetensors.torch import load_file

    from tests.helpers import random_family

    base_dir, ft_dirs, base, fts = random_family(tmp_path / "models", n_finetunes=2)
    registry = tmp_path / "registry"
    shutil.copytree(ft_dirs[1], registry / "new-ft")
    (registry / "new-ft" / "finetune.json").write_text(json.dumps({"base": str(base_dir), "tasks": []}))
    recipe = {"name": "served", "base": str(base_dir), "finetunes": [{"ref": str(ft_dirs[0]), "name": "ft0"}],
              "method": {"name": "average"}, "merge": {"device": "cpu"}, "workdir": str(tmp_path / "work"),
              "publish": {"target": str(tmp_path / "published")}}
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    env = {**prefect_server["env"], "METAMERGE_RECIPE": str(recipe_path), "METAMERGE_REGISTRY": str(registry),
           "METAMERGE_TIMEZONE": "Asia/Tokyo", "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    served = subprocess.Popen([sys.executable, "deployments/serve.py"], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    log.close()  # the child has its own descriptor
    prefect_server["processes"].append(served)

    with temporary_settings({PREFECT_API_URL: prefect_server["api"]}), get_client(sync_client=True) as api:
        def registered():
            assert served.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                return (api.read_deployment_by_name("metagpt-merge/nightly"),
                        api.read_deployment_by_name("watch-finetunes/watch"))
            except ObjectNotFound:
                return None

        nightly, watch = _wait(registered, 120, "serve.py to register its deployments")
        assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [("0 2 * * *", "Asia/Tokyo")]
        assert [s.schedule.interval for s in watch.schedules] == [timedelta(seconds=900)]
        assert nightly.parameters == {"recipe": str(recipe_path)}
        assert watch.parameters == {"recipe": str(recipe_path), "registry": str(registry)}

        api.create_flow_run_from_deployment(watch.id)

        def triggered():
            runs = api.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id])))
            return [r for r in runs if r.parameters.get("finetune_refs")]

        runs = _wait(triggered, 180, "a merge run started by the served trigger", step=1)
        assert len(runs) == 1 and runs[0].parameters["finetune_refs"] == [str((registry / "new-ft").resolve())]

        def finished():
            state = api.read_flow_run(runs[0].id).state
            return state if state.is_final() else None

        state = _wait(finished, 180, "the triggered merge run to finish", step=1)
        assert state.is_completed(), (state.message, (tmp_path / "serve.log").read_text()[-4000:])

    manifest = latest_manifest(str(tmp_path / "published"), "served")
    assert manifest["inputs"]["finetunes"] == [str(ft_dirs[0]), str((registry / "new-ft").resolve())]
    run_dir = tmp_path / "published" / "served" / manifest["run_id"]
    merged = {}
    for f in run_dir.glob("*.safetensors"):
        merged.update(load_file(str(f)))
    for name, value in base.items():
        if value.is_floating_point():  # the average of the recipe's fine-tune and the discovered one
            want = value + 0.5 * ((fts[0][name] - value) + (fts[1][name] - value))
            torch.testing.assert_close(merged[name], want, rtol=1e-5, atol=1e-5)
