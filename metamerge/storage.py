"""Publishing a merged model to S3 (any S3-compatible endpoint) or a local folder.

Readers trust only runs that have a `manifest.json`, and the manifest is written last, after
every file it lists is uploaded and verified; so a crash mid-upload leaves an invisible,
incomplete run, never a half-written model. Uploads carry their sha256 as object metadata,
which makes a re-publish skip files that are already there, and the manifest is created with
a conditional write so two concurrent publishers of one run cannot interleave manifests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from metamerge.errors import InputError, TransientError
from metamerge.faults import hang_point
from metamerge.refs import DigestCache, sha256_file

MANIFEST = "manifest.json"
CLAIM = ".publish-claim"
LATEST = "latest.json"
MULTIPART_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Target:
    uri: str
    bucket: str | None = None
    prefix: str = ""
    path: Path | None = None

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    def join(self, *parts: str) -> str:
        clean = [p.strip("/") for p in (self.prefix, *parts) if p and p.strip("/")]
        return "/".join(clean)


def parse_target(uri: str) -> Target:
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[5:].partition("/")
        if len(bucket) < 3:
            raise InputError(f"publish target {uri!r}: bucket name must have at least 3 characters")
        return Target(uri=uri, bucket=bucket, prefix=prefix.strip("/"))
    if "://" in uri and not uri.startswith("file://"):
        raise InputError(f"publish target {uri!r}: only s3:// and local folders are supported")
    return Target(uri=uri, path=Path(uri.removeprefix("file://")))


@dataclass(frozen=True)
class PublishResult:
    run_uri: str
    manifest_uri: str
    uploaded: int
    skipped: int
    manifest: dict


def build_manifest(files_in: dict[str, Path], model_name: str, run_id: str, extra: dict | None = None,
                   digests: DigestCache | None = None) -> dict:
    digests = digests or DigestCache(None)
    files = {}
    for rel in sorted(files_in):
        file = files_in[rel]
        files[rel] = {"sha256": digests.digest(file), "size": file.stat().st_size}
    digests.save()
    return {"model": model_name, "run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files, **(extra or {})}


def s3_client(endpoint_url: str | None = None):
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=5, read_timeout=60)
    return boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"), config=config)


def _endpoint(client) -> str:
    return getattr(client.meta, "endpoint_url", "S3")


def _s3_error(client, action: str, exc: Exception) -> Exception:
    """One line naming the endpoint and what failed; config errors are not worth retrying."""
    from botocore.exceptions import ClientError

    where = _endpoint(client)
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return InputError(f"S3 {action} at {where}: {code}")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        detail = exc.response.get("Error", {}).get("Message") or ""
        return TransientError(
            f"S3 {action} at {where}: {exc.operation_name} failed with HTTP {status} {code} {detail}".rstrip()
        )
    return TransientError(f"S3 {action} at {where}: {type(exc).__name__}: {exc}")


def _publish_s3(files_in: dict[str, Path], target: Target, run_key: str, manifest: dict, endpoint_url: str | None) -> tuple[int, int]:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3_client(endpoint_url)
    uploaded = skipped = 0
    try:
        _require_bucket(client, target.bucket)
        _claim_s3(client, target.bucket, run_key, manifest)
        for rel, meta in manifest["files"].items():
            if not upload_unless_present(client, target.bucket, f"{run_key}/{rel}", files_in[rel], meta):
                skipped += 1
                continue
            uploaded += 1
            hang_point("upload")
        for rel, meta in manifest["files"].items():
            if not _s3_matches(client, target.bucket, f"{run_key}/{rel}", meta):
                raise TransientError(f"S3 upload at {_endpoint(client)}: {rel} did not verify after upload")
        _commit_manifest(client, target.bucket, f"{run_key}/{MANIFEST}", manifest)
        latest = {"run_id": manifest["run_id"], "manifest": f"{run_key}/{MANIFEST}", "created": manifest["created"]}
        client.put_object(Bucket=target.bucket, Key=f"{run_key.rsplit('/', 1)[0]}/{LATEST}",
                          Body=json.dumps(latest).encode(), ContentType="application/json")
    except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
        raise _s3_error(client, "publish", exc) from exc
    return uploaded, skipped


def content_digest(manifest: dict) -> str:
    """Identity of a publication: the set of (file, sha256, size), nothing time-dependent."""
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


def _claim_s3(client, bucket: str, run_key: str, manifest: dict) -> None:
    """Create-once claim on a run prefix: only publishers of identical content may write there.

    Two publishers of different content could otherwise overwrite each other's objects between
    one's verification and its manifest commit. The claim stays after the commit so that no
    later publisher with other content can ever write into a committed run.
    """
    from botocore.exceptions import ClientError

    key, digest = f"{run_key}/{CLAIM}", content_digest(manifest)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=digest.encode(), IfNoneMatch="*")
        return
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412"):
            raise
    holder = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    if holder != digest:
        raise InputError(f"s3://{bucket}/{run_key} is already published (or being published) with different files")


def _claim_local(run_dir: Path, manifest: dict) -> None:
    claim, digest = run_dir / CLAIM, content_digest(manifest)
    try:
        fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        if claim.read_text() != digest:
            raise InputError(f"{run_dir} is already published (or being published) with different files") from None
        return
    with os.fdopen(fd, "w") as fh:
        fh.write(digest)


def _require_bucket(client, bucket: str) -> None:
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
            raise InputError(f"S3 publish at {_endpoint(client)}: NoSuchBucket {bucket!r}") from None
        raise


def upload_unless_present(client, bucket: str, key: str, path: Path, meta: dict) -> bool:
    """Uploads `path` (multipart, sha256 in its metadata) unless the same bytes are already at `key`.

    Returns whether it uploaded: re-running a publish or a shared-storage put is then cheap.
    """
    from boto3.s3.transfer import TransferConfig

    if _s3_matches(client, bucket, key, meta):
        return False
    client.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {"sha256": meta["sha256"]}},
                       Config=TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES))
    return True


def _s3_matches(client, bucket: str, key: str, meta: dict) -> bool:
    from botocore.exceptions import ClientError

    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return head.get("ContentLength") == meta["size"] and head.get("Metadata", {}).get("sha256") == meta["sha256"]


def _commit_manifest(client, bucket: str, key: str, manifest: dict) -> None:
    """Create-once: a second publisher of the same run either agrees on the files or fails."""
    from botocore.exceptions import ClientError

    body = json.dumps(manifest, indent=2).encode()
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*", ContentType="application/json")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412"):
            raise
        existing = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        if existing.get("files") != manifest["files"]:
            raise InputError(f"s3://{bucket}/{key} already exists with different files; refusing to overwrite") from None


def _publish_local(files_in: dict[str, Path], run_dir: Path, manifest: dict) -> tuple[int, int]:
    run_dir.mkdir(parents=True, exist_ok=True)
    _claim_local(run_dir, manifest)
    uploaded = skipped = 0
    for rel, meta in manifest["files"].items():
        dest = run_dir / rel
        if dest.exists() and dest.stat().st_size == meta["size"] and sha256_file(dest) == meta["sha256"]:
            skipped += 1
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(files_in[rel], tmp)
        tmp.replace(dest)
        uploaded += 1
    manifest_path = run_dir / MANIFEST
    if manifest_path.exists():
        if json.loads(manifest_path.read_text()).get("files") != manifest["files"]:
            raise InputError(f"{manifest_path} already exists with different files; refusing to overwrite")
    else:
        tmp = run_dir / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2))
        tmp.replace(manifest_path)
    latest = {"run_id": manifest["run_id"], "manifest": f"{run_dir.name}/{MANIFEST}", "created": manifest["created"]}
    tmp = run_dir.parent / f".{LATEST}.tmp"
    tmp.write_text(json.dumps(latest))
    tmp.replace(run_dir.parent / LATEST)
    return uploaded, skipped


def publish_run(files: dict[str, Path], target_uri: str, model_name: str, run_id: str,
                endpoint_url: str | None = None, extra: dict | None = None,
                digests: DigestCache | None = None) -> PublishResult:
    """Uploads `files` ({relative name: local path}) under <target>/<model>/<run-id>/, manifest last."""
    target = parse_target(target_uri)
    manifest = build_manifest(files, model_name, run_id, extra, digests)
    if target.is_s3:
        run_key = target.join(model_name, run_id)
        uploaded, skipped = _publish_s3(files, target, run_key, manifest, endpoint_url)
        run_uri = f"s3://{target.bucket}/{run_key}"
    else:
        run_dir = target.path / model_name / run_id
        uploaded, skipped = _publish_local(files, run_dir, manifest)
        run_uri = str(run_dir)
    return PublishResult(run_uri, f"{run_uri}/{MANIFEST}", uploaded, skipped, manifest)


def read_json(uri: str, endpoint_url: str | None = None) -> dict:
    """Reads a small JSON object (manifest, latest, scores) from s3:// or a local path."""
    target = parse_target(uri)
    if target.is_s3:
        from botocore.exceptions import BotoCoreError, ClientError

        client = s3_client(endpoint_url)
        try:
            return json.loads(client.get_object(Bucket=target.bucket, Key=target.prefix)["Body"].read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(uri) from None
            raise _s3_error(client, f"read of {uri}", exc) from exc
        except BotoCoreError as exc:
            raise _s3_error(client, f"read of {uri}", exc) from exc
    return json.loads(Path(target.path).read_text())


def latest_manifest(target_uri: str, model_name: str, endpoint_url: str | None = None) -> dict | None:
    """The manifest of the last published run of `model_name`, or None if nothing is published."""
    target = parse_target(target_uri)
    latest_uri = (f"s3://{target.bucket}/{target.join(model_name, LATEST)}" if target.is_s3
                  else str(target.path / model_name / LATEST))
    try:
        latest = read_json(latest_uri, endpoint_url)
    except FileNotFoundError:
        return None
    base = f"s3://{target.bucket}/{latest['manifest']}" if target.is_s3 else str(target.path / model_name / latest["manifest"])
    return read_json(base, endpoint_url)
