"""`runner: dask` end to end: a real Prefect server, a real S3 server, a real dask.distributed cluster.

The merge is split into one task per output shard; with two worker processes both must get
shard tasks, and the merged files must be byte-equal to the local runner's. A worker killed
in the middle of a shard has its task re-run by Dask on another worker, and the run still
completes with the same bytes.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from metamerge.io.manifests import latest_manifest
from tests.flowtools import bucket_keys, zoo_recipe
from tests.prefectserver import running_prefect_server, using_api, wait_for

pytestmark = pytest.mark.slow
SKILLS = ["capitals", "reverse"]
MERGE = {"dtype": "auto", "device": "cpu", "shard_size_mb": 2}  # the zoo model (~9 MB) → 5 shards


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    with running_prefect_server(tmp_path_factory.mktemp("prefect-server")) as server:
        yield server


@pytest.fixture
def api(prefect_server, monkeypatch, tmp_path):
    """This process and the Dask worker processes it starts talk to the one real server."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", prefect_server["api"])
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(tmp_path / "results"))
    with using_api(prefect_server["api"]), temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "results"}):
        yield prefect_server["api"]


def _recipe(zoo, s3_endpoint, bucket, workdir: Path, **overrides) -> dict:
    recipe = zoo_recipe(zoo, s3_endpoint, bucket, workdir, skills=SKILLS, endpoint_url=s3_endpoint, merge=MERGE,
                        name="zoo-dask")
    recipe.pop("evaluation")
    recipe.pop("publish")
    recipe.update(overrides)
    return recipe


def _files(folder) -> dict[str, bytes]:
    """The model's files (metamerge's hidden bookkeeping, e.g. its output marker, is not published)."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def local_merge(zoo, tmp_path_factory, prefect_server):
    """The local runner's merged files: what every Dask run must reproduce byte for byte."""
    from metamerge.demo.s3server import local_s3_server
    from metamerge_prefect.flows.merge_flow import merge_flow

    work = tmp_path_factory.mktemp("local")
    with local_s3_server() as endpoint, using_api(prefect_server["api"]):
        result = merge_flow(_recipe(zoo, endpoint, "unused", work / "wd"))
    files = _files(result["merged_path"])
    assert len([n for n in files if n.endswith(".safetensors")]) >= 4, list(files)
    return files


def _subflow_task_runs(parent_state, expect=()) -> list:
    """Every task run of the Dask subflow that the entry flow started, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from tests.flowtools import task_runs

    parent = parent_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))
    assert len(children) == 1, children
    return task_runs(children[0].id, expect=expect)


def _subflow_task_states(parent_state, expect=()) -> dict[str, list[str]]:
    """{task name: [final states]} of the Dask subflow."""
    states: dict[str, list[str]] = {}
    for run in _subflow_task_runs(parent_state, expect):
        states.setdefault(run.name, []).append(run.state.name)
    return states


def _shard_names(local_merge) -> set[str]:
    return {f"merge shard {i}" for i in range(sum(n.endswith(".safetensors") for n in local_merge))}


def test_dask_local_cluster_spreads_shards_and_matches_local_bytes(zoo, s3_endpoint, bucket, api, local_merge, tmp_path):
    from metamerge_prefect.flows.merge_flow import merge_flow

    recipe = _recipe(zoo, s3_endpoint, bucket, tmp_path / "wd",
                     runner={"kind": "dask", "cluster": {"n_workers": 2, "threads_per_worker": 1, "memory_limit": "3GiB"}},
                     results=f"s3://{bucket}/results",
                     evaluation={"tasks_dir": str(zoo.tasks_dir), "batch_size": 32, "limit": 8},
                     publish={"target": f"s3://{bucket}/merges", "endpoint_url": s3_endpoint})
    started = time.monotonic()
    state = merge_flow(recipe, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    print(f"dask flow: {time.monotonic() - started:.1f}s")

    # byte-equal to the local runner
    assert _files(result["merged_path"]) == local_merge
    shards = json.loads(Path(result["merged_path"] + ".report.json").read_text())["shards"]
    assert len(shards) == sum(n.endswith(".safetensors") for n in local_merge)
    workers = {s["worker"] for s in shards}
    assert len(workers) == 2, f"shard tasks ran on {workers}"
    assert str(os.getpid()) not in {w.rsplit("/", 1)[1] for w in workers}, "shards ran in the flow's process"

    # every stage ran as a Prefect task run on the cluster, all completed
    states = _subflow_task_states(state, expect=_shard_names(local_merge) | {"finalize merge", "publish"})
    shard_runs = [name for name in states if name.startswith("merge shard")]
    assert set(shard_runs) == _shard_names(local_merge) and len(shard_runs) == len(shards)
    for name in [*shard_runs, "finalize merge", "plan shards", "solve", "publish", *(f"extract {s}" for s in SKILLS)]:
        assert states[name] == ["Completed"], (name, states)
    assert len([n for n in states if n.startswith("evaluate merged")]) == len(SKILLS)

    # intermediates went through S3: stats, the merged model and task results, not only the local disk
    keys = bucket_keys(s3_endpoint, bucket)
    assert any(k.startswith("results/shared/stats/") for k in keys)
    merged_name = Path(result["merged_path"]).name
    assert {f"results/shared/merged/{merged_name}/{n}" for n in local_merge} <= keys
    assert not any(".shards/" in k for k in keys), "staged shards are removed once assembled"
    assert sum(1 for k in keys if k.startswith("results/") and "/shared/" not in k) >= 5  # Prefect task results
    assert result["scores"] and result["published"]
    manifest = latest_manifest(f"s3://{bucket}/merges", "zoo-dask", s3_endpoint)
    assert manifest is not None and set(local_merge) <= set(manifest["files"])


def test_worker_killed_mid_shard_is_retried_elsewhere(zoo, s3_endpoint, bucket, api, local_merge, tmp_path, monkeypatch):
    from distributed import Client, LocalCluster

    from metamerge_prefect.flows.merge_flow import merge_flow

    marker = tmp_path / "hung-worker.pid"
    # read by the worker processes at start: the first shard task to reach mid-shard hangs there
    monkeypatch.setenv("METAMERGE_TEST_HANG_AT", "merge-shard")
    monkeypatch.setenv("METAMERGE_TEST_HANG_MARKER", str(marker))
    monkeypatch.setenv("METAMERGE_TEST_HANG_ONCE", "1")
    killed: dict[str, int] = {}

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="3GiB",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        pids_before = set(client.run(os.getpid).values())
        assert len(pids_before) == 2

        def kill_when_hung() -> None:
            wait_for(lambda: marker.exists() and marker.read_text().strip(), 300, "a shard task to hang", step=0.2)
            pid = int(marker.read_text())
            killed["pid"] = pid
            os.kill(pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_hung, daemon=True)
        killer.start()
        recipe = _recipe(zoo, s3_endpoint, bucket, tmp_path / "wd", results=f"s3://{bucket}/results",
                         runner={"kind": "dask", "address": cluster.scheduler_address})
        state = merge_flow(recipe, return_state=True)
        killer.join(timeout=5)
        assert state.is_completed(), state.message
        assert killed.get("pid") in pids_before, (killed, pids_before)
        with pytest.raises(ProcessLookupError):
            os.kill(killed["pid"], 0)

    result = state.result()
    assert _files(result["merged_path"]) == local_merge
    report = json.loads(Path(result["merged_path"] + ".report.json").read_text())
    workers = {s["worker"].rsplit("/", 1)[1] for s in report["shards"]}
    assert str(killed["pid"]) not in workers, "every shard's final result came from a live worker"
    # one task run per shard, each Completed; the killed shard's run has run twice (two Running states)
    shards = _shard_names(local_merge)
    runs = [r for r in _subflow_task_runs(state, expect=shards | {"finalize merge"}) if r.name.startswith("merge shard")]
    assert sorted(r.name for r in runs) == sorted(shards), [r.name for r in runs]
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state.name) for r in runs]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        running = {r.name: sum(s.type.value == "RUNNING" for s in client.read_task_run_states(r.id)) for r in runs}
    assert sorted(running.values()) == [1] * (len(runs) - 1) + [2], running
