"""Publishing a merged model to S3 (any S3-compatible endpoint) or a local folder.

Readers trust only runs that have a `manifest.json`, and the manifest is written last, after
every file it lists is uploaded and verified; so a crash mid-upload leaves an invisible,
incomplete run, never a half-written model. Uploads carry their sha256 as object metadata,
which makes a re-publish skip files that are already there, and the manifest is created with
a conditional write so two concurrent publishers of one run cannot interleave manifests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from metamerge.errors import (
    CredentialsError,
    InputError,
    NotPublishedError,
    OutputError,
    TransientError,
    writing,
)
from metamerge.faults import hang_point, rendezvous
from metamerge.refs import DigestCache, sha256_file

MANIFEST = "manifest.json"
CLAIM = ".publish-claim"
LATEST = "latest.json"
MULTIPART_BYTES = 64 * 1024 * 1024  # objects from this size on are uploaded in parts
PART_BYTES = 16 * 1024 * 1024  # part size (grown for huge files, S3 allows 10 000 parts)
PROBE_PREFIX = ".metamerge-preflight-"
# S3 answers that mean "these credentials may not do this": retrying with the same ones cannot help
CREDENTIAL_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                              "ExpiredToken", "TokenRefreshRequired", "InvalidClientTokenId", "AllAccessDisabled",
                              "403", "Forbidden"})


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


def s3_client(endpoint_url: str | None = None, fast: bool = False):
    """boto3 S3 client; `fast` (preflight checks) gives up after one retry and a 3 s connect timeout."""
    import boto3
    from botocore.config import Config

    if fast:
        config = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=3, read_timeout=10)
    else:
        config = Config(retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=5, read_timeout=60)
    return boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"), config=config)


def _endpoint(client) -> str:
    return getattr(client.meta, "endpoint_url", "S3")


def _s3_error(client, action: str, exc: Exception, bucket: str | None = None) -> Exception:
    """One line naming the endpoint (and bucket) and what failed; config and credential errors are not retried."""
    from botocore.exceptions import ClientError, CredentialRetrievalError, NoCredentialsError, PartialCredentialsError

    where = _endpoint(client)
    on = f" for bucket {bucket!r}" if bucket else ""
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return CredentialsError(f"S3 {action} at {where}: no credentials found{on} ({type(exc).__name__}; set "
                                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role)")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in CREDENTIAL_CODES or status == 403:
            shown = "HTTP 403 Forbidden" if code in ("403", "Forbidden", "") else code
            return CredentialsError(f"S3 {action} at {where}: the credentials were refused{on} ({shown})")
        if code == "NoSuchBucket":
            return InputError(f"S3 {action} at {where}: NoSuchBucket {bucket!r}" if bucket
                              else f"S3 {action} at {where}: {code}")
        detail = exc.response.get("Error", {}).get("Message") or ""
        return TransientError(
            f"S3 {action} at {where}: {exc.operation_name} failed with HTTP {status} {code} {detail}".rstrip()
        )
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
        return TransientError(f"S3 {action} at {where}: cannot connect to the endpoint ({type(exc).__name__})")
    return TransientError(f"S3 {action} at {where}: {type(exc).__name__}: {exc}")


def _publish_s3(files_in: dict[str, Path], target: Target, run_key: str, manifest: dict, endpoint_url: str | None) -> tuple[int, int]:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3_client(endpoint_url)
    uploaded = skipped = 0
    try:
        _require_bucket(client, target.bucket, "publish")
        rendezvous("publish")
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
        raise _s3_error(client, "publish", _cause(exc), target.bucket) from exc
    return uploaded, skipped


def _cause(exc: Exception) -> Exception:
    """boto3 wraps a failed upload's ClientError in S3UploadFailedError: classify the original."""
    from boto3.exceptions import S3UploadFailedError

    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__cause__ or exc.__context__, Exception):
        return exc.__cause__ or exc.__context__
    return exc


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


def _claim_local(run_dir: Path, manifest: dict) -> bool:
    """Like `_claim_s3`; returns whether this call created the claim."""
    claim, digest = run_dir / CLAIM, content_digest(manifest)
    try:
        fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        if claim.read_text() != digest:
            raise InputError(f"{run_dir} is already published (or being published) with different files") from None
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(digest)
    return True


def _require_bucket(client, bucket: str, action: str = "publish") -> None:
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
            raise InputError(f"S3 {action} at {_endpoint(client)}: NoSuchBucket {bucket!r}") from None
        raise


class _HashingReader:
    """A read-only, non-seekable view of a file that hashes every byte handed out.

    boto3 reads a non-seekable source exactly once, in order, so the digest is that of the bytes
    that were sent, whatever happens to the file meanwhile.
    """

    def __init__(self, fh):
        self._fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        data = self._fh.read(-1 if size is None else size)
        self.sha.update(data)
        self.size += len(data)
        return data


def upload_unless_present(client, bucket: str, key: str, path: Path, meta: dict) -> bool:
    """Uploads `path` (multipart, sha256 in its metadata) unless the same bytes are already at `key`.

    The upload hashes the bytes it sends; if they are not the bytes `meta` describes (the file
    changed after it was hashed), the object is removed and the upload fails: an object's
    content always matches the sha256 it carries. Returns whether it uploaded, so re-running a
    publish or a shared-storage put is cheap.
    """
    from boto3.s3.transfer import TransferConfig

    if _s3_matches(client, bucket, key, meta):
        return False
    part = max(PART_BYTES, -(-int(meta["size"]) // 9000))
    # a non-seekable source keeps at most 10 parts in memory (s3transfer's default): 160 MB
    config = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=part)
    with open(path, "rb") as fh:
        sent = _HashingReader(fh)
        client.upload_fileobj(sent, bucket, key, ExtraArgs={"Metadata": {"sha256": meta["sha256"]}}, Config=config)
    if sent.sha.hexdigest() != meta["sha256"] or sent.size != meta["size"]:
        with contextlib.suppress(Exception):
            client.delete_object(Bucket=bucket, Key=key)
        raise TransientError(f"{path} changed while it was uploaded to s3://{bucket}/{key}: the bytes sent do not "
                             "match the sha256 recorded for it; the object was removed")
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


def _is_latest_record(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"run_id", "manifest"} <= set(data)


def _copy_verified(source: Path, dest: Path, meta: dict) -> None:
    """Copies to `dest` hashing the bytes written; they must be the bytes the manifest describes."""
    digest, size = hashlib.sha256(), 0
    with open(source, "rb") as fin, open(dest, "wb") as fout:
        while block := fin.read(8 << 20):
            digest.update(block)
            fout.write(block)
            size += len(block)
        fout.flush()
        os.fsync(fout.fileno())
    if digest.hexdigest() != meta["sha256"] or size != meta["size"]:
        raise TransientError(f"{source} changed while it was published: the bytes copied do not match its sha256")


def _publish_local(files_in: dict[str, Path], run_dir: Path, manifest: dict) -> tuple[int, int]:
    """The local twin of `_publish_s3`. Never writes over what it did not write; a failed attempt
    removes what it wrote (nothing partial is left), a full disk or read-only target is one WriteError."""
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / CLAIM).exists():
        raise OutputError(f"{run_dir} exists, is not empty and was not written by metamerge; nothing was published")
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"{run_dir} exists and is not a folder; nothing was published")
    latest_path = run_dir.parent / LATEST
    if latest_path.exists() and not _is_latest_record(latest_path):
        raise OutputError(f"{latest_path} exists and was not written by metamerge; nothing was published")
    created_dirs = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
    written: list[Path] = []
    claimed = committed = False
    uploaded = skipped = 0
    try:
        with writing(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            claimed = _claim_local(run_dir, manifest)
            for rel, meta in manifest["files"].items():
                dest = run_dir / rel
                if dest.exists() and dest.stat().st_size == meta["size"] and sha256_file(dest) == meta["sha256"]:
                    skipped += 1
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
                try:
                    _copy_verified(files_in[rel], tmp, meta)
                    tmp.replace(dest)
                finally:
                    tmp.unlink(missing_ok=True)
                written.append(dest)
                uploaded += 1
            for rel, meta in manifest["files"].items():  # a concurrent failed attempt may have removed some
                if not (run_dir / rel).is_file() or (run_dir / rel).stat().st_size != meta["size"]:
                    raise TransientError(f"{run_dir / rel} is missing after the copy; publish again")
            manifest_path = run_dir / MANIFEST
            if manifest_path.exists():
                if json.loads(manifest_path.read_text()).get("files") != manifest["files"]:
                    raise InputError(f"{manifest_path} already exists with different files; refusing to overwrite")
            else:
                tmp = run_dir / f".{MANIFEST}.{os.getpid()}.tmp"
                tmp.write_text(json.dumps(manifest, indent=2))
                tmp.replace(manifest_path)
            committed = True
            latest = {"run_id": manifest["run_id"], "manifest": f"{run_dir.name}/{MANIFEST}",
                      "created": manifest["created"]}
            tmp = run_dir.parent / f".{LATEST}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(latest))
            tmp.replace(latest_path)
    except BaseException:
        if not committed:  # leave nothing of this attempt behind
            for dest in written:
                dest.unlink(missing_ok=True)
            if claimed:
                (run_dir / CLAIM).unlink(missing_ok=True)
            for folder in created_dirs:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if empty
        raise
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
            raise _s3_error(client, f"read of {uri}", exc, target.bucket) from exc
        except BotoCoreError as exc:
            raise _s3_error(client, f"read of {uri}", exc, target.bucket) from exc
    return json.loads(Path(target.path).read_text())


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
        from botocore.exceptions import BotoCoreError, ClientError

        client = s3_client(endpoint_url)
        try:
            stored = {o["Key"][len(target.prefix) + 1:]: o["Size"]
                      for page in client.get_paginator("list_objects_v2").paginate(Bucket=target.bucket,
                                                                                   Prefix=target.prefix + "/")
                      for o in page.get("Contents", [])}
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(client, f"listing of {uri.rsplit('/', 1)[0]}", exc, target.bucket) from exc
    else:
        run_dir = Path(target.path)
        stored = {rel: (run_dir / rel).stat().st_size for rel in manifest.get("files", {}) if (run_dir / rel).is_file()}
    if any(stored.get(rel) != meta.get("size") for rel, meta in manifest.get("files", {}).items()):
        return None
    return uri


def check_s3_writable(uri: str, endpoint_url: str | None, what: str) -> str | None:
    """Preflight of an s3:// location: reachable, the bucket exists, the credentials may write.

    The write probe creates a multipart upload under a hidden key and aborts it: it needs the
    PutObject permission, yet never creates an object (nothing to list, no version on a
    versioned bucket, no DeleteObject permission needed). An endpoint that cannot be reached, a
    missing bucket, refused or missing credentials raise; a server that answers but fails
    (HTTP 5xx, throttling) is reachable: that returns a warning, and the stages' retries deal
    with it later.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    target = parse_target(uri)
    client = s3_client(endpoint_url, fast=True)
    try:
        # no HEAD first: a HEAD's 403 carries no error code, this POST's answer names it (or NoSuchBucket)
        key = target.join(f"{PROBE_PREFIX}{uuid.uuid4().hex}")
        upload = client.create_multipart_upload(Bucket=target.bucket, Key=key)
        client.abort_multipart_upload(Bucket=target.bucket, Key=key, UploadId=upload["UploadId"])
    except (ClientError, BotoCoreError) as exc:
        error = _s3_error(client, f"preflight of {what} {uri}", exc, target.bucket)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) if isinstance(exc, ClientError) else 0
        if isinstance(error, TransientError) and (status >= 500 or status == 429):
            return f"warning: {error} (reachable; not verified, the stages retry)"
        raise error from exc
    return None
