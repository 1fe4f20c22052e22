"""The stage that resolves refs, and how a worker gets an input on its own machine."""

from __future__ import annotations

from pathlib import Path

from metamerge.engine.lora import ADAPTER_CONFIG
from metamerge.errors import InputError, TransientError
from metamerge.io.digests import DigestCache
from metamerge.io.ranged import RemoteModel
from metamerge.io.shared import SharedStore
from metamerge.recipe import Recipe
from metamerge.refs import ResolvedModel, resolve_ref
from metamerge.refs.s3 import cache_folder, list_s3_model


def digest_cache(workdir: Path) -> DigestCache:
    return DigestCache.in_folder(workdir)


def resolve(ref: str, workdir: Path, endpoint_url: str | None = None, download: bool = True) -> ResolvedModel:
    """`download=False` (Dask with ranged reads): an s3:// ref is only listed; workers read it in place."""
    if not download and ref.startswith("s3://"):
        remote, _ = list_s3_model(ref, endpoint_url)
        if ADAPTER_CONFIG not in remote.files:  # a PEFT adapter is small and read whole: downloaded below
            return ResolvedModel(ref, cache_folder(Path(workdir), remote.fingerprint), remote.fingerprint)
    return resolve_ref(ref, Path(workdir), endpoint_url)


def reads_in_place(recipe: Recipe) -> bool:
    """Dask workers read s3:// inputs by byte range instead of downloading them (runner.inputs)."""
    return recipe.runner.kind == "dask" and recipe.runner.inputs == "ranged"


def input_source(model: ResolvedModel, store: SharedStore, ranged: bool) -> Path | RemoteModel:
    """Where a task on this machine reads `model` from: a local folder, or the S3 objects themselves.

    An s3:// input is read in place when `ranged` (`reads_in_place`) and the model is a full checkpoint
    (a PEFT adapter is small: it is downloaded). Its listing is made once per task and must
    give the print the run resolved; every ranged GET then checks the listed ETag.
    """
    if Path(model.path).exists() or not (ranged and model.ref.startswith("s3://")):
        return local_model(model, store).path
    remote, _ = list_s3_model(model.ref, store.endpoint_url)
    if remote.fingerprint != model.fingerprint:
        raise TransientError(f"{model.ref} changed since this run resolved it; re-run to merge the new version")
    if ADAPTER_CONFIG in remote.files:
        return local_model(model, store).path
    return remote


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
