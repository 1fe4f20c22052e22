"""Issue 13 #9: two concurrent `metamerge run` of one recipe never publish a manifest that lies.

Two real CLI processes (each with its own ephemeral Prefect API) run the same recipe on the zoo
against the real S3 server. A test-only rendezvous (metamerge.faults.rendezvous) lines them up in
the publish step, after each built its manifest: the first goes on at once, the second 2 s later.
That is the interleaving that made the winner upload the loser's documents under its own digests.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from metamerge.io.s3 import s3_client
from tests.flowtools import bucket_keys, zoo_recipe

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_two_concurrent_runs_publish_only_true_manifests(zoo, s3_endpoint, bucket, tmp_path):
    recipe = zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work")
    recipe.pop("evaluation")  # the race is in publishing; scoring adds only minutes
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    procs = []
    for name in ("a", "b"):
        env = {**os.environ, "PYTHONPATH": str(REPO),
               "PREFECT_HOME": str(REPO / ".cache" / f"prefect-concurrent-{name}"),
               "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
               "METAMERGE_TEST_RENDEZVOUS_AT": "publish", "METAMERGE_TEST_RENDEZVOUS_DIR": str(tmp_path / "rendezvous"),
               "METAMERGE_TEST_RENDEZVOUS_N": "2"}
        env.pop("PREFECT_API_URL", None)
        procs.append(subprocess.Popen([sys.executable, "-c", "from metamerge_prefect.cli import main; main()", "run", str(path)],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outcomes = [proc.communicate(timeout=900) + (proc.returncode,) for proc in procs]
    codes = sorted(code for _, _, code in outcomes)
    print(f"exit codes of the two runs: {codes}")
    # both publish the same merge with the same documents (the merge's report is its first writer's), or
    # one of them fails cleanly; never may a committed manifest disagree with the stored bytes
    assert codes in ([0, 0], [0, 1]), [(code, err[-3000:]) for _, err, code in outcomes]
    for _, err, code in outcomes:
        if code == 1:
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and "already published (or being published) with different files" in errors[0], err

    client = s3_client(s3_endpoint)
    manifests = [k for k in bucket_keys(s3_endpoint, bucket) if k.endswith("/manifest.json")]
    assert len(manifests) == 1
    manifest = json.loads(client.get_object(Bucket=bucket, Key=manifests[0])["Body"].read())
    prefix = manifests[0].rsplit("/", 1)[0]
    for name, meta in manifest["files"].items():
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == meta["sha256"] and len(body) == meta["size"], name
    assert {"report.md", "merge_report.json"} <= set(manifest["files"])
    # each run staged its documents in a folder of its own, removed afterwards
    assert not [p for p in (tmp_path / "work" / "publish").iterdir()], list((tmp_path / "work" / "publish").iterdir())
