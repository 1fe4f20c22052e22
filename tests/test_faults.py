"""Retries under S3 faults, through a fault-injecting proxy in front of the real S3 server."""

import pytest

from metamerge.errors import TransientError
from metamerge.storage import latest_manifest, publish_run
from tests.faultproxy import FaultProxy
from tests.flowtools import bucket_keys, task_states, zoo_recipe


def _files(tmp_path):
    paths = {}
    for name, data in {"model.safetensors": b"w" * 5000, "config.json": b"{}"}.items():
        (tmp_path / name).write_bytes(data)
        paths[name] = tmp_path / name
    return paths


@pytest.mark.parametrize("mode", ["500", "503", "drop"])
def test_first_requests_failing_are_retried(tmp_path, s3_endpoint, bucket, mode):
    with FaultProxy(s3_endpoint, fail_first=2, mode=mode) as proxy:
        result = publish_run(_files(tmp_path), f"s3://{bucket}/p", "m", "r", endpoint_url=proxy.endpoint)
    assert proxy.faults == 2
    assert result.uploaded == 2
    assert latest_manifest(f"s3://{bucket}/p", "m", s3_endpoint)["run_id"] == "r"


def test_persistent_fault_names_the_endpoint_and_publishes_nothing(tmp_path, s3_endpoint, bucket):
    with FaultProxy(s3_endpoint, always=True, mode="500") as proxy, pytest.raises(TransientError) as info:
        publish_run(_files(tmp_path), f"s3://{bucket}/p", "m", "r", endpoint_url=proxy.endpoint)
    assert proxy.endpoint in str(info.value) and "HTTP 500" in str(info.value)
    assert bucket_keys(s3_endpoint, bucket) == set()


@pytest.mark.slow
def test_flow_survives_a_flaky_endpoint_and_fails_cleanly_on_a_dead_one(zoo, s3_endpoint, bucket, prefect_api, tmp_path):
    from flows.merge_flow import merge_flow

    # more faults than botocore's own 4 attempts: the first publish attempt fails, Prefect's retry succeeds
    with FaultProxy(s3_endpoint, fail_first=6, mode="503") as proxy:
        recipe = zoo_recipe(zoo, proxy.endpoint, bucket, tmp_path / "work")
        state = merge_flow(recipe, return_state=True)
    assert state.is_completed(), state.message
    assert proxy.faults == 6
    assert any(k.endswith("manifest.json") for k in bucket_keys(s3_endpoint, bucket))
    assert task_states(state.state_details.flow_run_id)["publish"] == ["Completed"]

    other = f"{bucket}-dead"
    from metamerge.storage import s3_client

    s3_client(s3_endpoint).create_bucket(Bucket=other)
    with FaultProxy(s3_endpoint, always=True, mode="500") as proxy:
        recipe = zoo_recipe(zoo, proxy.endpoint, other, tmp_path / "work")
        state = merge_flow(recipe, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=rf"S3 publish at {proxy.endpoint}"):
        state.result()
    assert bucket_keys(s3_endpoint, other) == set()


def test_bad_input_is_not_retried(tmp_path, zoo, s3_endpoint, bucket, prefect_api):
    """A deterministic error fails at once: one attempt of the task, not NETWORK_RETRIES."""
    from flows.merge_flow import merge_flow

    recipe = zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work", base=str(tmp_path / "missing"))
    state = merge_flow(recipe, return_state=True)
    assert state.is_failed()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        resolve_base = [r for r in runs if r.name == f"resolve {tmp_path / 'missing'}"]
        assert resolve_base and resolve_base[0].run_count == 1
