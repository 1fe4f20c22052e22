"""Content digests of files and model folders, remembered across runs.

Caches are keyed by fingerprints of content, never by paths, so a fine-tune re-uploaded under
the same name is re-processed and an unchanged one is not. Hashing a 14 GB checkpoint takes
a while, so file digests are remembered per (path, size, mtime) in a small JSON sidecar.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from metamerge.io.outputs import TEMP_MARKER

_digest_lock = threading.Lock()


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class DigestCache:
    """Remembers file digests by (absolute path, size, mtime_ns) across processes."""

    FILE = "digests.json"

    def __init__(self, path: Path | None):
        self.path = path
        self._entries: dict[str, str] = {}
        if path is not None and path.exists():
            try:
                self._entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self._entries = {}

    @classmethod
    def in_folder(cls, folder: Path | None) -> DigestCache:
        """The sidecar a workdir (or cache folder) keeps; None: remember nothing."""
        return cls(Path(folder) / cls.FILE if folder is not None else None)

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
    entries = {file.relative_to(model_dir).as_posix(): {"size": file.stat().st_size, "sha256": cache.digest(file)}
               for file in model_files(model_dir)}
    cache.save()
    return fingerprint_of(entries)


def fingerprint_of(entries: dict[str, dict]) -> str:
    """`fingerprint_dir` of a folder known only by its listing {name: {size, sha256}} (hidden names skipped)."""
    outer = hashlib.sha256()
    for rel in sorted(entries):
        if not any(part.startswith(".") for part in rel.split("/")):
            outer.update(f"{rel}\0{entries[rel]['size']}\0{entries[rel]['sha256']}\n".encode())
    return outer.hexdigest()
