"""Publishing against a real S3-compatible server on 127.0.0.1 (moto), through boto3."""

import hashlib
import json
from urllib.parse import urlsplit

import pytest

from metamerge.errors import InputError, TransientError
from metamerge.storage import latest_manifest, publish_run, read_json, s3_client
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
