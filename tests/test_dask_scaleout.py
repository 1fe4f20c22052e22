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


@pytest.fixture(scope="module")
def s3_zoo(zoo, s3_endpoint):
    """The zoo's base and fine-tunes as s3:// refs: workers read them by byte range, never whole."""
    import uuid

    from metamerge.io.s3 import s3_client

    bucket = f"zoo-{uuid.uuid4().hex[:8]}"
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=bucket)
    refs = {}
    for name, folder in [("base", zoo.base), *((skill, zoo.finetunes[skill]) for skill in SKILLS)]:
        for file in sorted(Path(folder).iterdir()):
            if file.is_file() and not file.name.startswith("."):
                client.upload_file(str(file), bucket, f"models/{name}/{file.name}")
        refs[name] = f"s3://{bucket}/models/{name}"
    size = sum(f.stat().st_size for f in Path(zoo.base).glob("*.safetensors"))
    return {"refs": refs, "model_bytes": size}


def _recipe(zoo, s3_endpoint, bucket, workdir: Path, s3_zoo=None, **overrides) -> dict:
    recipe = zoo_recipe(zoo, s3_endpoint, bucket, workdir, skills=SKILLS, endpoint_url=s3_endpoint, merge=MERGE,
                        name="zoo-dask")
    recipe.pop("evaluation")
    recipe.pop("publish")
    if s3_zoo is not None:
        recipe["base"] = s3_zoo["refs"]["base"]
        for finetune in recipe["finetunes"]:
            finetune["ref"] = s3_zoo["refs"][finetune["name"]]
    recipe.update(overrides)
    return recipe


def _committed_files(result, bucket, s3_endpoint, tmp_path) -> dict[str, bytes]:
    """The merged folder as a reader elsewhere gets it from shared storage (only once committed)."""
    from metamerge.io.shared import SharedStore

    merged = Path(result["merged_path"])
    workdir = merged.parent.parent
    here = tmp_path / "reader" / "merged" / merged.name
    SharedStore(str(tmp_path / "reader"), f"s3://{bucket}/results/shared", s3_endpoint).ensure_dir(here)
    assert workdir != tmp_path / "reader"
    return _files(here)


def _open_uploads(s3_endpoint, bucket) -> list[str]:
    from metamerge.io.s3 import s3_client

    return [u["Key"] for u in s3_client(s3_endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


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


def _shard_bytes(zoo) -> tuple[list[int], list[int], int]:
    """Per output shard, counted from the headers: all its tensors' bytes, its float tensors' bytes;
    and the bytes of one header GET per input file plus each index (what opening the inputs costs)."""
    from metamerge.engine.checkpoint import CheckpointReader
    from metamerge.engine.writer import group_into_shards
    from metamerge.io.ranged import HEADER_GUESS

    base = CheckpointReader(zoo.base)
    shards = group_into_shards([base.info(n) for n in base.names], MERGE["shard_size_mb"] * 1024 * 1024)
    headers = sum(min(HEADER_GUESS, f.stat().st_size) if f.suffix == ".safetensors" else f.stat().st_size
                  for folder in (zoo.base, *(zoo.finetunes[s] for s in SKILLS)) for f in Path(folder).iterdir()
                  if f.suffix == ".safetensors" or f.name == "model.safetensors.index.json")
    return ([sum(i.nbytes for i in shard) for shard in shards],
            [sum(i.nbytes for i in shard if i.is_float) for shard in shards], headers)


def _expected_fetch_per_shard(zoo) -> list[int]:
    """What each merge shard task must fetch by range: its tensors from the base (all) and from each
    fine-tune (float ones), plus the header GETs."""
    every, floats, headers = _shard_bytes(zoo)
    return [all_bytes + len(SKILLS) * float_bytes + headers for all_bytes, float_bytes in zip(every, floats, strict=True)]


def test_dask_local_cluster_spreads_shards_and_matches_local_bytes(zoo, s3_endpoint, bucket, api, local_merge, tmp_path,
                                                                    s3_zoo):
    from metamerge_prefect.flows.merge_flow import merge_flow

    recipe = _recipe(zoo, s3_endpoint, bucket, tmp_path / "wd", s3_zoo,
                     runner={"kind": "dask", "cluster": {"n_workers": 2, "threads_per_worker": 1, "memory_limit": "3GiB"}},
                     results=f"s3://{bucket}/results",
                     evaluation={"tasks_dir": str(zoo.tasks_dir), "batch_size": 32, "limit": 8},
                     publish={"target": f"s3://{bucket}/merges", "endpoint_url": s3_endpoint})
    started = time.monotonic()
    state = merge_flow(recipe, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    print(f"dask flow: {time.monotonic() - started:.1f}s")

    # byte-equal to the local runner, as committed in shared storage
    assert _committed_files(result, bucket, s3_endpoint, tmp_path) == local_merge
    shards = json.loads(Path(result["merged_path"] + ".report.json").read_text())["shards"]
    assert len(shards) == sum(n.endswith(".safetensors") for n in local_merge)
    workers = {s["worker"] for s in shards}
    assert len(workers) == 2, f"shard tasks ran on {workers}"
    assert str(os.getpid()) not in {w.rsplit("/", 1)[1] for w in workers}, "shards ran in the flow's process"
    # each shard task fetched exactly its tensors' byte ranges from S3 (counted independently from the headers)
    assert [s["bytes_fetched"] for s in shards] == _expected_fetch_per_shard(zoo)
    # no GPU worker: evaluation placed on CPU workers, and the report says so
    assert result["placement"] == {"gpu_workers": 0, "merge_on_gpu": False, "evaluation_on_gpu": False,
                                   "notes": ["no Dask worker declares a GPU resource: evaluations ran on CPU workers"]}

    # every stage ran as a Prefect task run on the cluster, all completed
    states = _subflow_task_states(state, expect=_shard_names(local_merge) | {"finalize merge", "publish"})
    shard_runs = [name for name in states if name.startswith("merge shard")]
    assert set(shard_runs) == _shard_names(local_merge) and len(shard_runs) == len(shards)
    parts = {f"extract part {i}" for i in range(len(shards))}  # the norm pass, split like the merge
    for name in [*shard_runs, *parts, "finalize merge", "solve", "publish", *(f"extract {s}" for s in SKILLS)]:
        assert states[name] == ["Completed"], (name, states)
    assert states["plan shards"] == ["Completed", "Completed"]  # for the extraction, then (cached) for the merge
    assert [n for n in states if n.startswith("combine extraction of")] == [f"combine extraction of {SKILLS}"]
    assert len([n for n in states if n.startswith("evaluate merged")]) == len(SKILLS)

    # intermediates went through S3: stats, the merged model (committed by its manifest) and task results
    keys = bucket_keys(s3_endpoint, bucket)
    assert any(k.startswith("results/shared/stats/") for k in keys)
    merged_name = Path(result["merged_path"]).name
    assert {f"results/shared/merged/{merged_name}/{n}" for n in [*local_merge, ".metamerge-shared.json"]} <= keys
    assert not any(".shards/" in k for k in keys), "shards go straight to the merged folder"
    assert _open_uploads(s3_endpoint, bucket) == []
    assert sum(1 for k in keys if k.startswith("results/") and "/shared/" not in k) >= 5  # Prefect task results
    assert result["scores"] and result["published"]
    manifest = latest_manifest(f"s3://{bucket}/merges", "zoo-dask", s3_endpoint)
    assert manifest is not None and set(local_merge) <= set(manifest["files"])


def test_workers_with_their_own_disks_move_only_their_shards_bytes(zoo, s3_endpoint, bucket, api, local_merge, tmp_path,
                                                                   s3_zoo):
    """No shared folder at all: inputs by range, shards uploaded in place, finalize downloads no tensor."""
    from metamerge.io.s3 import s3_client
    from metamerge_prefect.flows.merge_flow import merge_flow
    from tests.daskworkers import private_workers

    workdir = tmp_path / "wd"
    with private_workers(workdir, tmp_path / "disks", {"PREFECT_API_URL": api}, [None, None]) as cluster:
        # merge.device cuda with no GPU worker: falls back to CPU workers, and says so
        recipe = _recipe(zoo, s3_endpoint, bucket, workdir, s3_zoo, results=f"s3://{bucket}/results",
                         runner={"kind": "dask", "address": cluster.address}, merge={**MERGE, "device": "cuda"},
                         publish={"target": f"s3://{bucket}/merges", "endpoint_url": s3_endpoint})
        state = merge_flow(recipe, return_state=True)
        assert state.is_completed(), state.message
    result = state.result()
    # published by server-side copy from shared storage: the same bytes, and no worker downloaded them
    manifest = latest_manifest(f"s3://{bucket}/merges", "zoo-dask", s3_endpoint)
    client = s3_client(s3_endpoint)
    run_key = result["published"]["run_uri"].removeprefix(f"s3://{bucket}/")
    assert {name: client.get_object(Bucket=bucket, Key=f"{run_key}/{name}")["Body"].read()
            for name in local_merge} == local_merge
    assert set(local_merge) <= set(manifest["files"])
    assert result["placement"]["notes"] == ["merge.device is cuda but no Dask worker declares a GPU resource: "
                                            "the merge ran on CPU workers"]
    published_report = client.get_object(Bucket=bucket, Key=f"{run_key}/report.md")["Body"].read().decode()
    assert "## Placement (Dask)\n\n- merge.device is cuda but no Dask worker declares a GPU resource" in published_report
    assert _committed_files(result, bucket, s3_endpoint, tmp_path) == local_merge
    report = json.loads(_committed_report(result, bucket, s3_endpoint))
    fetched: dict[str, int] = {}
    for shard in report["shards"]:
        fetched[shard["worker"]] = fetched.get(shard["worker"], 0) + shard["bytes_fetched"]
    assert len(fetched) == 2 and {w.rsplit("/", 1)[1] for w in fetched} <= {str(p) for p in cluster.pids}
    everything = sum(_expected_fetch_per_shard(zoo))
    inputs = (len(SKILLS) + 1) * s3_zoo["model_bytes"]
    assert sum(fetched.values()) == everything and everything < 1.05 * inputs
    # extraction was split the same way: each part read its shard's float tensors from every input
    parts = sorted(result["extraction_fetch"], key=lambda p: p["index"])
    _, floats, headers = _shard_bytes(zoo)
    assert [p["index"] for p in parts] == list(range(len(floats)))
    for part, data in zip(parts, floats, strict=True):
        assert (len(SKILLS) + 1) * data < part["bytes_fetched"] <= (len(SKILLS) + 1) * data + 2 * headers, part
        fetched[part["worker"]] = fetched.get(part["worker"], 0) + part["bytes_fetched"]
    assert max(fetched.values()) < 0.9 * 2 * inputs, fetched  # a worker moved its shards' bytes, not every input
    print(f"bytes fetched per worker, extraction + merge: {fetched} (inputs: {inputs})")
    # nothing on any worker's disk but small files: no input download, no shard left, no merged tensor fetched
    for disk in cluster.folders:
        big = [p for p in disk.rglob("*") if p.is_file() and p.stat().st_size > 64 * 1024]
        assert big == [], big
    assert _open_uploads(s3_endpoint, bucket) == []


def _committed_report(result, bucket, s3_endpoint) -> str:
    from metamerge.io.s3 import s3_client

    name = Path(result["merged_path"]).name
    key = f"results/shared/merged/{name}.report.json"
    return s3_client(s3_endpoint).get_object(Bucket=bucket, Key=key)["Body"].read().decode()


def test_worker_killed_mid_upload_leaves_nothing_visible_and_is_retried_elsewhere(
        zoo, s3_endpoint, bucket, api, local_merge, tmp_path, s3_zoo):
    from metamerge.io.s3 import s3_client
    from metamerge_prefect.flows.merge_flow import merge_flow
    from tests.daskworkers import private_workers

    marker = tmp_path / "hung-worker.pid"
    # the first shard task to have uploaded its parts hangs before returning: its upload stays open
    env = {"PREFECT_API_URL": api, "METAMERGE_TEST_HANG_AT": "stage-upload", "METAMERGE_TEST_HANG_MARKER": str(marker),
           "METAMERGE_TEST_HANG_ONCE": "1"}
    seen: dict[str, object] = {}
    workdir = tmp_path / "wd"
    with private_workers(workdir, tmp_path / "disks", env, [None, None]) as cluster:

        def kill_when_hung() -> None:
            wait_for(lambda: marker.exists() and marker.read_text().strip(), 300, "a shard upload to hang", step=0.2)
            listed = s3_client(s3_endpoint).list_objects_v2(Bucket=bucket, Prefix="results/shared/merged/")
            seen["visible"] = [o["Key"] for o in listed.get("Contents", []) if o["Key"].endswith(".safetensors")]
            seen["open"] = _open_uploads(s3_endpoint, bucket)
            seen["pid"] = int(marker.read_text())
            os.kill(int(marker.read_text()), signal.SIGKILL)

        killer = threading.Thread(target=kill_when_hung, daemon=True)
        killer.start()
        recipe = _recipe(zoo, s3_endpoint, bucket, workdir, s3_zoo, results=f"s3://{bucket}/results",
                         runner={"kind": "dask", "address": cluster.address})
        state = merge_flow(recipe, return_state=True)
        killer.join(timeout=5)
        assert state.is_completed(), state.message
        assert seen.get("pid") in cluster.pids, (seen, cluster.pids)
        killed = cluster.processes[cluster.pids.index(seen["pid"])]
        assert killed.wait(timeout=10) == -signal.SIGKILL  # the worker is gone, not restarted

    assert seen["visible"] == [], "a staged shard is invisible until finalize commits it"
    # the hung worker's upload is open (the other worker may be mid-upload of another shard)
    assert seen["open"] and all(k.startswith("results/shared/merged/") and k.endswith(".safetensors")
                                for k in seen["open"]), seen["open"]
    assert _open_uploads(s3_endpoint, bucket) == [], "the killed attempt's upload was aborted"
    result = state.result()
    assert _committed_files(result, bucket, s3_endpoint, tmp_path) == local_merge
    report = json.loads(_committed_report(result, bucket, s3_endpoint))
    assert str(seen["pid"]) not in {s["worker"].rsplit("/", 1)[1] for s in report["shards"]}
    # one task run per shard, each Completed; the killed shard's run has run twice (two Running states)
    shards = _shard_names(local_merge)
    runs = [r for r in _subflow_task_runs(state, expect=shards | {"finalize merge"}) if r.name.startswith("merge shard")]
    assert sorted(r.name for r in runs) == sorted(shards), [r.name for r in runs]
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state.name) for r in runs]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        running = {r.name: sum(s.type.value == "RUNNING" for s in client.read_task_run_states(r.id)) for r in runs}
    assert sorted(running.values()) == [1] * (len(runs) - 1) + [2], running


def test_gpu_work_goes_to_the_worker_that_declares_a_gpu(zoo, s3_endpoint, bucket, api, tmp_path, s3_zoo):
    """Placement by Dask worker resources: merge shards and every evaluation run on the GPU worker only.

    With `runner.inputs: download` (the behaviour before ranged reads), the worker downloads each input.
    """
    from metamerge_prefect.flows.merge_flow import merge_flow
    from tests.daskworkers import private_workers

    workdir = tmp_path / "wd"
    with private_workers(workdir, tmp_path / "disks", {"PREFECT_API_URL": api}, [None, "GPU=1"]) as cluster:
        recipe = _recipe(zoo, s3_endpoint, bucket, workdir, s3_zoo, results=f"s3://{bucket}/results",
                         runner={"kind": "dask", "address": cluster.address, "inputs": "download"},
                         merge={**MERGE, "device": "auto"},
                         evaluation={"tasks_dir": str(zoo.tasks_dir), "batch_size": 32, "limit": 4, "device": "auto"})
        state = merge_flow(recipe, return_state=True)
        assert state.is_completed(), state.message
    result = state.result()
    assert result["placement"]["gpu_workers"] == 1
    assert result["placement"]["merge_on_gpu"] and result["placement"]["evaluation_on_gpu"]
    report = json.loads(_committed_report(result, bucket, s3_endpoint))
    assert {s["worker"].rsplit("/", 1)[1] for s in report["shards"]} == {str(cluster.pids[1])}
    assert {s["bytes_fetched"] for s in report["shards"]} == {0}  # inputs: download: read from the local copies
    assert result["extraction_fetch"] is None  # and extraction per fine-tune, as before
    # every evaluation wrote its scores on the GPU worker's own disk, none on the other's
    jobs = 3 * len(SKILLS)  # the base and the merged model on every skill's task, each fine-tune on its own
    assert len(list((cluster.folders[1] / "scores").glob("*.json"))) == jobs
    assert not (cluster.folders[0] / "scores").exists()
