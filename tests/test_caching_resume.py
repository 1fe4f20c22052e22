"""Content-addressed caching, and resuming after SIGKILL, on the real zoo, Prefect API and S3 server."""

import dataclasses
import json
import os
import signal
import sys
import time

import pytest

from metamerge.io.manifests import latest_manifest
from metamerge.io.s3 import s3_client
from metamerge.pipeline import evaluate as evaluate_stage
from metamerge.pipeline import extract as extract_stage
from metamerge.pipeline import merge as merge_stage
from metamerge.pipeline import solve as solve_stage
from metamerge.pipeline.inputs import resolve
from tests.flowtools import (
    bucket_keys,
    expected_task_names,
    start_flow_subprocess,
    task_states,
    together_name,
    wait_for_no_process_of,
    zoo_recipe,
)

pytestmark = pytest.mark.slow


_OPEN_LISTENERS: list = []
_HOOKED = []


def _audit(event: str, args: tuple) -> None:
    """Python's audit hook sees every open() / Path.open() / os.open() in this process, whatever module calls it."""
    if event == "open" and _OPEN_LISTENERS and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if path.endswith(".safetensors"):
            for listener in _OPEN_LISTENERS:
                listener(path)


@pytest.fixture
def model_reads(monkeypatch):
    """Every open of a *.safetensors file by this process, plus every lm-eval run (it loads models itself)."""
    if not _HOOKED:
        sys.addaudithook(_audit)  # process-wide and permanent: inert while no listener is registered
        _HOOKED.append(True)
    reads = {"opened": [], "lm_eval": 0}
    real = evaluate_stage.EVALUATION

    def counting(*args, **kwargs):
        reads["lm_eval"] += 1
        return real.scores(*args, **kwargs)

    monkeypatch.setattr(evaluate_stage, "EVALUATION", dataclasses.replace(real, scores=counting))
    _OPEN_LISTENERS.append(reads["opened"].append)
    yield reads
    _OPEN_LISTENERS.remove(reads["opened"].append)


def _objects(endpoint: str, bucket: str) -> dict[str, tuple]:
    """Every object with what changes when it is written again: (ETag, size, LastModified)."""
    listed = s3_client(endpoint).list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"]: (o["ETag"], o["Size"], o["LastModified"]) for o in listed}


def test_second_run_is_all_cached_and_reads_nothing(zoo, s3_endpoint, bucket, isolated_results, tmp_path, model_reads):
    from metamerge_prefect.flows.merge_flow import merge_flow

    recipe = zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work")
    expected = expected_task_names(recipe)
    model_reads["opened"].clear()
    first = merge_flow(recipe, return_state=True)
    assert first.is_completed(), first.message
    assert model_reads["opened"] and model_reads["lm_eval"] > 0  # the counter sees a real run's reads
    first_states = task_states(first.state_details.flow_run_id, expect=expected_task_names(recipe, first_run=True))
    assert set(first_states) == expected_task_names(recipe, first_run=True), set(first_states) ^ expected
    # the base was read once for all four fine-tunes; each still has its own (cached) extract task
    assert first_states.pop(together_name([f["name"] for f in recipe["finetunes"]])) == ["Completed"]
    published = _objects(s3_endpoint, bucket)
    model_reads["opened"].clear()
    model_reads["lm_eval"] = 0
    time.sleep(1.1)  # S3 LastModified has 1 s resolution: a re-upload now would show
    started = time.monotonic()
    second = merge_flow(recipe, return_state=True)
    elapsed = time.monotonic() - started
    assert second.is_completed(), second.message
    states = task_states(second.state_details.flow_run_id, expect=expected)
    assert {name: len(runs) for name, runs in states.items()} == {name: len(runs) for name, runs in first_states.items()}
    assert {s for names in states.values() for s in names} == {"Cached"}, states
    assert model_reads == {"opened": [], "lm_eval": 0}
    assert _objects(s3_endpoint, bucket) == published  # nothing uploaded again
    assert second.result()["run_id"] == first.result()["run_id"]
    print(f"cached re-run took {elapsed:.1f}s")


def test_adding_a_finetune_recomputes_only_what_depends_on_it(zoo, s3_endpoint, bucket, isolated_results, tmp_path):
    from metamerge_prefect.flows.merge_flow import merge_flow

    two = zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work", skills=["capitals", "reverse"])
    assert merge_flow(two, return_state=True).is_completed()
    three = zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work")
    state = merge_flow(three, return_state=True)
    assert state.is_completed(), state.message
    new = [f["name"] for f in three["finetunes"] if f["name"] not in ("capitals", "reverse")]
    expected = expected_task_names(three) | {together_name(new)}  # only the new ones, in one pass
    states = task_states(state.state_details.flow_run_id, expect=expected)
    assert set(states) == expected, set(states) ^ expected
    assert states["extract capitals"] == ["Cached"] and states["extract reverse"] == ["Cached"]
    assert states["extract shift"] == ["Completed"]
    for task in ("zoo_capitals", "zoo_reverse"):
        assert states[f"evaluate base on ('{task}',)"] == ["Cached"]
    assert states["evaluate capitals on ('zoo_capitals',)"] == ["Cached"]
    assert states["evaluate reverse on ('zoo_reverse',)"] == ["Cached"]
    assert states["evaluate base on ('zoo_shift',)"] == ["Completed"]
    assert states["evaluate shift on ('zoo_shift',)"] == ["Completed"]
    assert set(states["evaluate merged on ('zoo_capitals',)"]) == {"Completed"}
    assert states["merge"] == ["Completed"] and states["publish"] == ["Completed"]
    assert states["solve"] == ["Completed"]


def _kill_at(point: str, recipe: dict, tmp_path, results) -> None:
    marker = tmp_path / f"hang-{point}"
    proc = start_flow_subprocess(recipe, {"METAMERGE_TEST_HANG_AT": point, "METAMERGE_TEST_HANG_MARKER": str(marker),
                                          "PREFECT_LOCAL_STORAGE_PATH": str(results)})
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"flow exited before reaching {point}: {proc.stderr.read().decode()[-3000:]}")
        assert time.monotonic() < deadline, f"never reached {point}"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    wait_for_no_process_of()  # its ephemeral Prefect server went with it (issue 13 #3)


def _uninterrupted_merge(recipe: dict, workdir) -> dict[str, bytes]:
    """The same merge run start to end, without Prefect, in a workdir of its own: {file: bytes}."""
    from pathlib import Path

    from metamerge.methods.registry import plan_for
    from metamerge.recipe import parse_recipe

    rec = parse_recipe({**recipe, "workdir": str(workdir)})
    plan, labels = plan_for(rec.method), [ft.label for ft in rec.finetunes]
    base = resolve(rec.base, workdir)
    fts = [resolve(ft.ref, workdir) for ft in rec.finetunes]
    stats = [extract_stage.extract(base, f, label, plan, rec.merge.vocab, workdir) for f, label in zip(fts, labels, strict=True)]
    out = merge_stage.merge(rec, base, fts, solve_stage.solve(labels, stats, plan, rec.method.name))
    return {p.name: p.read_bytes() for p in sorted(Path(out.path).iterdir())}


def _published_bytes(endpoint: str, bucket: str, run_uri: str, names) -> dict[str, bytes]:
    client, prefix = s3_client(endpoint), run_uri.removeprefix(f"s3://{bucket}/")
    return {name: client.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read() for name in names}


def test_sigkill_during_merge_then_resume(zoo, s3_endpoint, bucket, isolated_results, tmp_path):
    from metamerge_prefect.flows.merge_flow import merge_flow

    recipe = zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work")
    _kill_at("merge", recipe, tmp_path, isolated_results)
    merged_root = tmp_path / "work" / "merged"
    leftovers = list(merged_root.glob(".*.tmp-*"))
    assert leftovers, "the killed merge should have left its temporary folder"
    assert not [p for p in merged_root.iterdir() if not p.name.startswith(".")], "no merged model may be visible"
    assert bucket_keys(s3_endpoint, bucket) == set()

    state = merge_flow(recipe, return_state=True)
    assert state.is_completed(), state.message
    states = task_states(state.state_details.flow_run_id)
    assert set(states["extract capitals"]) == {"Cached"}  # finished before the kill, reused
    assert not any(p.exists() for p in leftovers), "stale temporaries are cleaned on the next run"
    result = state.result()
    assert result["published"]["manifest_uri"].endswith("manifest.json")
    # the resumed output is byte for byte what a run that was never killed writes
    want = _uninterrupted_merge(recipe, tmp_path / "uninterrupted")
    from pathlib import Path

    assert {p.name: p.read_bytes() for p in sorted(Path(result["merged_path"]).iterdir())} == want
    published = {name: data for name, data in want.items() if not name.startswith(".")}  # hidden markers stay local
    assert _published_bytes(s3_endpoint, bucket, result["published"]["run_uri"], published) == published


def test_sigkill_during_upload_then_resume(zoo, s3_endpoint, bucket, isolated_results, tmp_path):
    from metamerge_prefect.flows.merge_flow import merge_flow

    recipe = zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work")
    _kill_at("upload", recipe, tmp_path, isolated_results)
    keys = bucket_keys(s3_endpoint, bucket)
    assert keys and not any(k.endswith("manifest.json") or k.endswith("latest.json") for k in keys)
    assert latest_manifest(f"s3://{bucket}/merges", "zoo-metagpt", s3_endpoint) is None  # invisible to readers

    state = merge_flow(recipe, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["published"]["skipped"] >= 1  # objects uploaded before the kill were not re-sent
    manifest = latest_manifest(f"s3://{bucket}/merges", "zoo-metagpt", s3_endpoint)
    assert manifest["run_id"] == summary["run_id"]
    client = s3_client(s3_endpoint)
    prefix = summary["published"]["run_uri"].removeprefix(f"s3://{bucket}/")
    body = client.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read()
    assert set(json.loads(body)["files"]) <= {k.removeprefix(prefix + "/") for k in bucket_keys(s3_endpoint, bucket)}
    # what was published, half before the kill and half after, is byte for byte an uninterrupted run's model
    want = {name: data for name, data in _uninterrupted_merge(recipe, tmp_path / "uninterrupted").items()
            if not name.startswith(".")}  # hidden markers stay local
    assert _published_bytes(s3_endpoint, bucket, summary["published"]["run_uri"], want) == want


def test_results_on_s3_are_shared_between_runs(zoo, s3_endpoint, bucket, isolated_results, tmp_path):
    """With `results: s3://…` a second run finds its cache in S3 even with an empty local store."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from metamerge_prefect.flows.merge_flow import merge_flow

    recipe = zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work", results=f"s3://{bucket}/prefect-results",
                        endpoint_url=s3_endpoint)
    expected = expected_task_names(recipe)
    first = merge_flow(recipe, return_state=True)
    assert first.is_completed(), first.message
    stored = [k for k in bucket_keys(s3_endpoint, bucket) if k.startswith("prefect-results/")]
    assert len(stored) >= len(expected)  # one per cached task result
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "empty-local-store"}):
        state = merge_flow(recipe, return_state=True)
    assert state.is_completed(), state.message
    first_states = task_states(first.state_details.flow_run_id, expect=expected_task_names(recipe, first_run=True))
    states = task_states(state.state_details.flow_run_id, expect=expected)
    assert set(states) == expected and set(first_states) == expected_task_names(recipe, first_run=True)
    assert {s for names in states.values() for s in names} == {"Cached"}, states
