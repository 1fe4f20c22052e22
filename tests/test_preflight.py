"""Issue 13 #7: a preflight, before any heavy stage, fails in seconds on an unusable publish target,
result storage or disk. Real S3 server (moto) on loopback, real CLI processes, a real tmpfs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from metamerge.errors import InputError, TransientError, WriteError
from metamerge.io.s3 import s3_client
from metamerge.recipe import load_recipe
from tests.helpers import random_family

REPO = Path(__file__).resolve().parent.parent


def _recipe(tmp_path: Path, **overrides) -> Path:
    base, fts, *_ = random_family(tmp_path / "models", n_finetunes=2)
    data = {"name": "m", "base": str(base), "finetunes": [str(f) for f in fts], "merge": {"device": "cpu"},
            "workdir": str(tmp_path / "work"), **overrides}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_probe_checks_write_access_and_leaves_nothing(tmp_path, s3_endpoint, bucket):
    from metamerge.pipeline.preflight import preflight

    recipe = load_recipe(_recipe(tmp_path, publish={"target": f"s3://{bucket}/merges", "endpoint_url": s3_endpoint},
                                 results=f"s3://{bucket}/results", endpoint_url=s3_endpoint))
    done = preflight(recipe)
    assert any("publish target" in d for d in done) and any("result storage" in d for d in done)
    client = s3_client(s3_endpoint)
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert not list(tmp_path.rglob(".metamerge-preflight*"))  # the local probe is gone too


@pytest.mark.parametrize("which", ["publish", "results"])
def test_missing_bucket_is_named(tmp_path, s3_endpoint, bucket, which):
    from metamerge.pipeline.preflight import preflight

    good, bad = f"s3://{bucket}/x", "s3://no-such-bucket-here/x"
    recipe = load_recipe(_recipe(tmp_path, endpoint_url=s3_endpoint,
                                 publish={"target": bad if which == "publish" else good},
                                 results=bad if which == "results" else good))
    what = "publish target" if which == "publish" else "result storage"
    with pytest.raises(InputError, match=rf"S3 preflight of {what} {bad} at {s3_endpoint}: NoSuchBucket "
                                         r"'no-such-bucket-here'"):
        preflight(recipe)


def test_unreachable_endpoint_fails_within_seconds(tmp_path):
    from metamerge.pipeline.preflight import preflight

    endpoint = f"http://127.0.0.1:{_closed_port()}"
    recipe = load_recipe(_recipe(tmp_path, publish={"target": "s3://bucket/x", "endpoint_url": endpoint}))
    started = time.monotonic()
    with pytest.raises(TransientError, match=rf"S3 preflight of publish target s3://bucket/x at {endpoint}: "
                                             r"cannot connect to the endpoint \(EndpointConnectionError\)"):
        preflight(recipe)
    assert time.monotonic() - started < 10


def test_workdir_and_local_target_on_one_small_disk_need_room_for_two_copies(tmp_path):
    """The estimate sums what lands on one file system: workdir copy + published copy."""
    import torch

    from metamerge.pipeline.preflight import preflight
    from tests.helpers import write_checkpoint

    small = tmp_path / "small"
    small.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        base = {"w": torch.zeros(1024, 1024)}  # 4 MB: fits once, not twice
        base_dir = write_checkpoint(tmp_path / "base", base)
        ft_dir = write_checkpoint(tmp_path / "ft", {"w": base["w"] + 0.01})
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({"name": "m", "base": str(base_dir), "finetunes": [str(ft_dir)],
                                        "workdir": str(small / "work"), "publish": {"target": str(small / "pub")}}))
        with pytest.raises(WriteError, match=r"not enough free disk for workdir .* and publish target .*: about "
                                             r"8\.\d MB needed"):
            preflight(load_recipe(path))
        data = yaml.safe_load(path.read_text())
        data.pop("publish")
        path.write_text(yaml.safe_dump(data))
        preflight(load_recipe(path))  # one copy fits
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def _run_cli(recipe: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", "from metamerge_prefect.cli import main; main()", "run", str(recipe)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    return done, time.monotonic() - started


@pytest.mark.slow
def test_metamerge_run_to_a_missing_bucket_fails_before_merging(tmp_path, s3_endpoint):
    recipe = _recipe(tmp_path, publish={"target": "s3://no-such-bucket-here/merges", "endpoint_url": s3_endpoint})
    done, elapsed = _run_cli(recipe, tmp_path)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: S3 preflight of publish target s3://no-such-bucket-here/merges at {s3_endpoint}: "
                      "NoSuchBucket 'no-such-bucket-here'"], done.stderr[-2000:]
    assert not (tmp_path / "work" / "merged").exists() and not (tmp_path / "work" / "stats").exists()
    assert elapsed < 20
    print(f"{errors[0]} ({elapsed:.1f}s)")


@pytest.mark.slow
def test_metamerge_run_to_an_unreachable_endpoint_fails_before_merging(tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    recipe = _recipe(tmp_path, publish={"target": "s3://bucket/merges", "endpoint_url": endpoint})
    done, elapsed = _run_cli(recipe, tmp_path)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and endpoint in errors[0] and "EndpointConnectionError" in errors[0], done.stderr[-2000:]
    assert not (tmp_path / "work" / "merged").exists()
    assert elapsed < 20
    print(f"{errors[0]} ({elapsed:.1f}s)")


@pytest.mark.slow
def test_flow_preflight_fails_before_any_task(tmp_path, s3_endpoint, prefect_api):
    """Deployments and event triggers start merge_flow without the CLI: the flow runs the preflight too."""
    from metamerge_prefect.flows.merge_flow import merge_flow
    from tests.flowtools import task_states

    recipe = yaml.safe_load(_recipe(tmp_path, publish={"target": "s3://no-such-bucket-here/m",
                                                       "endpoint_url": s3_endpoint}).read_text())
    started = time.monotonic()
    state = merge_flow(recipe, return_state=True)
    assert state.is_failed()
    with pytest.raises(InputError, match="NoSuchBucket 'no-such-bucket-here'"):
        state.result()
    assert task_states(state.state_details.flow_run_id, timeout=5) == {}  # no stage ran
    print(f"flow preflight failed after {time.monotonic() - started:.1f}s")


def test_merge_only_does_not_check_what_it_does_not_use(tmp_path):
    """`metamerge merge --out` publishes nothing: an unusable publish target is no reason to refuse it."""
    from metamerge.pipeline.preflight import preflight

    endpoint = f"http://127.0.0.1:{_closed_port()}"
    recipe = load_recipe(_recipe(tmp_path, publish={"target": "s3://bucket/x", "endpoint_url": endpoint},
                                 results="s3://bucket/results", endpoint_url=endpoint))
    preflight(recipe, out=tmp_path / "out")
    with pytest.raises(TransientError):
        preflight(recipe)


def test_a_server_that_answers_5xx_is_reachable_and_only_warned_about(tmp_path, s3_endpoint, bucket):
    """Unreachable fails; a failing but answering server is left to the stages' retries (tests/test_faults.py)."""
    from metamerge.pipeline.preflight import preflight
    from tests.faultproxy import FaultProxy

    with FaultProxy(s3_endpoint, always=True, mode="503") as proxy:
        recipe = load_recipe(_recipe(tmp_path, publish={"target": f"s3://{bucket}/x", "endpoint_url": proxy.endpoint}))
        done = preflight(recipe)
    assert any(d.startswith("warning: S3 preflight of publish target") and "HTTP 503" in d for d in done), done
