"""Issue 13 #2: a cached stage is trusted only while its external output still exists.

Real zoo, real Prefect API, real S3 server: publish, then take away what the cache claims (every
published object; only latest.json; one file of the merged folder) and run again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from metamerge.io.s3 import s3_client
from metamerge.pipeline.merge import merge_intact
from tests.flowtools import bucket_keys, task_states, zoo_recipe

pytestmark = pytest.mark.slow


def _published_objects_match(endpoint: str, bucket: str, manifest_uri: str) -> dict:
    client = s3_client(endpoint)
    key = manifest_uri.removeprefix(f"s3://{bucket}/")
    manifest = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    prefix = key.rsplit("/", 1)[0]
    for name, meta in manifest["files"].items():
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == meta["sha256"], name
    return manifest


def _run(recipe):
    from metamerge_prefect.flows.merge_flow import merge_flow

    state = merge_flow(recipe, return_state=True)
    assert state.is_completed(), state.message
    return state.result(), task_states(state.state_details.flow_run_id)


def test_cached_publish_and_merge_are_redone_when_their_outputs_are_gone(zoo, s3_endpoint, bucket, isolated_results,
                                                                         tmp_path):
    recipe = zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work")
    recipe.pop("evaluation")
    first, _ = _run(recipe)
    manifest_uri = first["published"]["manifest_uri"]
    client = s3_client(s3_endpoint)

    # every object under the published prefix is deleted: the re-run publishes again
    for key in bucket_keys(s3_endpoint, bucket):
        client.delete_object(Bucket=bucket, Key=key)
    again, states = _run(recipe)
    assert states["publish"][-1] == "Completed", states
    assert again["published"]["manifest_uri"] == manifest_uri
    _published_objects_match(s3_endpoint, bucket, manifest_uri)
    latest = json.loads(client.get_object(Bucket=bucket, Key="merges/zoo-metagpt/latest.json")["Body"].read())
    assert manifest_uri.endswith(latest["manifest"])

    # only latest.json is gone: published again, latest.json points at the run again
    client.delete_object(Bucket=bucket, Key="merges/zoo-metagpt/latest.json")
    _, states = _run(recipe)
    assert states["publish"][-1] == "Completed", states
    latest = json.loads(client.get_object(Bucket=bucket, Key="merges/zoo-metagpt/latest.json")["Body"].read())
    assert manifest_uri.endswith(latest["manifest"])

    # nothing is missing: every stage is Cached, as before
    _, states = _run(recipe)
    assert {s for names in states.values() for s in names} == {"Cached"}, states

    # a file of the merged folder is gone: the merge runs again and restores it; the publish stays cached
    merged = Path(first["merged_path"])
    victim = merged / "tokenizer.json"
    victim.unlink()
    assert not merge_intact(merged)
    third, states = _run(recipe)
    assert states["merge"] == ["Completed"], states
    assert victim.exists() and third["merged_fingerprint"] == first["merged_fingerprint"]
    assert states["publish"] == ["Cached"]
