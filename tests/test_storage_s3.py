"""Publishing against a real S3-compatible server on 127.0.0.1 (moto), through boto3."""

import hashlib
import json

import pytest

from metamerge.errors import InputError, TransientError
from metamerge.storage import latest_manifest, publish_run, read_json, s3_client


def _files(tmp_path, contents):
    out = {}
    for name, data in contents.items():
        p = tmp_path / name
        p.write_bytes(data)
        out[name] = p
    return out


def test_publish_uploads_everything_then_manifest_last(tmp_path, s3_endpoint, bucket):
    files = _files(tmp_path, {"model.safetensors": b"x" * 1000, "config.json": b"{}", "scores.json": b"[1]"})
    client = s3_client(s3_endpoint)

    result = publish_run(files, f"s3://{bucket}/merges", "m", "run1", endpoint_url=s3_endpoint)
    assert result.uploaded == 3 and result.skipped == 0
    listed = client.list_objects_v2(Bucket=bucket, Prefix="merges/m/run1/")["Contents"]
    keys = {o["Key"] for o in listed}
    assert keys == {f"merges/m/run1/{n}" for n in [*files, "manifest.json"]}
    manifest = json.loads(client.get_object(Bucket=bucket, Key="merges/m/run1/manifest.json")["Body"].read())
    for name, path in files.items():
        body = client.get_object(Bucket=bucket, Key=f"merges/m/run1/{name}")["Body"].read()
        assert manifest["files"][name] == {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "size": len(body)}
        assert hashlib.sha256(body).hexdigest() == manifest["files"][name]["sha256"]
    # manifest written after every file: its LastModified is not older than any file's
    times = {o["Key"].rsplit("/", 1)[1]: o["LastModified"] for o in listed}
    assert all(times["manifest.json"] >= t for t in times.values())
    assert latest_manifest(f"s3://{bucket}/merges", "m", s3_endpoint)["run_id"] == "run1"


def test_republish_is_idempotent_and_conflicts_are_refused(tmp_path, s3_endpoint, bucket):
    files = _files(tmp_path, {"a.bin": b"a" * 10, "b.bin": b"b" * 10})
    target = f"s3://{bucket}/p"
    publish_run(files, target, "m", "r", endpoint_url=s3_endpoint)
    again = publish_run(files, target, "m", "r", endpoint_url=s3_endpoint)
    assert again.uploaded == 0 and again.skipped == 2
    files["a.bin"].write_bytes(b"changed")
    with pytest.raises(InputError, match="already exists with different files"):
        publish_run(files, target, "m", "r", endpoint_url=s3_endpoint)
    # the original manifest is untouched
    assert read_json(f"s3://{bucket}/p/m/r/manifest.json", s3_endpoint)["files"]["a.bin"]["size"] == 10


def test_unreachable_endpoint_is_a_transient_error_naming_it(tmp_path):
    files = _files(tmp_path, {"a.bin": b"a"})
    with pytest.raises(TransientError, match="127.0.0.1:9"):
        publish_run(files, "s3://bucket/p", "m", "r", endpoint_url="http://127.0.0.1:9")


def test_missing_bucket_is_not_retried(tmp_path, s3_endpoint):
    files = _files(tmp_path, {"a.bin": b"a"})
    with pytest.raises(InputError, match="NoSuchBucket"):
        publish_run(files, "s3://no-such-bucket/p", "m", "r", endpoint_url=s3_endpoint)


def test_local_target_has_the_same_layout(tmp_path):
    files = _files(tmp_path, {"a.bin": b"abc"})
    result = publish_run(files, str(tmp_path / "pub"), "m", "r1")
    manifest = json.loads((tmp_path / "pub" / "m" / "r1" / "manifest.json").read_text())
    assert manifest["files"]["a.bin"]["sha256"] == hashlib.sha256(b"abc").hexdigest()
    assert result.manifest_uri.endswith("m/r1/manifest.json")
    assert latest_manifest(str(tmp_path / "pub"), "m")["run_id"] == "r1"
