"""The stage that resolves refs, and how a worker gets an input on its own machine."""

from __future__ import annotations

from pathlib import Path

from metamerge.errors import InputError, TransientError
from metamerge.io.digests import DigestCache
from metamerge.io.shared import SharedStore
from metamerge.recipe import Recipe
from metamerge.refs import ResolvedModel, resolve_ref


def digest_cache(workdir: Path) -> DigestCache:
    return DigestCache.in_folder(workdir)


def resolve(ref: str, workdir: Path, endpoint_url: str | None = None) -> ResolvedModel:
    return resolve_ref(ref, Path(workdir), endpoint_url)


def shared_store(recipe: Recipe) -> SharedStore:
    """How this recipe's workers share workdir files (an S3 location under `runner: dask`, else none)."""
    return SharedStore(str(Path(recipe.workdir).resolve()), recipe.shared_storage, recipe.endpoint_url)


def local_model(model: ResolvedModel, store: SharedStore) -> ResolvedModel:
    """The model on this machine. A worker that did not resolve a remote ref downloads it itself."""
    if Path(model.path).exists():
        return model
    if "://" in model.ref and not model.ref.startswith("file://"):
        again = resolve_ref(model.ref, Path(store.workdir), store.endpoint_url)
        if again.fingerprint != model.fingerprint:
            raise TransientError(f"{model.ref} changed since this run resolved it; re-run to merge the new version")
        return again
    raise InputError(f"{model.ref}: folder {model.path} is not on this machine; on a multi-machine cluster use "
                     "s3:// or hf:// refs, or a shared file system")
