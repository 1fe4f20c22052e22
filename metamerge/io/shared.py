"""Workdir files shared between machines through S3, so any Dask worker can take any task.

Stages keep passing local paths under the recipe's workdir (every worker uses the same
workdir path on its own disk). With a shared store, a stage that writes such a file `put`s it
to `<store>/<path relative to the workdir>`, and a stage on another machine that needs it
calls `ensure`, which downloads it (verified by sha256) when it is not already there. Without
a store, files are only local: that is correct on one machine or when the workdir is a shared
file system (NFS, EFS, a LocalCluster), and `ensure` says so clearly when a file is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from metamerge.errors import InputError, TransientError
from metamerge.io.digests import sha256_file
from metamerge.io.outputs import OUTPUT_MARKER
from metamerge.io.s3 import (
    S3_FAILURES,
    BotoCoreError,
    ClientError,
    error_code,
    s3_client,
    s3_error,
    unwrap_upload_error,
    upload_unless_present,
)
from metamerge.io.staged import StagedUpload, abort_stale_uploads, complete_staged, stage_upload
from metamerge.io.targets import parse_target

FOLDER_MANIFEST = ".metamerge-shared.json"  # written last: a folder in the store exists only once it is there


@dataclass(frozen=True)
class SharedStore:
    """`uri` is s3://bucket/prefix or None (the workdir is shared, or there is one machine)."""

    workdir: str
    uri: str | None = None
    endpoint_url: str | None = None

    def _key(self, path: Path) -> str:
        root = Path(self.workdir).resolve()
        try:
            rel = Path(path).resolve().relative_to(root).as_posix()
        except ValueError:
            raise InputError(f"shared storage: {path} is outside the workdir {root}") from None
        return parse_target(self.uri).join(rel)

    def put(self, path: Path, as_path: Path | None = None) -> dict:
        """Uploads a file (skipped when the same bytes are already there) to the key of the workdir path
        `as_path` (default: its own); returns its {size, sha256} (nothing without a store)."""
        if self.uri is None:
            return {}
        bucket, key, client = parse_target(self.uri).bucket, self._key(as_path or path), s3_client(self.endpoint_url)
        meta = {"sha256": sha256_file(Path(path)), "size": Path(path).stat().st_size}
        try:
            upload_unless_present(client, bucket, key, Path(path), meta)
        except S3_FAILURES as exc:
            raise s3_error(client, f"upload of {path.name} to shared storage", unwrap_upload_error(exc), bucket) from exc
        return meta

    def put_dir(self, folder: Path) -> None:
        """Every file of a workdir folder, with metamerge's output marker but no other hidden file; the
        folder's manifest last, so a worker that fetches the folder sees all of it or none."""
        if self.uri is None:
            return
        entries = {file.name: self.put(file) for file in sorted(Path(folder).iterdir())
                   if file.is_file() and (not file.name.startswith(".") or file.name == OUTPUT_MARKER)}
        self.put_manifest(folder, entries)

    def put_manifest(self, folder: Path, entries: dict[str, dict]) -> None:
        """Commits a folder in the store: {file name: {size, sha256}} of everything it holds."""
        if self.uri is None:
            return
        target, client = parse_target(self.uri), s3_client(self.endpoint_url)
        body = json.dumps({"files": entries}, indent=1, sort_keys=True).encode()
        try:
            client.put_object(Bucket=target.bucket, Key=self._key(Path(folder) / FOLDER_MANIFEST), Body=body)
        except S3_FAILURES as exc:
            raise s3_error(client, f"upload of {Path(folder).name}'s manifest to shared storage", exc, target.bucket) from exc

    def manifest(self, folder: Path) -> dict[str, dict] | None:
        """The committed folder's files {name: {size, sha256}}, or None when it is not (yet) committed."""
        if self.uri is None:
            return None
        target, client = parse_target(self.uri), s3_client(self.endpoint_url)
        try:
            body = client.get_object(Bucket=target.bucket, Key=self._key(Path(folder) / FOLDER_MANIFEST))["Body"].read()
        except ClientError as exc:
            if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise s3_error(client, f"read of {Path(folder).name}'s manifest", exc, target.bucket) from exc
        except S3_FAILURES as exc:
            raise s3_error(client, f"read of {Path(folder).name}'s manifest", exc, target.bucket) from exc
        return json.loads(body)["files"]

    def stage(self, path: Path, final: Path) -> dict:
        """Uploads a local file to the key of workdir path `final`, left invisible (metamerge/io/staged.py).

        An unfinished upload to the same key (a killed attempt's) is aborted first.
        """
        target, client = parse_target(self.uri), s3_client(self.endpoint_url)
        key = self._key(final)
        try:
            abort_stale_uploads(client, target.bucket, key)
            return stage_upload(client, target.bucket, key, Path(path), sha256_file(Path(path))).to_dict()
        except S3_FAILURES as exc:
            raise s3_error(client, f"staged upload of {Path(path).name} to shared storage", exc, target.bucket) from exc

    def commit_staged(self, staged: dict) -> str:
        """Makes a staged upload visible and checks it; returns the object's ETag."""
        client = s3_client(self.endpoint_url)
        try:
            return complete_staged(client, StagedUpload(**staged))
        except S3_FAILURES as exc:
            raise s3_error(client, f"completion of s3://{staged['bucket']}/{staged['key']}", exc, staged["bucket"]) from exc

    def location(self, path: Path) -> tuple[str, str]:
        """(bucket, key) of a workdir path in the store."""
        return parse_target(self.uri).bucket, self._key(path)

    def exists(self, path: Path) -> bool:
        """On this machine, or in the store (a cheap HEAD): decides whether a cached stage must re-run."""
        if Path(path).exists():
            return True
        if self.uri is None:
            return False
        try:
            s3_client(self.endpoint_url).head_object(Bucket=parse_target(self.uri).bucket, Key=self._key(Path(path)))
        except ClientError:
            return False
        return True

    def remove(self, path: Path) -> None:
        """Best effort: the staged copy of a file that is no longer needed (e.g. a shard once assembled)."""
        Path(path).unlink(missing_ok=True)
        if self.uri is not None:
            with contextlib.suppress(ClientError, BotoCoreError):
                s3_client(self.endpoint_url).delete_object(Bucket=parse_target(self.uri).bucket, Key=self._key(Path(path)))

    def ensure(self, path: Path) -> Path:
        """The file at `path` on this machine, downloaded from the store when missing."""
        path = Path(path)
        if path.exists():
            return path
        if self.uri is None:
            raise InputError(f"{path} is not on this machine: a multi-machine Dask cluster needs `runner.storage` "
                             "(or `results:`) set to an s3:// location, or a workdir on a shared file system")
        self._download(self._key(path), path)
        return path

    def ensure_dir(self, folder: Path) -> Path:
        """A whole workdir folder (a merged checkpoint), downloaded when missing; swapped in atomically.

        Only a committed folder (its manifest written last) is fetched, and only the files it lists.
        """
        folder = Path(folder)
        if folder.exists():
            return folder
        if self.uri is None:
            return self.ensure(folder)
        files = self.manifest(folder)
        if files is None:
            raise InputError(f"{folder} is neither on this machine nor committed to shared storage "
                             f"{self.uri.rstrip('/')}/{self._key(folder)}")
        tmp = folder.parent / f".{folder.name}.fetch-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            for name in sorted(files):
                self._download(self._key(folder / name), tmp / name)
            if not folder.exists():
                tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def _download(self, key: str, path: Path) -> None:
        """To a temporary name, checked against the sha256 recorded at upload, then renamed."""
        bucket, client = parse_target(self.uri).bucket, s3_client(self.endpoint_url)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part")
        try:
            want = client.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get("sha256")
            client.download_file(bucket, key, str(tmp))
            if want is not None and sha256_file(tmp) != want:
                raise TransientError(f"s3://{bucket}/{key}: download does not match its sha256")
            tmp.replace(path)
        except S3_FAILURES as exc:
            raise s3_error(client, f"download of s3://{bucket}/{key}", exc, bucket) from exc
        finally:
            tmp.unlink(missing_ok=True)
