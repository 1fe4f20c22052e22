"""The one S3 layer: the client, what its errors mean, verified uploads, the write probe.

Every S3 call of the project goes through a client made here, and every botocore error is
turned here into one of three project errors: CredentialsError and InputError (a missing
bucket) are not retried, TransientError is. Messages name the endpoint and the bucket.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)

from metamerge.errors import (
    CredentialsError,
    InputError,
    TransientError,
)
from metamerge.io.targets import parse_target

MULTIPART_BYTES = 64 * 1024 * 1024  # objects from this size on are uploaded in parts
PART_BYTES = 16 * 1024 * 1024  # part size (grown for huge files, S3 allows 10 000 parts)


PROBE_PREFIX = ".metamerge-preflight-"
# what any S3 call may raise; `s3_error` turns each into a project error
S3_FAILURES = (ClientError, BotoCoreError, S3UploadFailedError)
# S3 answers that mean "these credentials may not do this": retrying with the same ones cannot help
CREDENTIAL_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                              "ExpiredToken", "TokenRefreshRequired", "InvalidClientTokenId", "AllAccessDisabled",
                              "403", "Forbidden"})


def error_code(exc: ClientError) -> str:
    """The S3 error code of a failed call ("NoSuchKey", "PreconditionFailed", "403", ...)."""
    return exc.response.get("Error", {}).get("Code", "")


def s3_client(endpoint_url: str | None = None, fast: bool = False, connections: int = 10):
    """boto3 S3 client; `fast` (preflight checks) gives up after one retry and a 3 s connect timeout.

    `connections` sizes the connection pool for clients shared by many threads (ranged reads).
    """
    if fast:
        config = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=3, read_timeout=10)
    else:
        config = Config(retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                        max_pool_connections=connections)
    return boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"), config=config)


def endpoint_of(client) -> str:
    return getattr(client.meta, "endpoint_url", "S3")


def s3_error(client, action: str, exc: Exception, bucket: str | None = None) -> Exception:
    """One line naming the endpoint (and bucket) and what failed; config and credential errors are not retried."""
    where = endpoint_of(client)
    on = f" for bucket {bucket!r}" if bucket else ""
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return CredentialsError(f"S3 {action} at {where}: no credentials found{on} ({type(exc).__name__}; set "
                                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role)")
    if isinstance(exc, ClientError):
        code = error_code(exc)
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
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
        return TransientError(f"S3 {action} at {where}: cannot connect to the endpoint ({type(exc).__name__})")
    return TransientError(f"S3 {action} at {where}: {type(exc).__name__}: {exc}")


def unwrap_upload_error(exc: Exception) -> Exception:
    """boto3 wraps a failed upload's ClientError in S3UploadFailedError: classify the original."""
    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__cause__ or exc.__context__, Exception):
        return exc.__cause__ or exc.__context__
    return exc


def require_bucket(client, bucket: str, action: str = "publish") -> None:
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
            raise InputError(f"S3 {action} at {endpoint_of(client)}: NoSuchBucket {bucket!r}") from None
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
    if s3_object_matches(client, bucket, key, meta):
        return False
    part = max(PART_BYTES, -(-int(meta["size"]) // 9000))
    # a non-seekable source keeps at most 10 parts in memory (s3transfer's default): 160 MB
    # one PutObject (below the threshold) runs in this thread: s3transfer's worker threads add nothing
    # there, and once (under heavy load) its future never completed, hanging a publish
    config = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=part,
                            use_threads=int(meta["size"]) >= MULTIPART_BYTES)
    with open(path, "rb") as fh:
        sent = _HashingReader(fh)
        client.upload_fileobj(sent, bucket, key, ExtraArgs={"Metadata": {"sha256": meta["sha256"]}}, Config=config)
    if sent.sha.hexdigest() != meta["sha256"] or sent.size != meta["size"]:
        with contextlib.suppress(Exception):
            client.delete_object(Bucket=bucket, Key=key)
        raise TransientError(f"{path} changed while it was uploaded to s3://{bucket}/{key}: the bytes sent do not "
                             "match the sha256 recorded for it; the object was removed")
    return True


def s3_object_matches(client, bucket: str, key: str, meta: dict) -> bool:
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return head.get("ContentLength") == meta["size"] and head.get("Metadata", {}).get("sha256") == meta["sha256"]


def check_s3_writable(uri: str, endpoint_url: str | None, what: str) -> str | None:
    """Preflight of an s3:// location: reachable, the bucket exists, the credentials may write.

    The write probe creates a multipart upload under a hidden key and aborts it: it needs the
    PutObject permission, yet never creates an object (nothing to list, no version on a
    versioned bucket, no DeleteObject permission needed). An endpoint that cannot be reached, a
    missing bucket, refused or missing credentials raise; a server that answers but fails
    (HTTP 5xx, throttling) is reachable: that returns a warning, and the stages' retries deal
    with it later.
    """
    target = parse_target(uri)
    client = s3_client(endpoint_url, fast=True)
    try:
        # no HEAD first: a HEAD's 403 carries no error code, this POST's answer names it (or NoSuchBucket)
        key = target.join(f"{PROBE_PREFIX}{uuid.uuid4().hex}")
        upload = client.create_multipart_upload(Bucket=target.bucket, Key=key)
        client.abort_multipart_upload(Bucket=target.bucket, Key=key, UploadId=upload["UploadId"])
    except S3_FAILURES as exc:
        error = s3_error(client, f"preflight of {what} {uri}", exc, target.bucket)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) if isinstance(exc, ClientError) else 0
        if isinstance(error, TransientError) and (status >= 500 or status == 429):
            return f"warning: {error} (reachable; not verified, the stages retry)"
        raise error from exc
    return None
