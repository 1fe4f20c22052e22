"""Workdir files shared through S3: what a Dask worker on another machine relies on."""

from __future__ import annotations

from pathlib import Path

import pytest

from metamerge.errors import InputError, TransientError
from metamerge.io.s3 import s3_client
from metamerge.io.shared import SharedStore


def test_put_then_fetch_on_a_machine_without_the_files(tmp_path, s3_endpoint, bucket):
    here, there = tmp_path / "machine-a" / "wd", tmp_path / "machine-b" / "wd"
    (here / "stats").mkdir(parents=True)
    (here / "merged" / "m").mkdir(parents=True)
    (here / "stats" / "s.json").write_text('{"x": 1}')
    (here / "merged" / "m" / "model.safetensors").write_bytes(b"\x00\x01" * 1000)
    (here / "merged" / "m" / "config.json").write_text("{}")
    uri = f"s3://{bucket}/shared"
    writer = SharedStore(str(here), uri, s3_endpoint)
    writer.put(here / "stats" / "s.json")
    writer.put_dir(here / "merged" / "m")
    keys = {o["Key"] for o in s3_client(s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {"shared/stats/s.json", "shared/merged/m/model.safetensors", "shared/merged/m/config.json",
                    "shared/merged/m/.metamerge-shared.json"}  # the folder's manifest, written last

    # the same workdir path on another machine (here: another folder) starts empty
    reader = SharedStore(str(there), uri, s3_endpoint)
    assert reader.exists(there / "stats" / "s.json") and not reader.exists(there / "stats" / "other.json")
    assert reader.ensure(there / "stats" / "s.json").read_text() == '{"x": 1}'
    folder = reader.ensure_dir(there / "merged" / "m")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {
        p.name: p.read_bytes() for p in (here / "merged" / "m").iterdir()}
    assert not [p for p in (there / "merged").iterdir() if p.name.startswith(".")]

    reader.remove(there / "stats" / "s.json")
    assert not reader.exists(there / "stats" / "s.json")
    with pytest.raises(InputError, match="neither on this machine nor committed to shared storage"):
        reader.ensure_dir(there / "merged" / "gone")


def test_a_corrupted_object_is_refused(tmp_path, s3_endpoint, bucket):
    wd = tmp_path / "wd"
    (wd / "x").mkdir(parents=True)
    (wd / "x" / "f.bin").write_bytes(b"good bytes")
    store = SharedStore(str(wd), f"s3://{bucket}/p", s3_endpoint)
    store.put(wd / "x" / "f.bin")
    head = s3_client(s3_endpoint).head_object(Bucket=bucket, Key="p/x/f.bin")
    s3_client(s3_endpoint).put_object(Bucket=bucket, Key="p/x/f.bin", Body=b"evil bytes", Metadata=head["Metadata"])
    other = SharedStore(str(tmp_path / "other"), f"s3://{bucket}/p", s3_endpoint)
    with pytest.raises(TransientError, match="does not match its sha256"):
        other.ensure(tmp_path / "other" / "x" / "f.bin")
    assert not (tmp_path / "other" / "x" / "f.bin").exists()


def test_without_a_store_a_missing_file_says_what_to_configure(tmp_path):
    store = SharedStore(str(tmp_path))
    with pytest.raises(InputError, match="runner.storage"):
        store.ensure(tmp_path / "stats" / "s.json")
    with pytest.raises(InputError, match="outside the workdir"):
        SharedStore(str(tmp_path / "wd"), "s3://bkt/p").put(tmp_path / "elsewhere.json")


def test_sharded_stages_need_only_s3_between_machines(tmp_path, s3_endpoint, bucket):
    """Shard files are removed from the local disk before finalize, as on another machine."""
    import shutil

    from metamerge.engine.coefficients import solve_constant
    from metamerge.pipeline import merge as merge_stage
    from metamerge.pipeline.inputs import resolve
    from metamerge.pipeline.keys import merge_report_path, merged_dir, shard_dir
    from metamerge.pipeline.merge import merge_available
    from metamerge.pipeline.shards import finalize_sharded_merge, merge_output_shard, plan_merge_shards
    from metamerge.recipe import parse_recipe
    from tests.helpers import random_family

    base_dir, ft_dirs, _, _ = random_family(tmp_path / "in", hidden=600)  # ~4.5 MB: several 1 MB shards
    def recipe(workdir, runner):
        return parse_recipe({"name": "r", "base": str(base_dir), "method": "average", "workdir": str(workdir),
                             "finetunes": [{"ref": str(d), "name": f"ft{i}"} for i, d in enumerate(ft_dirs)],
                             "merge": {"device": "cpu", "shard_size_mb": 1}, "endpoint_url": s3_endpoint,
                             "runner": runner})
    local = recipe(tmp_path / "local", "local")
    dask = recipe(tmp_path / "wd", {"kind": "dask", "storage": f"s3://{bucket}/shared"})
    base = resolve(str(base_dir), tmp_path / "wd")
    fts = [resolve(str(d), tmp_path / "wd") for d in ft_dirs]
    coefficients = solve_constant([f"ft{i}" for i in range(len(ft_dirs))], 1 / len(ft_dirs), "average")
    want = merge_stage.merge(local, base, fts, coefficients)

    names = plan_merge_shards(dask, base)
    assert len(names) >= 3 and len(list(Path(want.path).glob("*.safetensors"))) == len(names), names
    shards = [merge_output_shard(dask, base, fts, coefficients, i) for i in range(len(names))]
    shutil.rmtree(shard_dir(dask, base, fts, coefficients))
    assert all(not Path(s["path"]).exists() for s in shards)  # uploaded in place, the local copy gone
    got = finalize_sharded_merge(dask, base, fts, coefficients, shards)
    assert got.fingerprint == want.fingerprint
    assert not shard_dir(dask, base, fts, coefficients).exists()
    # assembled in S3, not here: finalize downloaded no shard
    out = merged_dir(dask, base, fts, coefficients)
    assert not out.exists()
    elsewhere = SharedStore(str(tmp_path / "b"), f"s3://{bucket}/shared", s3_endpoint)
    fetched = elsewhere.ensure_dir(tmp_path / "b" / "merged" / out.name)
    assert {p.name: p.read_bytes() for p in fetched.iterdir() if not p.name.startswith(".")} == {
        p.name: p.read_bytes() for p in Path(want.path).iterdir() if not p.name.startswith(".")}
    # a finalize re-run (cached shard results, uploads already complete) finds the committed folder
    merge_report_path(out).unlink()
    assert merge_available(dask, base, fts, coefficients)
    again = finalize_sharded_merge(dask, base, fts, coefficients, shards)
    assert again.fingerprint == want.fingerprint and again.report["shards"] == got.report["shards"]
    assert not out.exists()
