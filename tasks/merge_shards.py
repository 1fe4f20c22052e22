"""The merge split by output shard (runner: dask): plan, one task per shard, finalize."""

from __future__ import annotations

from prefect import task

from metamerge.pipeline import shards
from metamerge.pipeline.merge import MergeOutput
from metamerge.recipe import Recipe
from metamerge.refs import ResolvedModel
from metamerge_prefect.tasks.caching import finalize_key, merge_shard_key, plan_shards_key
from metamerge_prefect.tasks.payloads import coefficients_of
from metamerge_prefect.tasks.policy import NETWORK_RETRY

# shard files travel through S3 under `runner: dask`, so shard and finalize tasks retry like network stages


@task(name="plan-shards", task_run_name="plan shards", cache_key_fn=plan_shards_key, persist_result=True,
      **NETWORK_RETRY)
def plan_shards(recipe: Recipe, base: ResolvedModel) -> list[str]:
    """Output shard names from the base's header (how many shard tasks to start)."""
    return shards.plan_merge_shards(recipe, base)


@task(name="merge-shard", task_run_name="merge shard {index}", cache_key_fn=merge_shard_key, persist_result=True,
      **NETWORK_RETRY)
def merge_shard(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], solved: dict, index: int) -> dict:
    """One output shard, on whichever worker Dask picks; returns its report (and which worker)."""
    return shards.merge_output_shard(recipe, base, finetunes, coefficients_of(solved), index)


@task(name="finalize-merge", task_run_name="finalize merge", cache_key_fn=finalize_key, persist_result=True,
      **NETWORK_RETRY)
def finalize_merge(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], solved: dict,
                   shard_reports: list[dict]) -> MergeOutput:
    """Index + aux files + whole-checkpoint verification, then the merged folder is committed (and shared)."""
    return shards.finalize_sharded_merge(recipe, base, finetunes, coefficients_of(solved), shard_reports)
