"""Every published merge as a Prefect asset, with the base and each fine-tune as upstream assets.

Prefect derives lineage from the materialization event: the published run's URI is the asset,
its upstream assets are the inputs' refs, and the event's payload carries λ, the normalized
average and the run ids. Prefect Cloud draws the asset graph from these events; a self-hosted
server keeps them in its event feed (docs/operations.md).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect.assets import Asset, AssetProperties, add_asset_metadata, materialize

from metamerge.refs import ResolvedModel
from metamerge_prefect.tasks.caching import asset_key

# what Prefect refuses in an asset key (prefect.types.names.RESTRICTED_ASSET_CHARACTERS)
_RESTRICTED = set("\n\r\t\0 #?&%\"'<>[]{}|\\^`")
_MAX_KEY = 512


def asset_uri(ref: str) -> str:
    """A ref as a valid asset key: local paths become file:// URIs; refused characters become '_'."""
    uri = ref if "://" in ref else "file://" + Path(ref).resolve().as_posix()
    uri = "".join("_" if c in _RESTRICTED else c for c in uri)
    if len(uri) > _MAX_KEY:  # keep the scheme and the tail readable, the digest keeps it unique
        digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
        uri = uri[: _MAX_KEY - 18 - 64] + "~" + digest + "~" + uri[-64:]
    return uri


def input_asset(model: ResolvedModel, role: str) -> Asset:
    return Asset(key=asset_uri(model.ref),
                 properties=AssetProperties(name=role, description=f"{role}; sha256 {model.fingerprint[:16]}"))


@materialize("metamerge://published-merge", by="metamerge", name="register-asset", task_run_name="register asset",
             cache_key_fn=asset_key, persist_result=True)
def _materialize(published: dict, metadata: dict[str, Any]) -> str:
    key = asset_uri(published["run_uri"])
    add_asset_metadata(key, metadata)
    return key


def register_published_asset(published: dict, recipe_name: str, method: str, base: ResolvedModel,
                             finetunes: dict[str, ResolvedModel], metadata: dict[str, Any],
                             **task_options: Any) -> str:
    """Emits the materialization of this publish (once: later nights with nothing new are Cached)."""
    lambdas = ", ".join(f"{label} {value:.4f}" for label, value in (metadata.get("lambda") or {}).items())
    quality = metadata.get("normalized_average")
    merged = Asset(key=asset_uri(published["run_uri"]),
                   properties=AssetProperties(
                       name=f"{recipe_name} {published['run_uri'].rsplit('/', 1)[-1]}",
                       description=(f"{method} merge of {len(finetunes)} fine-tunes of {base.ref}; λ: {lambdas}; "
                                    f"normalized average: {'not evaluated' if quality is None else f'{quality:.3f}'}; "
                                    f"run {metadata.get('run_id')} (flow run {metadata.get('flow_run_id')}); "
                                    f"manifest {published['manifest_uri']}")[:2500]))
    upstream = [input_asset(base, "base")] + [input_asset(m, f"fine-tune {label}") for label, m in finetunes.items()]
    task = _materialize.with_options(assets=[merged], asset_deps=upstream, **task_options)
    return task(published, metadata)
