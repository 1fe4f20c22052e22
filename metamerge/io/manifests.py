"""Reading what was published: manifests, `latest.json`, and whether a run is still whole."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from metamerge.errors import (
    NotPublishedError,
)
from metamerge.io.s3 import S3_FAILURES, BotoCoreError, ClientError, error_code, s3_client, s3_error
from metamerge.io.targets import parse_target

MANIFEST = "manifest.json"
LATEST = "latest.json"


def read_json(uri: str, endpoint_url: str | None = None) -> dict:
    """Reads a small JSON object (manifest, latest, scores) from s3:// or a local path."""
    return json.loads(read_text(uri, endpoint_url))


def read_text(uri: str, endpoint_url: str | None = None) -> str:
    """Reads a small published document (JSON, the model card) from s3:// or a local path."""
    target = parse_target(uri)
    if target.is_s3:
        client = s3_client(endpoint_url)
        try:
            return client.get_object(Bucket=target.bucket, Key=target.prefix)["Body"].read().decode()
        except ClientError as exc:
            if error_code(exc) in ("NoSuchKey", "404"):
                raise FileNotFoundError(uri) from None
            raise s3_error(client, f"read of {uri}", exc, target.bucket) from exc
        except BotoCoreError as exc:
            raise s3_error(client, f"read of {uri}", exc, target.bucket) from exc
    return Path(target.path).read_text()


def read_manifest(run_uri: str, endpoint_url: str | None = None) -> dict:
    """The manifest of a published run; NotPublishedError (`no published run at <uri>`) when there is none."""
    try:
        manifest = read_json(f"{run_uri.rstrip('/')}/{MANIFEST}", endpoint_url)
    except (FileNotFoundError, NotADirectoryError):
        raise NotPublishedError(f"no published run at {run_uri}") from None
    except IsADirectoryError:
        raise NotPublishedError(f"no published run at {run_uri} ({MANIFEST} is not a file)") from None
    except ValueError:
        raise NotPublishedError(f"no published run at {run_uri} ({MANIFEST} is not valid JSON)") from None
    if not isinstance(manifest, dict) or "files" not in manifest:
        raise NotPublishedError(f"no published run at {run_uri} ({MANIFEST} is not a metamerge manifest)")
    return manifest


def latest_manifest_uri(target_uri: str, model_name: str, endpoint_url: str | None = None) -> str | None:
    """Where `latest.json` of `model_name` points (a manifest URI), or None if nothing is published."""
    target = parse_target(target_uri)
    latest_uri = (f"s3://{target.bucket}/{target.join(model_name, LATEST)}" if target.is_s3
                  else str(target.path / model_name / LATEST))
    try:
        latest = read_json(latest_uri, endpoint_url)
    except FileNotFoundError:
        return None
    return f"s3://{target.bucket}/{latest['manifest']}" if target.is_s3 else str(target.path / model_name / latest["manifest"])


def latest_manifest(target_uri: str, model_name: str, endpoint_url: str | None = None) -> dict | None:
    """The manifest of the last published run of `model_name`, or None if nothing is published."""
    uri = latest_manifest_uri(target_uri, model_name, endpoint_url)
    return None if uri is None else read_json(uri, endpoint_url)


def published_run_intact(target_uri: str, model_name: str, endpoint_url: str | None,
                         is_ours: Callable[[dict], bool]) -> str | None:
    """The manifest URI that `latest.json` points at, if `is_ours(manifest)` and every file it lists
    is still stored with its size; None otherwise. A few small requests; no object is downloaded."""
    uri = latest_manifest_uri(target_uri, model_name, endpoint_url)
    if uri is None:
        return None
    try:
        manifest = read_json(uri, endpoint_url)
    except (FileNotFoundError, ValueError):
        return None
    if not is_ours(manifest):
        return None
    target = parse_target(uri.rsplit("/", 1)[0])
    if target.is_s3:
        client = s3_client(endpoint_url)
        try:
            stored = {o["Key"][len(target.prefix) + 1:]: o["Size"]
                      for page in client.get_paginator("list_objects_v2").paginate(Bucket=target.bucket,
                                                                                   Prefix=target.prefix + "/")
                      for o in page.get("Contents", [])}
        except S3_FAILURES as exc:
            raise s3_error(client, f"listing of {uri.rsplit('/', 1)[0]}", exc, target.bucket) from exc
    else:
        run_dir = Path(target.path)
        stored = {rel: (run_dir / rel).stat().st_size for rel in manifest.get("files", {}) if (run_dir / rel).is_file()}
    if any(stored.get(rel) != meta.get("size") for rel, meta in manifest.get("files", {}).items()):
        return None
    return uri
