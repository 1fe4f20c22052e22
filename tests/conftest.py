"""Shared fixtures: the tiny zoo, a real S3 server on loopback, a real Prefect API."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# before anything imports prefect: it makes its home without parents, and a fresh clone has no .cache
os.environ.setdefault("PREFECT_HOME", str(REPO / ".cache" / "prefect-test-home"))
Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)

from metamerge_prefect.cli import PREFECT_DEFAULTS  # noqa: E402

for key, value in {
    **PREFECT_DEFAULTS,  # what the CLI sets for its embedded default
    "AWS_ACCESS_KEY_ID": "metamerge-test",
    "AWS_SECRET_ACCESS_KEY": "metamerge-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    # task results shared by the test process and the flows it starts in subprocesses
    "PREFECT_LOCAL_STORAGE_PATH": str(REPO / ".cache" / "prefect-test-results"),
    # fast retries in tests; production waits 2, 4, 8, 16 s
    "METAMERGE_RETRY_BACKOFF": "0.2",
    "METAMERGE_NETWORK_RETRIES": "2",
}.items():
    os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def zoo():
    from metamerge.demo.zoo import build_zoo

    return build_zoo(REPO / ".cache" / "zoo")


@pytest.fixture(scope="session")
def s3_endpoint():
    from metamerge.demo.s3server import local_s3_server

    with local_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def bucket(s3_endpoint, request):
    """A fresh bucket per test, so tests never see each other's objects."""
    import uuid

    from metamerge.io.s3 import s3_client

    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def isolated_results(tmp_path, prefect_api):
    """A result store of this test's own, so cache hits come only from this test's runs."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    path = tmp_path / "prefect-results"
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: path}):
        yield path


@pytest.fixture
def restore_environment():
    """CLI commands set Prefect defaults in os.environ; keep them out of later tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
