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
from dataclasses import dataclass
from pathlib import Path

from metamerge.errors import (
    InputError,
    OutputError,
    TransientError,
    writing,
)
from metamerge.faults import hang_point, rendezvous
from metamerge.io.digests import DigestCache, sha256_file
from metamerge.io.manifests import LATEST, MANIFEST
from metamerge.io.s3 import (
    S3_FAILURES,
    ClientError,
    endpoint_of,
    error_code,
    require_bucket,
    s3_client,
    s3_error,
    s3_object_matches,
    unwrap_upload_error,
    upload_unless_present,
)
from metamerge.io.targets import Target, parse_target

CLAIM = ".publish-claim"


@dataclass(frozen=True)
class StoredObject:
    """A file already in S3 (a merged shard committed in shared storage): published by server-side copy."""

    bucket: str
    key: str
    size: int
    sha256: str


Source = Path | StoredObject


@dataclass(frozen=True)
class PublishResult:
    run_uri: str
    manifest_uri: str
    uploaded: int
    skipped: int
    manifest: dict


def build_manifest(files_in: dict[str, Source], model_name: str, run_id: str, extra: dict | None = None,
                   digests: DigestCache | None = None) -> dict:
    digests = digests or DigestCache(None)
    files = {}
    for rel in sorted(files_in):
        file = files_in[rel]
        if isinstance(file, StoredObject):
            files[rel] = {"sha256": file.sha256, "size": file.size}
        else:
            files[rel] = {"sha256": digests.digest(file), "size": file.stat().st_size}
    digests.save()
    return {"model": model_name, "run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files, **(extra or {})}


def _copy_stored(client, source: StoredObject, bucket: str, key: str, meta: dict) -> None:
    """Server-side copy (multipart above 5 GB), only from the very object whose size and sha256 were recorded."""
    head = client.head_object(Bucket=source.bucket, Key=source.key)
    if head.get("ContentLength") != meta["size"] or head.get("Metadata", {}).get("sha256") != meta["sha256"]:
        raise TransientError(f"s3://{source.bucket}/{source.key} is no longer the file recorded for this merge; "
                             "merge again")
    client.copy({"Bucket": source.bucket, "Key": source.key}, bucket, key,
                ExtraArgs={"Metadata": {"sha256": meta["sha256"]}, "MetadataDirective": "REPLACE",
                           "CopySourceIfMatch": head["ETag"]})


def _publish_s3(files_in: dict[str, Source], target: Target, run_key: str, manifest: dict, endpoint_url: str | None) -> tuple[int, int]:
    client = s3_client(endpoint_url)
    uploaded = skipped = 0
    try:
        require_bucket(client, target.bucket, "publish")
        rendezvous("publish")
        _claim_s3(client, target.bucket, run_key, manifest)
        for rel, meta in manifest["files"].items():
            source = files_in[rel]
            if isinstance(source, StoredObject):
                if s3_object_matches(client, target.bucket, f"{run_key}/{rel}", meta):
                    skipped += 1
                    continue
                _copy_stored(client, source, target.bucket, f"{run_key}/{rel}", meta)
            elif not upload_unless_present(client, target.bucket, f"{run_key}/{rel}", source, meta):
                skipped += 1
                continue
            uploaded += 1
            hang_point("upload")
        for rel, meta in manifest["files"].items():
            if not s3_object_matches(client, target.bucket, f"{run_key}/{rel}", meta):
                raise TransientError(f"S3 upload at {endpoint_of(client)}: {rel} did not verify after upload")
        _commit_manifest(client, target.bucket, f"{run_key}/{MANIFEST}", manifest)
        latest = {"run_id": manifest["run_id"], "manifest": f"{run_key}/{MANIFEST}", "created": manifest["created"]}
        client.put_object(Bucket=target.bucket, Key=f"{run_key.rsplit('/', 1)[0]}/{LATEST}",
                          Body=json.dumps(latest).encode(), ContentType="application/json")
    except S3_FAILURES as exc:
        raise s3_error(client, "publish", unwrap_upload_error(exc), target.bucket) from exc
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
    key, digest = f"{run_key}/{CLAIM}", content_digest(manifest)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=digest.encode(), IfNoneMatch="*")
        return
    except ClientError as exc:
        if error_code(exc) not in ("PreconditionFailed", "412"):
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


def _commit_manifest(client, bucket: str, key: str, manifest: dict) -> None:
    """Create-once: a second publisher of the same run either agrees on the files or fails."""
    body = json.dumps(manifest, indent=2).encode()
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*", ContentType="application/json")
    except ClientError as exc:
        if error_code(exc) not in ("PreconditionFailed", "412"):
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


def publish_run(files: dict[str, Source], target_uri: str, model_name: str, run_id: str,
                endpoint_url: str | None = None, extra: dict | None = None,
                digests: DigestCache | None = None) -> PublishResult:
    """Uploads `files` ({relative name: local path, or an object in S3 to copy}) under
    <target>/<model>/<run-id>/, manifest last. Objects in S3 go only to an S3 target on their endpoint."""
    target = parse_target(target_uri)
    manifest = build_manifest(files, model_name, run_id, extra, digests)
    if not target.is_s3 and any(isinstance(f, StoredObject) for f in files.values()):
        raise InputError("publish: files in S3 can be published only to an S3 target (download them first)")
    if target.is_s3:
        run_key = target.join(model_name, run_id)
        uploaded, skipped = _publish_s3(files, target, run_key, manifest, endpoint_url)
        run_uri = f"s3://{target.bucket}/{run_key}"
    else:
        run_dir = target.path / model_name / run_id
        uploaded, skipped = _publish_local(files, run_dir, manifest)
        run_uri = str(run_dir)
    return PublishResult(run_uri, f"{run_uri}/{MANIFEST}", uploaded, skipped, manifest)
