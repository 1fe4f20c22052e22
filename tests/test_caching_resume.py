"""Content-addressed caching, and resuming after SIGKILL, on the real zoo, Prefect API and S3 server."""

import json
import signal
import time

import pytest

from metamerge import checkpoint, refs, stages
from metamerge.storage import latest_manifest, s3_client
from tests.flowtools import bucket_keys, start_flow_subprocess, task_states, wait_for_no_process_of, zoo_recipe

pytestmark = pytest.mark.slow


class ReadCounter:
    """Counts every way a run could touch model bytes: headers, tensors, file hashes, lm-eval."""

    def __init__(self, monkeypatch):
        self.calls = {"header": 0, "tensor": 0, "sha256": 0, "lm_eval": 0}
        for module, name, key in [(checkpoint, "read_header", "header"), (refs, "sha256_file", "sha256"),
                                  (stages, "evaluate_model", "lm_eval")]:
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name), key))
        monkeypatch.setattr(checkpoint.CheckpointReader, "read_into",
                            self._wrap(checkpoint.CheckpointReader.read_into, "tensor"))

    def _wrap(self, fn, key):
        def wrapped(*args, **kwargs):
            self.calls[key] += 1
            return fn(*args, **kwargs)

        return wrapped


def test_second_run_is_all_cached_and_reads_nothing(zoo, s3_endpoint, bucket, isolated_results, tmp_path, monkeypatch):
    from flows.merge_flow import merge_flow

    recipe = zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work")
    first = merge_flow(recipe, return_state=True)
    assert first.is_completed(), first.message
    counter = ReadCounter(monkeypatch)
    started = time.monotonic()
    second = merge_flow(recipe, return_state=True)
    elapsed = time.monotonic() - started
    assert second.is_completed(), second.message
    states = task_states(second.state_details.flow_run_id)
    flat = [s for names in states.values() for s in names]
    assert flat and set(flat) == {"Cached"}, states
    assert counter.calls == {"header": 0, "tensor": 0, "sha256": 0, "lm_eval": 0}
    assert second.result()["published"] == first.result()["published"]
    print(f"cached re-run took {elapsed:.1f}s")


def test_adding_a_finetune_recomputes_only_what_depends_on_it(zoo, s3_endpoint, bucket, isolated_results, tmp_path):
    from flows.merge_flow import merge_flow

    two = zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work", skills=["capitals", "reverse"])
    assert merge_flow(two, return_state=True).is_completed()
    three = zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work")
    state = merge_flow(three, return_state=True)
    assert state.is_completed(), state.message
    states = task_states(state.state_details.flow_run_id)
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


def test_sigkill_during_merge_then_resume(zoo, s3_endpoint, bucket, isolated_results, tmp_path):
    from flows.merge_flow import merge_flow

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
    assert state.result()["published"]["manifest_uri"].endswith("manifest.json")


def test_sigkill_during_upload_then_resume(zoo, s3_endpoint, bucket, isolated_results, tmp_path):
    from flows.merge_flow import merge_flow

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


def test_results_on_s3_are_shared_between_runs(zoo, s3_endpoint, bucket, isolated_results, tmp_path):
    """With `results: s3://…` a second run finds its cache in S3 even with an empty local store."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.merge_flow import merge_flow

    recipe = zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work", results=f"s3://{bucket}/prefect-results",
                        endpoint_url=s3_endpoint)
    assert merge_flow(recipe, return_state=True).is_completed()
    stored = [k for k in bucket_keys(s3_endpoint, bucket) if k.startswith("prefect-results/")]
    assert len(stored) >= 10  # one per cached task result
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "empty-local-store"}):
        state = merge_flow(recipe, return_state=True)
    assert state.is_completed(), state.message
    flat = [s for names in task_states(state.state_details.flow_run_id).values() for s in names]
    assert set(flat) == {"Cached"}
