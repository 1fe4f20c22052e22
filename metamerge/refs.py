"""Model references: where a checkpoint lives, and a fingerprint of what it contains.

Caches are keyed by fingerprints of content, never by paths, so a fine-tune re-uploaded under
the same name is re-processed and an unchanged one is not. Hashing a 14 GB checkpoint takes
a while, so file digests are remembered per (path, size, mtime) in a small JSON sidecar.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from metamerge.errors import InputError, RefError, TransientError
from metamerge.outputs import TEMP_MARKER

CHECKPOINT_SUFFIXES = (".safetensors",)
_digest_lock = threading.Lock()


@dataclass(frozen=True)
class ResolvedModel:
    ref: str
    path: Path
    fingerprint: str


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class DigestCache:
    """Remembers file digests by (absolute path, size, mtime_ns) across processes."""

    def __init__(self, path: Path | None):
        self.path = path
        self._entries: dict[str, str] = {}
        if path is not None and path.exists():
            try:
                self._entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self._entries = {}

    def digest(self, file: Path) -> str:
        stat = file.stat()
        key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        cached = self._entries.get(key)
        if cached is None:
            cached = sha256_file(file)
            if not (file.parent / TEMP_MARKER).exists():  # a temporary's path never recurs: not worth keeping
                self._entries[key] = cached
        return cached

    def save(self) -> None:
        if self.path is None:
            return
        with _digest_lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(self._entries))
            tmp.replace(self.path)


def model_files(model_dir: Path) -> list[Path]:
    """Every regular file of a checkpoint folder (hidden files excluded), sorted."""
    return sorted(
        p for p in model_dir.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(model_dir).parts)
    )


def fingerprint_dir(model_dir: Path, cache: DigestCache | None = None) -> str:
    """sha256 over (relative name, size, sha256) of every file: equal content, equal print."""
    cache = cache or DigestCache(None)
    outer = hashlib.sha256()
    for file in model_files(model_dir):
        rel = file.relative_to(model_dir).as_posix()
        outer.update(f"{rel}\0{file.stat().st_size}\0{cache.digest(file)}\n".encode())
    cache.save()
    return outer.hexdigest()


def resolve_local(ref: str, cache: DigestCache | None = None) -> ResolvedModel:
    path = Path(ref.removeprefix("file://")).expanduser()
    if not path.exists():
        raise RefError(f"model ref {ref!r}: no such folder")
    if not path.is_dir():
        raise RefError(f"model ref {ref!r}: not a folder")
    if not any(p.suffix in CHECKPOINT_SUFFIXES for p in path.iterdir()):
        raise RefError(f"model ref {ref!r}: folder has no .safetensors files")
    return ResolvedModel(ref=ref, path=path.resolve(), fingerprint=fingerprint_dir(path, cache))


HF_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def resolve_hf(ref: str, cache_dir: Path | None = None) -> ResolvedModel:
    """hf://org/name@revision through huggingface_hub's own cache; the commit sha is the print.

    With HF_HUB_OFFLINE=1 (tests, air-gapped clusters) only the local cache is consulted.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    spec = ref.removeprefix("hf://")
    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") != 1:
        raise RefError(f"model ref {ref!r}: expected hf://org/name[@revision]")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        path = Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=HF_PATTERNS,
                                      local_files_only=offline))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise RefError(f"model ref {ref!r}: not in the local Hugging Face cache and offline mode is on") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise RefError(f"model ref {ref!r}: {type(exc).__name__}") from None
    except OSError as exc:
        raise TransientError(f"model ref {ref!r}: download failed ({exc})") from exc
    if not any(p.suffix in CHECKPOINT_SUFFIXES for p in path.iterdir()):
        raise RefError(f"model ref {ref!r}: snapshot has no .safetensors files")
    return ResolvedModel(ref=ref, path=path, fingerprint=f"hf-{repo_id.replace('/', '--')}-{path.name}")


def resolve_s3(ref: str, cache_dir: Path, endpoint_url: str | None = None) -> ResolvedModel:
    """s3://bucket/prefix: the print comes from remote metadata, so an unchanged model is not re-downloaded.

    When the prefix holds a `manifest.json` (a run published by metamerge) its file digests are
    the print and every download is verified against them; otherwise ETags and sizes are.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    from metamerge.storage import _s3_error, s3_client

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
    except (ClientError, BotoCoreError) as exc:
        err = _s3_error(client, f"download of {ref}", exc, bucket)
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


def resolve_ref(ref: str, cache_dir: Path | None = None, endpoint_url: str | None = None) -> ResolvedModel:
    """Turns a ref into a local folder plus a content fingerprint."""
    scheme = ref.split("://", 1)[0] if "://" in ref else "file"
    digest_cache = DigestCache(cache_dir / "digests.json" if cache_dir else None)
    if scheme == "file":
        return resolve_local(ref, digest_cache)
    if scheme == "s3":
        return resolve_s3(ref, Path(cache_dir or ".metamerge"), endpoint_url)
    if scheme == "hf":
        return resolve_hf(ref, cache_dir)
    raise RefError(f"model ref {ref!r}: scheme '{scheme}://' is not supported (local folder, s3://, hf://)")
