"""Model references: where a checkpoint lives, and a fingerprint of what it contains.

A ref is `<scheme>://...` or a local path. Each scheme is one module with one function
`(ref, cache_dir, endpoint_url) -> ResolvedModel`, listed in SCHEMES: supporting `gs://` means
writing `metamerge/refs/gs.py` and adding one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from metamerge.errors import RefError
from metamerge.refs import hf, local, s3
from metamerge.refs.resolved import CHECKPOINT_SUFFIXES, ResolvedModel

Resolver = Callable[[str, Path | None, str | None], ResolvedModel]

SCHEMES: dict[str, Resolver] = {
    "file": local.resolve,
    "s3": s3.resolve,
    "hf": hf.resolve,
}


def scheme_of(ref: str) -> str:
    return ref.split("://", 1)[0] if "://" in ref else "file"


def resolve_ref(ref: str, cache_dir: Path | None = None, endpoint_url: str | None = None) -> ResolvedModel:
    """Turns a ref into a local folder plus a content fingerprint."""
    scheme = scheme_of(ref)
    resolver = SCHEMES.get(scheme)
    if resolver is None:
        raise RefError(f"model ref {ref!r}: scheme '{scheme}://' is not supported (local folder, s3://, hf://)")
    return resolver(ref, cache_dir, endpoint_url)


__all__ = ["CHECKPOINT_SUFFIXES", "SCHEMES", "ResolvedModel", "resolve_ref", "scheme_of"]
