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
    s3_client,
    s3_error,
    unwrap_upload_error,
    upload_unless_present,
)
from metamerge.io.targets import parse_target


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

    def put(self, path: Path) -> None:
        """Uploads a workdir file (skipped when the same bytes are already there)."""
        if self.uri is None:
            return
        bucket, key, client = parse_target(self.uri).bucket, self._key(path), s3_client(self.endpoint_url)
        meta = {"sha256": sha256_file(Path(path)), "size": Path(path).stat().st_size}
        try:
            upload_unless_present(client, bucket, key, Path(path), meta)
        except S3_FAILURES as exc:
            raise s3_error(client, f"upload of {path.name} to shared storage", unwrap_upload_error(exc), bucket) from exc

    def put_dir(self, folder: Path) -> None:
        """Every file of a workdir folder, with metamerge's output marker (so a worker that fetches the
        folder can tell it is complete) but no other hidden file."""
        for file in sorted(Path(folder).iterdir()):
            if file.is_file() and (not file.name.startswith(".") or file.name == OUTPUT_MARKER):
                self.put(file)

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
        """A whole workdir folder (a merged checkpoint), downloaded when missing; swapped in atomically."""
        folder = Path(folder)
        if folder.exists():
            return folder
        if self.uri is None:
            return self.ensure(folder)
        target, client = parse_target(self.uri), s3_client(self.endpoint_url)
        prefix = self._key(folder) + "/"
        try:
            keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=target.bucket, Prefix=prefix)
                    for o in page.get("Contents", [])]
        except S3_FAILURES as exc:
            raise s3_error(client, f"listing of {prefix}", exc, target.bucket) from exc
        if not keys:
            raise InputError(f"{folder} is neither on this machine nor in shared storage s3://{target.bucket}/{prefix}")
        tmp = folder.parent / f".{folder.name}.fetch-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            for key in keys:
                self._download(key, tmp / key[len(prefix):])
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
