"""s3://bucket/prefix: the print comes from remote metadata, so an unchanged model is not re-downloaded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from metamerge.errors import InputError, RefError, TransientError
from metamerge.io.digests import sha256_file
from metamerge.io.s3 import S3_FAILURES
from metamerge.refs.resolved import CHECKPOINT_SUFFIXES, ResolvedModel


def resolve_s3(ref: str, cache_dir: Path, endpoint_url: str | None = None) -> ResolvedModel:
    """s3://bucket/prefix: the print comes from remote metadata, so an unchanged model is not re-downloaded.

    When the prefix holds a `manifest.json` (a run published by metamerge) its file digests are
    the print and every download is verified against them; otherwise ETags and sizes are.
    """
    from metamerge.io.s3 import s3_client, s3_error

    bucket, _, prefix = ref.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    client = s3_client(endpoint_url)
    try:
        objects = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
            objects += [(o["Key"], o["ETag"].strip('"'), o["Size"]) for o in page.get("Contents", [])]
        files = {key[len(prefix) + 1 if prefix else 0 :]: (key, etag, size) for key, etag, size in objects}
        files = {rel: v for rel, v in files.items() if rel and "/" not in rel}
        if not any(rel.endswith(CHECKPOINT_SUFFIXES) for rel in files):
            raise RefError(f"model ref {ref!r}: no .safetensors objects under that prefix")
        manifest = None
        if "manifest.json" in files:
            manifest = json.loads(client.get_object(Bucket=bucket, Key=files["manifest.json"][0])["Body"].read())
            listed = manifest.get("files", {})
            files = {rel: v for rel, v in files.items() if rel in listed}
            identity = json.dumps(listed, sort_keys=True)
        else:
            identity = json.dumps(sorted((rel, etag, size) for rel, (_, etag, size) in files.items()))
        fingerprint = "s3-" + hashlib.sha256(identity.encode()).hexdigest()
        local = cache_dir / "remote" / fingerprint[:24]
        if not (local / ".complete").exists():
            _download(client, bucket, files, local, manifest)
    except S3_FAILURES as exc:
        err = s3_error(client, f"download of {ref}", exc, bucket)
        raise (RefError(str(err)) if isinstance(err, InputError) else err) from exc
    return ResolvedModel(ref=ref, path=local, fingerprint=fingerprint)


def _download(client, bucket: str, files: dict, local: Path, manifest: dict | None) -> None:
    """Into a temporary folder, verified, then renamed: a crash never leaves a half model."""
    tmp = local.parent / f".{local.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for rel, (key, _etag, size) in files.items():
            client.download_file(bucket, key, str(tmp / rel))
            if (tmp / rel).stat().st_size != size:
                raise TransientError(f"s3://{bucket}/{key}: size changed during download")
            if manifest is not None and sha256_file(tmp / rel) != manifest["files"][rel]["sha256"]:
                raise TransientError(f"s3://{bucket}/{key}: sha256 does not match its manifest")
        (tmp / ".complete").write_text("ok")
        shutil.rmtree(local, ignore_errors=True)
        tmp.rename(local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(ref: str, cache_dir: Path | None = None, endpoint_url: str | None = None) -> ResolvedModel:
    """The scheme table's entry: downloads go under `<cache_dir>/remote/`."""
    return resolve_s3(ref, Path(cache_dir or ".metamerge"), endpoint_url)
