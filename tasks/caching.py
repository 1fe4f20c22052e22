"""Cache keys built from content fingerprints (never paths or timestamps) plus a code version.

A nightly run with nothing new then finds every stage in the cache and reads no tensor; a
run with one new fine-tune recomputes only what depends on it. Keys are deterministic; when
a cached stage's on-disk output has vanished, the flow asks for `refresh_cache` instead.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from metamerge.pipeline import evaluate as evaluate_stage
from metamerge.pipeline.keys import CODE_VERSION, merged_dir, ref_signature, short_hash, stats_path, task_spec_hash
from metamerge_prefect.tasks.payloads import coefficients_of


def resolve_key(_context: Any, params: dict[str, Any]) -> str | None:
    ref = params["ref"]
    if "://" in ref and not ref.startswith("file://"):
        return None  # remote refs ask the remote (cheap); their download is cached by fingerprint
    return short_hash("resolve", ref_signature(ref), CODE_VERSION)


def extract_key(_context: Any, params: dict[str, Any]) -> str:
    path = stats_path(params["base"], params["finetune"], params["label"], params["plan"],
                      params["vocab"], params["workdir"])
    return short_hash("extract", path.name)


def solve_key(_context: Any, params: dict[str, Any]) -> str:
    names = [str(p).rsplit("/", 1)[-1] for p in params["stats_files"]]
    return short_hash("solve", params["labels"], names, asdict(params["plan"]), params["method_name"], CODE_VERSION)


def merge_key(_context: Any, params: dict[str, Any]) -> str:
    out = merged_dir(params["recipe"], params["base"], params["finetunes"], coefficients_of(params["solved"]))
    return short_hash("merge", out.name)


def evaluate_key(_context: Any, params: dict[str, Any]) -> str:
    return short_hash("evaluate", params["fingerprint"], task_spec_hash(params["spec"]), evaluate_stage.EVALUATION.version())


def publish_key(_context: Any, params: dict[str, Any]) -> str:
    recipe = params["recipe"]
    return short_hash("publish", params["merged"].fingerprint, recipe.publish.model_dump(mode="json"), recipe.name,
                      sorted(params["documents"].items()), CODE_VERSION)


def history_key(_context: Any, params: dict[str, Any]) -> str:
    return short_hash("history", params["manifest_uri"], CODE_VERSION)


def asset_key(_context: Any, params: dict[str, Any]) -> str:
    """One materialization per publish: a night that published nothing new is Cached and emits nothing."""
    return short_hash("asset", params["published"]["manifest_uri"], CODE_VERSION)


def plan_shards_key(_context: Any, params: dict[str, Any]) -> str:
    merge = params["recipe"].merge
    return short_hash("plan-shards", params["base"].fingerprint, merge.dtype, merge.shard_size_mb, CODE_VERSION)


def merge_shard_key(context: Any, params: dict[str, Any]) -> str:
    return short_hash("merge-shard", merge_key(context, params), params["index"])


def finalize_key(context: Any, params: dict[str, Any]) -> str:
    return short_hash("finalize", merge_key(context, params))
