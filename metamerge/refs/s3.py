"""s3://bucket/prefix: the print comes from remote metadata, so an unchanged model is not re-downloaded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from metamerge.errors import InputError, RefError, TransientError
from metamerge.io.digests import sha256_file
from metamerge.io.remote_model import RemoteModel, S3File
from metamerge.io.s3 import S3_FAILURES
from metamerge.refs.resolved import CHECKPOINT_SUFFIXES, ResolvedModel


def list_s3_model(ref: str, endpoint_url: str | None = None) -> tuple[RemoteModel, dict | None]:
    """One listing of s3://bucket/prefix: its files (key, ETag, size), its manifest if any, its print.

    When the prefix holds a `manifest.json` (a run published by metamerge) the files it lists
    and their digests are the print; otherwise the ETags and sizes are. Ranged reads then check
    each GET against these ETags, so the print stays true for the whole run.
    """
    from metamerge.io.s3 import s3_client, s3_error

    bucket, _, prefix = ref.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    client = s3_client(endpoint_url)
    try:
        objects = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
            objects += [(o["Key"], o["ETag"].strip('"'), o["Size"]) for o in page.get("Contents", [])]
        files = {key[len(prefix) + 1 if prefix else 0 :]: S3File(key, etag, size) for key, etag, size in objects}
        files = {rel: v for rel, v in files.items() if rel and "/" not in rel}
        if not any(rel.endswith(CHECKPOINT_SUFFIXES) for rel in files):
            raise RefError(f"model ref {ref!r}: no .safetensors objects under that prefix")
        manifest = None
        if "manifest.json" in files:
            manifest = json.loads(client.get_object(Bucket=bucket, Key=files["manifest.json"].key)["Body"].read())
            listed = manifest.get("files", {})
            files = {rel: v for rel, v in files.items() if rel in listed}
            identity = json.dumps(listed, sort_keys=True)
        else:
            identity = json.dumps(sorted((rel, f.etag, f.size) for rel, f in files.items()))
    except S3_FAILURES as exc:
        err = s3_error(client, f"listing of {ref}", exc, bucket)
        raise (RefError(str(err)) if isinstance(err, InputError) else err) from exc
    fingerprint = "s3-" + hashlib.sha256(identity.encode()).hexdigest()
    return RemoteModel(ref=ref, bucket=bucket, files=files, fingerprint=fingerprint, endpoint_url=endpoint_url), manifest


def cache_folder(cache_dir: Path, fingerprint: str) -> Path:
    """Where a download of the model with this print lives (or would live) on this machine."""
    return cache_dir / "remote" / fingerprint[:24]


def resolve_s3(ref: str, cache_dir: Path, endpoint_url: str | None = None) -> ResolvedModel:
    """s3://bucket/prefix: the print comes from remote metadata, so an unchanged model is not re-downloaded.

    Every download is verified against the manifest's digests, or the listed sizes.
    """
    from metamerge.io.s3 import s3_client, s3_error

    model, manifest = list_s3_model(ref, endpoint_url)
    local = cache_folder(cache_dir, model.fingerprint)
    if not (local / ".complete").exists():
        client = s3_client(endpoint_url)
        try:
            _download(client, model, local, manifest)
        except S3_FAILURES as exc:
            err = s3_error(client, f"download of {ref}", exc, model.bucket)
            raise (RefError(str(err)) if isinstance(err, InputError) else err) from exc
    return ResolvedModel(ref=ref, path=local, fingerprint=model.fingerprint)


def _download(client, model: RemoteModel, local: Path, manifest: dict | None) -> None:
    """Into a temporary folder, verified, then renamed: a crash never leaves a half model."""
    tmp = local.parent / f".{local.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for rel, file in model.files.items():
            client.download_file(model.bucket, file.key, str(tmp / rel))
            if (tmp / rel).stat().st_size != file.size:
                raise TransientError(f"s3://{model.bucket}/{file.key}: size changed during download")
            if manifest is not None and sha256_file(tmp / rel) != manifest["files"][rel]["sha256"]:
                raise TransientError(f"s3://{model.bucket}/{file.key}: sha256 does not match its manifest")
        (tmp / ".complete").write_text("ok")
        shutil.rmtree(local, ignore_errors=True)
        tmp.rename(local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(ref: str, cache_dir: Path | None = None, endpoint_url: str | None = None) -> ResolvedModel:
    """The scheme table's entry: downloads go under `<cache_dir>/remote/`."""
    return resolve_s3(ref, Path(cache_dir or ".metamerge"), endpoint_url)
