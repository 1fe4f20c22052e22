"""Issue 13 #5: refused or missing S3 credentials are never retried, and the one line says so, naming
the endpoint and the bucket. Against moto's server with authentication enforced (tests/authserver.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from metamerge.errors import CredentialsError, is_retryable
from metamerge.io.manifests import read_json
from metamerge.io.publish import publish_run
from tests.authserver import auth_s3_server
from tests.helpers import random_family

REPO = Path(__file__).resolve().parent.parent
UNKNOWN = {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN000000000", "AWS_SECRET_ACCESS_KEY": "nope"}
NO_CREDENTIALS = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                  "AWS_CONFIG_FILE": "/nonexistent"}


@pytest.fixture(scope="module")
def auth_s3():
    with auth_s3_server() as server:
        yield server


def use_credentials(monkeypatch, creds: dict[str, str]) -> None:
    """This process's boto3 sees only `creds` from now on (boto3 caches its default session)."""
    import boto3

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in creds.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)


def _bad(auth_s3):
    wrong_secret = {**auth_s3.writer, "AWS_SECRET_ACCESS_KEY": "wrong"}
    return [("unknown key", UNKNOWN, "InvalidAccessKeyId"), ("wrong secret", wrong_secret, "SignatureDoesNotMatch"),
            ("no permission", auth_s3.nobody, "AccessDenied"), ("read only", auth_s3.reader, "AccessDenied")]


def test_the_server_enforces_auth_and_accepts_good_credentials(auth_s3, monkeypatch, tmp_path):
    from metamerge.io.s3 import check_s3_writable

    use_credentials(monkeypatch, auth_s3.writer)
    check_s3_writable(f"s3://{auth_s3.bucket}/p", auth_s3.endpoint, "publish target")
    (tmp_path / "a.bin").write_bytes(b"a")
    result = publish_run({"a.bin": tmp_path / "a.bin"}, f"s3://{auth_s3.bucket}/p", "m", "ok", auth_s3.endpoint)
    assert read_json(result.manifest_uri, auth_s3.endpoint)["run_id"] == "ok"


def test_refused_credentials_fail_the_preflight_with_their_code(auth_s3, monkeypatch):
    from metamerge.io.s3 import check_s3_writable

    for name, creds, code in _bad(auth_s3):
        use_credentials(monkeypatch, creds)
        started = time.monotonic()
        with pytest.raises(CredentialsError) as info:
            check_s3_writable(f"s3://{auth_s3.bucket}/p", auth_s3.endpoint, "publish target")
        message = str(info.value)
        assert "credentials were refused" in message and code in message, (name, message)
        assert auth_s3.endpoint in message and f"bucket '{auth_s3.bucket}'" in message, message
        assert not is_retryable(info.value) and time.monotonic() - started < 5


def test_refused_credentials_fail_a_publish_at_once(auth_s3, monkeypatch, tmp_path):
    (tmp_path / "a.bin").write_bytes(b"a")
    for name, creds, _ in _bad(auth_s3):
        use_credentials(monkeypatch, creds)
        started = time.monotonic()
        with pytest.raises(CredentialsError, match=rf"S3 publish at {auth_s3.endpoint}: the credentials were refused "
                                                   rf"for bucket '{auth_s3.bucket}'"):
            publish_run({"a.bin": tmp_path / "a.bin"}, f"s3://{auth_s3.bucket}/p", "m", "r", auth_s3.endpoint)
        assert time.monotonic() - started < 5, name


def test_missing_credentials_say_so(auth_s3, monkeypatch, tmp_path):
    from metamerge.io.s3 import check_s3_writable

    use_credentials(monkeypatch, NO_CREDENTIALS)
    with pytest.raises(CredentialsError, match=rf"at {auth_s3.endpoint}: no credentials found for bucket "
                                               rf"'{auth_s3.bucket}' \(NoCredentialsError"):
        check_s3_writable(f"s3://{auth_s3.bucket}/p", auth_s3.endpoint, "publish target")
    (tmp_path / "a.bin").write_bytes(b"a")
    with pytest.raises(CredentialsError, match="no credentials found"):
        publish_run({"a.bin": tmp_path / "a.bin"}, f"s3://{auth_s3.bucket}/p", "m", "r", auth_s3.endpoint)


def _recipe(tmp_path: Path, auth_s3) -> Path:
    base, fts, *_ = random_family(tmp_path / "models", n_finetunes=2)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "m", "base": str(base), "finetunes": [str(f) for f in fts],
                                    "merge": {"device": "cpu"}, "workdir": str(tmp_path / "work"),
                                    "publish": {"target": f"s3://{auth_s3.bucket}/merges",
                                                "endpoint_url": auth_s3.endpoint}}))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("case", ["refused", "missing"])
def test_metamerge_run_with_bad_credentials_fails_in_seconds(auth_s3, tmp_path, case):
    """The CLI, in its own process, as a user runs it: one line, exit 1, no retries, nothing merged."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k == "AWS_DEFAULT_REGION"}
    env.update(UNKNOWN if case == "refused" else NO_CREDENTIALS)
    env.update({"PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect-home")})
    env.pop("PREFECT_API_URL", None)
    recipe = _recipe(tmp_path, auth_s3)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", "from metamerge_prefect.cli import main; main()", "run", str(recipe)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    words = "the credentials were refused" if case == "refused" else "no credentials found"
    assert words in errors[0] and auth_s3.endpoint in errors[0] and f"bucket '{auth_s3.bucket}'" in errors[0]
    assert not (tmp_path / "work" / "merged").exists()
    assert elapsed < 30, elapsed
    print(f"{errors[0]} ({elapsed:.1f}s)")


@pytest.mark.slow
def test_credentials_revoked_before_the_publish_are_not_retried(auth_s3, tmp_path, prefect_api, monkeypatch):
    """Preflight passes; the credentials are refused at publish time: the publish task runs once."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from metamerge_prefect.flows.merge_flow import merge_flow
    from metamerge_prefect.tasks import publish as publish_task_module

    use_credentials(monkeypatch, auth_s3.writer)
    real_publish = publish_task_module.publish

    def publish_with_revoked_key(*args, **kwargs):
        use_credentials(monkeypatch, UNKNOWN)
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(publish_task_module, "publish", publish_with_revoked_key)
    started = time.monotonic()
    state = merge_flow(str(_recipe(tmp_path, auth_s3)), return_state=True)
    elapsed = time.monotonic() - started
    assert state.is_failed()
    with pytest.raises(CredentialsError, match="the credentials were refused"):
        state.result()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert [r.run_count for r in runs if r.name == "publish"] == [1]
    print(f"credentials refused at publish: failed once after {elapsed:.1f}s")
