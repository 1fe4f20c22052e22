"""Publishing against a real S3-compatible server on 127.0.0.1 (moto), through boto3."""

import hashlib
import json
from urllib.parse import urlsplit

import pytest

from metamerge.errors import InputError, TransientError
from metamerge.io.manifests import latest_manifest, read_json
from metamerge.io.publish import publish_run
from metamerge.io.s3 import s3_client
from tests.faultproxy import FaultProxy


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

    with FaultProxy(s3_endpoint) as proxy:  # no faults: it only records the order of the requests
        result = publish_run(files, f"s3://{bucket}/merges", "m", "run1", endpoint_url=proxy.endpoint)
    puts = [urlsplit(path).path.removeprefix(f"/{bucket}/merges/m/") for method, path in proxy.log if method == "PUT"]
    # every file (after the run's claim), then the manifest, then latest.json pointing at it
    assert puts[0] == "run1/.publish-claim" and sorted(puts[1:4]) == sorted(f"run1/{n}" for n in files)
    assert puts[4:] == ["run1/manifest.json", "latest.json"], puts
    assert result.uploaded == 3 and result.skipped == 0
    listed = client.list_objects_v2(Bucket=bucket, Prefix="merges/m/run1/")["Contents"]
    keys = {o["Key"] for o in listed}
    assert keys == {f"merges/m/run1/{n}" for n in [*files, "manifest.json", ".publish-claim"]}
    manifest = json.loads(client.get_object(Bucket=bucket, Key="merges/m/run1/manifest.json")["Body"].read())
    for name, path in files.items():
        body = client.get_object(Bucket=bucket, Key=f"merges/m/run1/{name}")["Body"].read()
        assert manifest["files"][name] == {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "size": len(body)}
        assert hashlib.sha256(body).hexdigest() == manifest["files"][name]["sha256"]
    assert latest_manifest(f"s3://{bucket}/merges", "m", s3_endpoint)["run_id"] == "run1"


def test_republish_is_idempotent_and_conflicts_are_refused(tmp_path, s3_endpoint, bucket):
    files = _files(tmp_path, {"a.bin": b"a" * 10, "b.bin": b"b" * 10})
    target = f"s3://{bucket}/p"
    publish_run(files, target, "m", "r", endpoint_url=s3_endpoint)
    again = publish_run(files, target, "m", "r", endpoint_url=s3_endpoint)
    assert again.uploaded == 0 and again.skipped == 2
    files["a.bin"].write_bytes(b"changed")
    with pytest.raises(InputError, match="already published .* with different files"):
        publish_run(files, target, "m", "r", endpoint_url=s3_endpoint)
    # the original manifest is untouched
    assert read_json(f"s3://{bucket}/p/m/r/manifest.json", s3_endpoint)["files"]["a.bin"]["size"] == 10


def test_unreachable_endpoint_is_a_transient_error_naming_it(tmp_path):
    files = _files(tmp_path, {"a.bin": b"a"})
    with pytest.raises(TransientError, match="127.0.0.1:9"):
        publish_run(files, "s3://bucket/p", "m", "r", endpoint_url="http://127.0.0.1:9")


def test_missing_bucket_is_not_retried(tmp_path, s3_endpoint):
    files = _files(tmp_path, {"a.bin": b"a"})
    with FaultProxy(s3_endpoint) as proxy, pytest.raises(InputError, match="NoSuchBucket") as info:
        publish_run(files, "s3://no-such-bucket/p", "m", "r", endpoint_url=proxy.endpoint)
    assert proxy.log == [("HEAD", "/no-such-bucket")]  # one request: neither botocore nor we asked again
    assert "\n" not in str(info.value)


def test_local_target_has_the_same_layout(tmp_path):
    files = _files(tmp_path, {"a.bin": b"abc"})
    result = publish_run(files, str(tmp_path / "pub"), "m", "r1")
    manifest = json.loads((tmp_path / "pub" / "m" / "r1" / "manifest.json").read_text())
    assert manifest["files"]["a.bin"]["sha256"] == hashlib.sha256(b"abc").hexdigest()
    assert result.manifest_uri.endswith("m/r1/manifest.json")
    assert latest_manifest(str(tmp_path / "pub"), "m")["run_id"] == "r1"


def test_two_concurrent_publishes_of_one_run_never_mix_manifests(tmp_path, s3_endpoint, bucket):
    """Both race to commit; exactly one manifest wins and it describes exactly its own files."""
    import threading

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    runs = {
        "a": _files(tmp_path / "a", {"model.safetensors": b"A" * 3000, "config.json": b'{"v": "a"}'}),
        "b": _files(tmp_path / "b", {"model.safetensors": b"B" * 3000, "config.json": b'{"v": "b"}'}),
    }
    outcome: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def publish(which):
        barrier.wait()
        try:
            outcome[which] = publish_run(runs[which], f"s3://{bucket}/p", "m", "same-run", endpoint_url=s3_endpoint)
        except Exception as exc:  # noqa: BLE001 - the loser's error is what we check
            outcome[which] = exc

    threads = [threading.Thread(target=publish, args=(w,)) for w in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    manifest = read_json(f"s3://{bucket}/p/m/same-run/manifest.json", s3_endpoint)
    winners = [w for w, r in outcome.items() if not isinstance(r, Exception)]
    losers = [r for r in outcome.values() if isinstance(r, Exception)]
    assert len(winners) >= 1
    expected = {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in runs[winners[0]].items()}
    assert {n: m["sha256"] for n, m in manifest["files"].items()} == expected
    if len(winners) == 2:  # only possible if both wrote identical files
        assert expected == {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in runs[winners[1]].items()}
    for exc in losers:
        assert isinstance(exc, InputError) and "with different files" in str(exc)
    # and the objects themselves are the winner's, byte for byte
    client = s3_client(s3_endpoint)
    for name, path in runs[winners[0]].items():
        body = client.get_object(Bucket=bucket, Key=f"p/m/same-run/{name}")["Body"].read()
        assert body == path.read_bytes()


def _assert_objects_match_manifest(client, bucket, prefix):
    """The invariant of issue 13 #9: a committed manifest never lies about an object's bytes."""
    try:
        manifest = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read())
    except client.exceptions.NoSuchKey:
        return None
    for name, meta in manifest["files"].items():
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == meta["sha256"] and len(body) == meta["size"], name
    return manifest


def test_an_upload_verifies_the_bytes_it_sent(tmp_path, s3_endpoint, bucket):
    """Issue 13 #9: the file changed after it was hashed: the object is removed, not left lying."""
    from metamerge.io.s3 import upload_unless_present

    path = tmp_path / "report.md"
    path.write_bytes(b"A" * 100)
    meta = {"sha256": hashlib.sha256(b"A" * 100).hexdigest(), "size": 100}
    path.write_bytes(b"B" * 100)  # rewritten between hashing and upload (same size, as in the issue)
    client = s3_client(s3_endpoint)
    with pytest.raises(TransientError, match="changed while it was uploaded"):
        upload_unless_present(client, bucket, "p/report.md", path, meta)
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_multipart_uploads_verify_their_bytes_too(tmp_path, s3_endpoint, bucket, monkeypatch):
    from metamerge.io import s3

    monkeypatch.setattr(s3, "MULTIPART_BYTES", 5 * 1024 * 1024)
    monkeypatch.setattr(s3, "PART_BYTES", 5 * 1024 * 1024)
    data = bytes(range(256)) * (11 * 4096)  # 11 MB: three parts
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    meta = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    client = s3_client(s3_endpoint)
    assert s3.upload_unless_present(client, bucket, "p/model.safetensors", path, meta)
    assert client.get_object(Bucket=bucket, Key="p/model.safetensors")["Body"].read() == data
    path.write_bytes(data[::-1])
    with pytest.raises(TransientError, match="changed while it was uploaded"):
        s3.upload_unless_present(client, bucket, "p/other.safetensors", path, meta)
    assert "p/other.safetensors" not in {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}


def test_a_document_rewritten_during_a_publish_never_gets_a_lying_manifest(tmp_path, s3_endpoint, bucket, monkeypatch):
    """What a concurrent run did to the shared staging folder (issue 13 #9), replayed deterministically."""
    from metamerge.io import publish

    files = _files(tmp_path, {"model.safetensors": b"m" * 1000, "report.md": b"run A: 1.23 s"})
    real_build = publish.build_manifest

    def build_then_other_run_rewrites(*args, **kwargs):
        manifest = real_build(*args, **kwargs)
        files["report.md"].write_bytes(b"run B: 4.56 s")  # same size, other bytes
        return manifest

    monkeypatch.setattr(publish, "build_manifest", build_then_other_run_rewrites)
    client = s3_client(s3_endpoint)
    with pytest.raises(TransientError, match="report.md changed while it was uploaded"):
        publish_run(files, f"s3://{bucket}/p", "m", "r", endpoint_url=s3_endpoint)
    assert _assert_objects_match_manifest(client, bucket, "p/m/r") is None  # nothing committed
