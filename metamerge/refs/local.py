"""Local folders (and file:// refs): the fingerprint hashes every file, with remembered digests."""

from __future__ import annotations

from pathlib import Path

from metamerge.errors import RefError
from metamerge.io.digests import DigestCache, fingerprint_dir
from metamerge.refs.resolved import CHECKPOINT_SUFFIXES, ResolvedModel


def resolve_local(ref: str, cache: DigestCache | None = None) -> ResolvedModel:
    path = Path(ref.removeprefix("file://")).expanduser()
    if not path.exists():
        raise RefError(f"model ref {ref!r}: no such folder")
    if not path.is_dir():
        raise RefError(f"model ref {ref!r}: not a folder")
    if not any(p.suffix in CHECKPOINT_SUFFIXES for p in path.iterdir()):
        raise RefError(f"model ref {ref!r}: folder has no .safetensors files")
    return ResolvedModel(ref=ref, path=path.resolve(), fingerprint=fingerprint_dir(path, cache))


def resolve(ref: str, cache_dir: Path | None = None, endpoint_url: str | None = None) -> ResolvedModel:
    """The scheme table's entry: file digests are remembered in `<cache_dir>/digests.json`."""
    return resolve_local(ref, DigestCache.in_folder(cache_dir))
