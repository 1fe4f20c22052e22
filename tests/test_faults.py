"""Retries under S3 faults, through a fault-injecting proxy in front of the real S3 server."""

import json
import os
import subprocess
import sys

import pytest

from metamerge.errors import TransientError
from metamerge.io.manifests import latest_manifest
from metamerge.io.publish import publish_run
from tests.faultproxy import FaultProxy
from tests.flowtools import bucket_keys, zoo_recipe


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


def test_flow_survives_a_flaky_endpoint_and_fails_cleanly_on_a_dead_one(s3_endpoint, bucket, prefect_api, tmp_path):
    """botocore's own 4 attempts first; when they are spent, Prefect's retry of the publish task succeeds."""
    from metamerge.io.s3 import s3_client
    from metamerge_prefect.flows.merge_flow import merge_flow
    from metamerge_prefect.tasks.policy import NETWORK_RETRIES
    from tests.flowtools import task_runs
    from tests.helpers import random_family

    base_dir, ft_dirs, _, _ = random_family(tmp_path / "models", scale=[0.05, 0.1, 0.15])
    recipe = {"name": "small", "base": str(base_dir), "workdir": str(tmp_path / "work"),
              "finetunes": [{"ref": str(d), "name": f"ft{i}"} for i, d in enumerate(ft_dirs)],
              "merge": {"device": "cpu"}}

    # botocore's Config(retries={"max_attempts": 4}) counts retries: 1 + 4 = 5 requests per call.
    # 6 faults on the publish task's first request (HeadBucket): its first attempt's 5 requests all
    # fail, the retry's second succeeds (the preflight and the intact-check read are left alone)
    head = ("HEAD", f"/{bucket}")
    with FaultProxy(s3_endpoint, fail_first=6, mode="503", match=lambda *request: request == head) as proxy:
        state = merge_flow({**recipe, "publish": {"target": f"s3://{bucket}/merges", "endpoint_url": proxy.endpoint}},
                           return_state=True)
    assert state.is_completed(), state.message
    assert proxy.faults == 6 and proxy.log.count(head) == 7
    assert any(k.endswith("manifest.json") for k in bucket_keys(s3_endpoint, bucket))
    publish = {r.name: r for r in task_runs(state.state_details.flow_run_id, expect={"publish"})}["publish"]
    assert publish.state.is_completed() and publish.run_count == 2

    other = f"{bucket}-dead"
    s3_client(s3_endpoint).create_bucket(Bucket=other)
    with FaultProxy(s3_endpoint, always=True, mode="500") as proxy:
        state = merge_flow({**recipe, "publish": {"target": f"s3://{other}/merges", "endpoint_url": proxy.endpoint}},
                           return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=rf"S3 publish at {proxy.endpoint}: HeadBucket failed with HTTP 500") as info:
        state.result()
    assert "\n" not in str(info.value)
    publish = {r.name: r for r in task_runs(state.state_details.flow_run_id, expect={"publish"})}["publish"]
    assert publish.state.is_failed() and publish.run_count == NETWORK_RETRIES + 1
    # botocore's 5 HeadBucket requests per Prefect attempt (the preflight saw a reachable server that
    # fails, and warned), and nothing written
    assert [r for r in proxy.log if r[0] == "HEAD"] == [("HEAD", f"/{other}")] * 5 * (NETWORK_RETRIES + 1)
    assert not [r for r in proxy.log if r[0] == "PUT"]
    assert bucket_keys(s3_endpoint, other) == set()


def test_bad_input_is_not_retried(tmp_path, zoo, s3_endpoint, bucket, prefect_api):
    """A deterministic error fails at once: one attempt of the task, not NETWORK_RETRIES."""
    from metamerge_prefect.flows.merge_flow import merge_flow
    from tests.flowtools import task_runs

    recipe = zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work", base=str(tmp_path / "missing"))
    state = merge_flow(recipe, return_state=True)
    assert state.is_failed()
    name = f"resolve {tmp_path / 'missing'}"
    resolve_base = {r.name: r for r in task_runs(state.state_details.flow_run_id, expect={name})}[name]
    assert resolve_base.state.is_failed() and resolve_base.run_count == 1


RETRY_PROBE = """
import json, sys, time
from prefect import flow
from metamerge_prefect.tasks import resolve as resolve_task_module
from metamerge.errors import RefError, TransientError
from metamerge_prefect.tasks.resolve import resolve_model

calls = {"flaky": [], "bad": []}


def failing(ref, workdir, endpoint_url=None, download=True):  # the injected fault: the remote is down / the ref is wrong
    name = ref.rsplit("/", 1)[1]
    calls[name].append(time.time())
    if name == "bad":
        raise RefError(f"model ref {ref!r}: no such folder")
    raise TransientError("S3 download at http://127.0.0.1:9: EndpointConnectionError (injected)")


resolve_task_module.resolve = failing


@flow(name="retry-probe")
def probe(workdir: str) -> None:
    resolve_model("s3://bucket/flaky", workdir, return_state=True)
    resolve_model("s3://bucket/bad", workdir, return_state=True)


state = probe(sys.argv[1], return_state=True)
print(json.dumps({"flow_run_id": str(state.state_details.flow_run_id), "calls": calls}))
"""


def _python(code: str, env: dict[str, str], *args: str) -> str:
    from tests.flowtools import REPO

    env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_network_stages_retry_with_exponential_backoff_and_jitter(tmp_path, prefect_api):
    """README: 4 Prefect retries waiting 2, 4, 8, 16 s with jitter; never on a deterministic error.

    Measured with the base shrunk to 0.1 s (the production count of retries), in a process of its own
    that reads the policy from the environment as production does and reports to this test's API.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    from tests.flowtools import task_runs

    env = {k: v for k, v in os.environ.items() if not k.startswith("METAMERGE_")}
    # production's policy, read from an environment that does not override it
    policy = json.loads(_python(
        "import json; from metamerge_prefect.tasks import policy; from metamerge_prefect.tasks.gate import check_quality_gate as g; "
        "from metamerge_prefect.tasks.merge_shards import finalize_merge as f, merge_shard as m, plan_shards as p; "
        "from metamerge_prefect.tasks.publish import publish_model as u; from metamerge_prefect.tasks.resolve import resolve_model as r; "
        "print(json.dumps({t.name: [t.retries, t.retry_delay_seconds, t.retry_jitter_factor, "
        "t.retry_condition_fn is policy.retry_unless_input_error] for t in (r, u, g, p, m, f)}))", env))
    assert policy == dict.fromkeys(["resolve", "publish", "quality-gate", "plan-shards", "merge-shard",
                                    "finalize-merge"], [4, [2.0, 4.0, 8.0, 16.0], 0.5, True])

    base = 0.1
    env.update({"METAMERGE_RETRY_BACKOFF": str(base), "PREFECT_API_URL": get_current_settings().api.url})
    result = json.loads(_python(RETRY_PROBE, env, str(tmp_path / "work")))
    runs = {run.name: run for run in task_runs(result["flow_run_id"],
                                               expect={"resolve s3://bucket/flaky", "resolve s3://bucket/bad"})}
    bad, flaky = runs["resolve s3://bucket/bad"], runs["resolve s3://bucket/flaky"]
    assert bad.run_count == 1 and len(result["calls"]["bad"]) == 1 and bad.state.is_failed()
    assert flaky.run_count == 5 and len(result["calls"]["flaky"]) == 5 and flaky.state.is_failed()

    with get_client(sync_client=True) as client:
        history = sorted(client.read_task_run_states(flaky.id), key=lambda s: s.timestamp)
    waits = [(s.state_details.scheduled_time - s.timestamp).total_seconds() for s in history if s.name == "AwaitingRetry"]
    assert len(waits) == 4, [s.name for s in history]
    # Prefect's jitter (factor 0.5) draws each wait from [0.63, 1.5] × its nominal value base·2^k
    nominal = [base * 2 ** k for k in range(4)]
    for k, (wait, want) in enumerate(zip(waits, nominal, strict=True)):
        assert 0.62 * want <= wait <= 1.5 * want, (k, waits)
    assert waits[3] > waits[1] > 0 and waits[2] > waits[0], waits  # bands two apart never overlap
    assert any(abs(wait / want - 1) > 0.02 for wait, want in zip(waits, nominal, strict=True)), f"no jitter: {waits}"
    # and the task really waited that long before each next attempt
    gaps = [b - a for a, b in zip(result["calls"]["flaky"], result["calls"]["flaky"][1:], strict=False)]
    assert all(gap >= wait - 0.02 for gap, wait in zip(gaps, waits, strict=True)), (gaps, waits)
