"""Multipart uploads left uncompleted on purpose: a shard is uploaded where it will live, yet invisible.

A shard task uploads every part of its file to the final key but does not complete the
upload; S3 shows no object until CompleteMultipartUpload, a metadata call that finalize makes
once every shard is there. So finalize moves no tensor byte, and a worker killed mid-upload
leaves nothing visible: its task, re-run elsewhere, aborts the upload that was left and starts
its own. (A bucket lifecycle rule `AbortIncompleteMultipartUpload` reclaims uploads of runs
that never came back.)
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from metamerge.errors import InputError, TransientError
from metamerge.faults import hang_point
from metamerge.io.s3 import PART_BYTES, ClientError, error_code

UPLOAD_THREADS = 4


@dataclass(frozen=True)
class StagedUpload:
    """What finalize needs to make a staged upload visible (small: it travels in a task result)."""

    bucket: str
    key: str
    upload_id: str
    parts: list[dict]
    size: int
    sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


def abort_stale_uploads(client, bucket: str, key: str) -> int:
    """Aborts every unfinished upload to exactly `key` (a killed attempt's); returns how many."""
    aborted = 0
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=key):
        for upload in page.get("Uploads", []):
            if upload["Key"] == key:
                with contextlib.suppress(ClientError):  # already gone: someone else aborted it
                    client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
                    aborted += 1
    return aborted


def stage_upload(client, bucket: str, key: str, path: Path, sha256: str) -> StagedUpload:
    """Uploads every part of `path` to `key` and leaves the upload open (see the module docstring)."""
    size = Path(path).stat().st_size
    part = max(PART_BYTES, -(-size // 9000))
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, Metadata={"sha256": sha256})["UploadId"]

    def send(number: int) -> dict:
        with open(path, "rb") as fh:
            fh.seek((number - 1) * part)
            body = fh.read(part)
        answer = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body)
        return {"PartNumber": number, "ETag": answer["ETag"]}

    try:
        with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
            parts = list(pool.map(send, range(1, max(1, -(-size // part)) + 1)))
        hang_point("stage-upload")  # tests: a worker SIGKILLed here leaves an upload with every part, uncompleted
    except BaseException:
        with contextlib.suppress(Exception):
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise
    return StagedUpload(bucket, key, upload_id, parts, size, sha256)


def complete_staged(client, staged: StagedUpload) -> str:
    """Makes a staged upload visible, checks the object is the bytes the shard task sent; its ETag.

    A retried finalize finds the upload already completed (NoSuchUpload): the object's size and
    recorded sha256 then decide whether it is this shard.
    """
    uri = f"s3://{staged.bucket}/{staged.key}"
    try:
        client.complete_multipart_upload(Bucket=staged.bucket, Key=staged.key, UploadId=staged.upload_id,
                                         MultipartUpload={"Parts": staged.parts})
    except ClientError as exc:
        if error_code(exc) not in ("NoSuchUpload", "404"):
            raise
    try:
        head = client.head_object(Bucket=staged.bucket, Key=staged.key)
    except ClientError as exc:
        if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            raise TransientError(f"{uri}: its staged upload was aborted before finalize (merge the shard again)") from None
        raise
    if head.get("ContentLength") != staged.size or head.get("Metadata", {}).get("sha256") != staged.sha256:
        raise InputError(f"{uri}: the object is not the shard that was staged "
                         f"({head.get('ContentLength')} bytes, want {staged.size} with sha256 {staged.sha256[:12]}…)")
    return head["ETag"].strip('"')
