"""s3:// refs against the real S3 server, hf:// refs against a locally built Hugging Face cache."""

import shutil

import pytest

from metamerge import refs
from metamerge.errors import RefError
from metamerge.io.s3 import s3_client
from metamerge.refs import s3 as s3_refs
from tests.helpers import random_family


def _upload(folder, endpoint, bucket, prefix):
    client = s3_client(endpoint)
    for f in folder.iterdir():
        client.upload_file(str(f), bucket, f"{prefix}/{f.name}")


def test_s3_ref_downloads_once_and_follows_changes(tmp_path, s3_endpoint, bucket, monkeypatch):
    base_dir, ft_dirs, *_ = random_family(tmp_path, n_finetunes=2)
    _upload(ft_dirs[1], s3_endpoint, bucket, "registry/ft1")
    downloads = []
    real = s3_refs._download
    monkeypatch.setattr(s3_refs, "_download", lambda *a: downloads.append(a[3]) or real(*a))
    ref = f"s3://{bucket}/registry/ft1"
    first = refs.resolve_ref(ref, tmp_path / "cache", s3_endpoint)
    assert (first.path / "model.safetensors").read_bytes() == (ft_dirs[1] / "model.safetensors").read_bytes()
    again = refs.resolve_ref(ref, tmp_path / "cache", s3_endpoint)
    assert again.fingerprint == first.fingerprint and len(downloads) == 1  # unchanged: not re-downloaded
    _, new_dirs, *_ = random_family(tmp_path / "v2", n_finetunes=2, seed=9)
    _upload(new_dirs[1], s3_endpoint, bucket, "registry/ft1")  # a new version under the same name
    changed = refs.resolve_ref(ref, tmp_path / "cache", s3_endpoint)
    assert changed.fingerprint != first.fingerprint and len(downloads) == 2
    assert (changed.path / "model.safetensors").read_bytes() == (new_dirs[1] / "model.safetensors").read_bytes()


def test_s3_ref_errors(tmp_path, s3_endpoint, bucket):
    with pytest.raises(RefError, match="no .safetensors objects"):
        refs.resolve_ref(f"s3://{bucket}/nothing-here", tmp_path, s3_endpoint)
    with pytest.raises(RefError, match="NoSuchBucket"):
        refs.resolve_ref("s3://no-such-bucket-x/m", tmp_path, s3_endpoint)


def _hf_cache(root, repo_id, commit, source):
    """The on-disk layout huggingface_hub reads in offline mode: refs/main -> snapshots/<commit>/."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)


def test_hf_ref_offline_from_local_cache(tmp_path, monkeypatch):
    base_dir, *_ = random_family(tmp_path, n_finetunes=1)
    cache = tmp_path / "hf"
    commit = "0123456789abcdef0123456789abcdef01234567"
    _hf_cache(cache, "acme/base-model", commit, base_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    resolved = refs.resolve_ref("hf://acme/base-model@main", tmp_path / "w")
    assert resolved.path.name == commit and (resolved.path / "model.safetensors").exists()
    assert resolved.fingerprint.endswith(commit)
    with pytest.raises(RefError, match="not in the local Hugging Face cache and offline mode is on"):
        refs.resolve_ref("hf://acme/missing-model", tmp_path / "w")
    with pytest.raises(RefError, match="expected hf://org/name"):
        refs.resolve_ref("hf://just-a-name", tmp_path / "w")


def test_s3_ref_to_a_published_run_is_fingerprinted_by_its_manifest(tmp_path, s3_endpoint, bucket, monkeypatch):
    """README: an s3:// ref's fingerprint comes from its `manifest.json` when it has one (a published run)."""
    from metamerge.errors import TransientError
    from metamerge.io.publish import publish_run

    _, ft_dirs, *_ = random_family(tmp_path / "models", n_finetunes=1)
    files = {f.name: f for f in ft_dirs[0].iterdir()}
    published = publish_run(files, f"s3://{bucket}/merges", "m", "r1", endpoint_url=s3_endpoint)
    downloads = []
    real = s3_refs._download
    monkeypatch.setattr(s3_refs, "_download", lambda *a: downloads.append(a[3]) or real(*a))
    first = refs.resolve_ref(published.run_uri, tmp_path / "cache", s3_endpoint)
    # exactly the files the manifest lists, byte for byte (not the manifest, the claim or latest.json)
    assert {p.name for p in first.path.iterdir() if not p.name.startswith(".")} == set(files)
    assert all((first.path / name).read_bytes() == path.read_bytes() for name, path in files.items())

    # an object the manifest does not list changes neither the print nor what is downloaded
    prefix = published.run_uri.removeprefix(f"s3://{bucket}/")
    s3_client(s3_endpoint).put_object(Bucket=bucket, Key=f"{prefix}/notes.txt", Body=b"added after publishing")
    again = refs.resolve_ref(published.run_uri, tmp_path / "cache", s3_endpoint)
    assert again.fingerprint == first.fingerprint and len(downloads) == 1
    # the same files published under another run id are the same model: same print, no second download
    copy = publish_run(files, f"s3://{bucket}/merges", "m", "r2", endpoint_url=s3_endpoint)
    assert refs.resolve_ref(copy.run_uri, tmp_path / "cache", s3_endpoint).fingerprint == first.fingerprint
    assert len(downloads) == 1

    # the manifest's digests are checked: an object changed after publishing (same size) is refused
    shard = sorted(name for name in files if name.endswith(".safetensors"))[0]
    body = files[shard].read_bytes()
    s3_client(s3_endpoint).put_object(Bucket=bucket, Key=f"{prefix}/{shard}", Body=body[:-1] + bytes([body[-1] ^ 1]))
    with pytest.raises(TransientError, match=f"{shard}: sha256 does not match its manifest"):
        refs.resolve_ref(published.run_uri, tmp_path / "fresh-cache", s3_endpoint)
    assert not list((tmp_path / "fresh-cache" / "remote").glob("s3-*"))
