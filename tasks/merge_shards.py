"""The merge split by output shard: plan → one task per shard (any worker) → finalize (DESIGN.md §9).

Used under `runner: dask`: each shard task reads only its shard's tensors from every input,
so shard tasks spread over the cluster's workers; the small finalize task writes the index,
copies config/tokenizer, verifies the whole checkpoint and commits it.
"""

from __future__ import annotations

from prefect import task

from metamerge import stages
from metamerge.recipe import Recipe
from metamerge.refs import ResolvedModel
from tasks.caching import finalize_key, merge_shard_key, plan_shards_key
from tasks.policy import JITTER, NETWORK_BACKOFF, NETWORK_RETRIES, retry_unless_input_error
from tasks.solve import coefficients_of

# shard files travel through S3 under `runner: dask`, so shard and finalize tasks retry like network stages
_RETRY = {"retries": NETWORK_RETRIES, "retry_delay_seconds": NETWORK_BACKOFF, "retry_jitter_factor": JITTER,
          "retry_condition_fn": retry_unless_input_error}


@task(name="plan-shards", task_run_name="plan shards", cache_key_fn=plan_shards_key, persist_result=True, **_RETRY)
def plan_shards(recipe: Recipe, base: ResolvedModel) -> list[str]:
    """Output shard names from the base's header (how many shard tasks to start)."""
    return stages.plan_merge_shards(recipe, base)


@task(name="merge-shard", task_run_name="merge shard {index}", cache_key_fn=merge_shard_key, persist_result=True,
      **_RETRY)
def merge_shard(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], solved: dict, index: int) -> dict:
    """One output shard, on whichever worker Dask picks; returns its report (and which worker)."""
    return stages.merge_shard(recipe, base, finetunes, coefficients_of(solved), index)


@task(name="finalize-merge", task_run_name="finalize merge", cache_key_fn=finalize_key, persist_result=True,
      **_RETRY)
def finalize_merge(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], solved: dict,
                   shards: list[dict]) -> stages.MergeOutput:
    """Index + aux files + whole-checkpoint verification, then the merged folder is committed (and shared)."""
    return stages.finalize_merge(recipe, base, finetunes, coefficients_of(solved), shards)
