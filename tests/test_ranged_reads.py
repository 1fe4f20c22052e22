"""Ranged reads of safetensors in S3, and shards staged in place, against the real (moto) S3 server.

Every number is checked against an independent count: the bytes a shard task fetched against the
byte sizes of its tensors in each input's header, the merged bytes against the local engine's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metamerge.engine import shards as engine_shards
from metamerge.engine.checkpoint import CheckpointReader
from metamerge.engine.coefficients import solve_constant
from metamerge.engine.remote import RemoteCheckpointReader
from metamerge.engine.writer import group_into_shards
from metamerge.errors import InputError, TransientError
from metamerge.io import ranged
from metamerge.io.ranged import FETCHED, coalesce
from metamerge.io.s3 import s3_client
from metamerge.io.shared import FOLDER_MANIFEST, SharedStore
from metamerge.io.staged import abort_stale_uploads, complete_staged, stage_upload
from metamerge.methods.registry import plan_for
from metamerge.recipe import Method
from metamerge.refs.s3 import list_s3_model
from tests.helpers import random_family


def _upload(folder: Path, endpoint: str, bucket: str, prefix: str) -> str:
    client = s3_client(endpoint)
    for f in sorted(folder.iterdir()):
        client.upload_file(str(f), bucket, f"{prefix}/{f.name}")
    return f"s3://{bucket}/{prefix}"


def _remote(folder: Path, endpoint: str, bucket: str, prefix: str):
    return list_s3_model(_upload(folder, endpoint, bucket, prefix), endpoint)[0]


def test_coalesce_merges_touching_reads_and_caps_each_request():
    reads = [("a", 0, 10), ("a", 10, 25), ("a", 30, 40), ("b", 40, 50), ("b", 50, 130), ("a", 40, 41)]
    assert coalesce(reads, max_request=50) == [
        ("a", 0, 25),  # touching: one request
        ("a", 30, 40),  # a gap: a new request (gap bytes are never fetched)
        ("b", 40, 90), ("b", 90, 130),  # touching, then split at the cap
        ("a", 40, 41),  # another file in between: not merged with a's earlier request
    ]
    assert coalesce([("a", 0, 0), ("a", 5, 5)]) == []


@pytest.mark.parametrize("header_guess", [ranged.HEADER_GUESS, 16])
def test_remote_reader_reads_what_the_local_reader_reads(tmp_path, s3_endpoint, bucket, monkeypatch, header_guess):
    monkeypatch.setattr(ranged, "HEADER_GUESS", header_guess)  # 16: every header takes a second GET
    base_dir, *_ = random_family(tmp_path, n_finetunes=1, hidden=64)
    sharded = tmp_path / "sharded"
    from tests.helpers import write_checkpoint

    local = CheckpointReader(base_dir)
    write_checkpoint(sharded, {n: local.read(n) for n in local.names}, shards=3)
    reader = RemoteCheckpointReader(_remote(sharded, s3_endpoint, bucket, "m"))
    local = CheckpointReader(sharded)
    assert reader.names == local.names and all(reader.info(n) == local.info(n) for n in local.names)
    before = FETCHED.bytes
    pieces = [(n, None) for n in local.names] + [("model.layers.0.mlp.up_proj.weight", (3, 11))]
    reader.expect(pieces)
    for name, rows in pieces:
        assert torch.equal(reader.read(name, rows=rows), local.read(name, rows=rows)), name
    wanted = sum(local.byte_range(n, r)[2] - local.byte_range(n, r)[1] for n, r in pieces)
    assert FETCHED.bytes - before == wanted  # the planned bytes, each once
    reader.close()


def test_a_file_replaced_during_the_run_is_a_clear_error(tmp_path, s3_endpoint, bucket):
    base_dir, ft_dirs, *_ = random_family(tmp_path, n_finetunes=2)
    model = _remote(base_dir, s3_endpoint, bucket, "base")
    reader = RemoteCheckpointReader(model)
    s3_client(s3_endpoint).upload_file(str(ft_dirs[1] / "model.safetensors"), bucket, "base/model.safetensors")
    with pytest.raises(InputError, match=r"base/model.safetensors changed during this run"):
        reader.read("lm_head.weight")


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_shard_task_fetches_only_its_tensors_and_writes_the_local_bytes(tmp_path, s3_endpoint, bucket, method, dtype):
    base_dir, ft_dirs, *_ = random_family(tmp_path, n_finetunes=3, dtype=dtype, hidden=300)
    base = _remote(base_dir, s3_endpoint, bucket, "base")
    fts = [(f"ft{i}", _remote(d, s3_endpoint, bucket, f"ft{i}")) for i, d in enumerate(ft_dirs)]
    coefficients = solve_constant(["ft0", "ft1", "ft2"], 0.3, method)
    plan = plan_for(Method(name=method))
    local_reader = CheckpointReader(base_dir)
    shard_mb = 0.25 * dtype.itemsize / 4
    shards = group_into_shards([local_reader.info(n) for n in local_reader.names], shard_mb * 1024 * 1024)
    assert len(shards) >= 3
    for index in range(len(shards)):
        mine = engine_shards.merge_shard_file(base_dir, [(label, d) for (label, _), d in zip(fts, ft_dirs, strict=True)],
                                              coefficients, plan, tmp_path / "local", index, shard_size_mb=shard_mb)
        before = FETCHED.bytes
        theirs = engine_shards.merge_shard_file(base, fts, coefficients, plan, tmp_path / "remote", index,
                                                shard_size_mb=shard_mb)
        fetched = FETCHED.bytes - before
        assert Path(theirs.path).read_bytes() == Path(mine.path).read_bytes()
        # independent count: each input's bytes of this shard's tensors (fine-tunes: float ones) + its header GET
        tensors = shards[index]
        data = sum(i.nbytes for i in tensors) + 3 * sum(i.nbytes for i in tensors if i.is_float)
        headers = sum(min(ranged.HEADER_GUESS, f.stat().st_size) if f.suffix == ".safetensors" else f.stat().st_size
                      for folder in (base_dir, *ft_dirs) for f in folder.iterdir() if f.name != "config.json")
        assert fetched == data + headers, (index, fetched, data, headers)
    whole = 4 * (base_dir / "model.safetensors").stat().st_size
    assert data + headers < whole / 2  # a shard costs a fraction of the inputs, not all of them


def test_staged_uploads_are_invisible_until_completed(tmp_path, s3_endpoint, bucket):
    client = s3_client(s3_endpoint)
    file = tmp_path / "shard.safetensors"
    file.write_bytes(b"x" * 1000)
    from metamerge.io.digests import sha256_file

    killed = client.create_multipart_upload(Bucket=bucket, Key="m/shard.safetensors")  # an attempt that died
    client.upload_part(Bucket=bucket, Key="m/shard.safetensors", UploadId=killed["UploadId"], PartNumber=1, Body=b"y")
    assert abort_stale_uploads(client, bucket, "m/shard.safetensors") == 1
    staged = stage_upload(client, bucket, "m/shard.safetensors", file, sha256_file(file))
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)  # nothing visible
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["UploadId"] for u in uploads] == [staged.upload_id]  # the dead attempt's upload is gone
    complete_staged(client, staged)
    complete_staged(client, staged)  # a retried finalize: already complete, still the same bytes
    assert client.get_object(Bucket=bucket, Key="m/shard.safetensors")["Body"].read() == b"x" * 1000
    wrong = staged.__class__(**{**staged.to_dict(), "sha256": "0" * 64})
    with pytest.raises(InputError, match="not the shard that was staged"):
        complete_staged(client, wrong)


def test_a_shared_folder_exists_only_once_its_manifest_is_written(tmp_path, s3_endpoint, bucket):
    workdir = tmp_path / "wd"
    folder = workdir / "merged" / "m"
    folder.mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"a" * 10)
    (folder / "b.json").write_text("{}")
    store = SharedStore(str(workdir), f"s3://{bucket}/shared", s3_endpoint)
    store.put(folder / "a.bin")  # uploaded, but the folder is not committed
    elsewhere = SharedStore(str(tmp_path / "other"), f"s3://{bucket}/shared", s3_endpoint)
    moved = tmp_path / "other" / "merged" / "m"
    with pytest.raises(InputError, match="neither on this machine nor committed"):
        elsewhere.ensure_dir(moved)
    store.put_dir(folder)
    client = s3_client(s3_endpoint)
    client.put_object(Bucket=bucket, Key="shared/merged/m/stray.bin", Body=b"not listed")
    assert json.loads(client.get_object(Bucket=bucket, Key=f"shared/merged/m/{FOLDER_MANIFEST}")["Body"].read())
    elsewhere.ensure_dir(moved)
    assert sorted(p.name for p in moved.iterdir()) == ["a.bin", "b.json"]  # only what the manifest lists


def test_a_merge_in_shared_storage_is_published_by_server_side_copy(tmp_path, s3_endpoint, bucket):
    from metamerge.io.digests import sha256_file
    from metamerge.io.manifests import latest_manifest
    from metamerge.io.publish import StoredObject, publish_run

    client = s3_client(s3_endpoint)
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(bytes(range(256)) * 100)
    digest = sha256_file(shard)
    client.upload_file(str(shard), bucket, "shared/merged/m/model.safetensors", ExtraArgs={"Metadata": {"sha256": digest}})
    stored = StoredObject(bucket, "shared/merged/m/model.safetensors", shard.stat().st_size, digest)
    (tmp_path / "config.json").write_text("{}")
    result = publish_run({"model.safetensors": stored, "config.json": tmp_path / "config.json"},
                         f"s3://{bucket}/merges", "m", "run-1", s3_endpoint)
    key = result.run_uri.removeprefix(f"s3://{bucket}/") + "/model.safetensors"
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == shard.read_bytes()
    assert client.head_object(Bucket=bucket, Key=key)["Metadata"]["sha256"] == digest
    assert latest_manifest(f"s3://{bucket}/merges", "m", s3_endpoint)["files"]["model.safetensors"]["sha256"] == digest
    # the source changed after it was recorded: refused, never a manifest over other bytes
    client.put_object(Bucket=bucket, Key=stored.key, Body=b"other", Metadata={"sha256": digest})
    with pytest.raises(TransientError, match="no longer the file recorded"):
        publish_run({"model.safetensors": stored}, f"s3://{bucket}/merges", "m", "run-2", s3_endpoint)
    with pytest.raises(InputError, match="only to an S3 target"):
        publish_run({"model.safetensors": stored}, str(tmp_path / "published"), "m", "run-3")
    assert not (tmp_path / "published").exists()
