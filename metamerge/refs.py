"""Model references: where a checkpoint lives, and a fingerprint of what it contains.

Caches are keyed by fingerprints of content, never by paths, so a fine-tune re-uploaded under
the same name is re-processed and an unchanged one is not. Hashing a 14 GB checkpoint takes
a while, so file digests are remembered per (path, size, mtime) in a small JSON sidecar.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from metamerge.errors import RefError

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


def resolve_ref(ref: str, cache_dir: Path | None = None) -> ResolvedModel:
    """Turns a ref into a local folder plus a content fingerprint."""
    scheme = ref.split("://", 1)[0] if "://" in ref else "file"
    digest_cache = DigestCache(cache_dir / "digests.json" if cache_dir else None)
    if scheme == "file":
        return resolve_local(ref, digest_cache)
    raise RefError(f"model ref {ref!r}: scheme '{scheme}://' is not supported (use a local folder)")
