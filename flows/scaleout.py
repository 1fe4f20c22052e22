"""Running merge_flow on Dask (`runner: dask` in the recipe): the task runner, and the merge by shard.

The recipe is read inside the flow, but a flow's task runner is fixed when it starts; so the
entry flow re-runs itself as a subflow with a DaskTaskRunner (an existing scheduler's address,
or a LocalCluster it starts and stops). Inside that subflow every `.submit` goes to the cluster.
"""

from __future__ import annotations

import contextlib
from typing import Any

import dask
from prefect import Flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext
from prefect.futures import as_completed
from prefect.settings import get_current_settings
from prefect_dask import DaskTaskRunner

from metamerge.errors import InputError
from metamerge.methods.plan import MergePlan
from metamerge.pipeline.merge import MergeOutput
from metamerge.recipe import DaskCluster, Recipe, Runner
from metamerge.refs import ResolvedModel
from metamerge_prefect.tasks.extract import combine_parts_task, extract_part_task
from metamerge_prefect.tasks.merge_shards import finalize_merge, merge_shard, plan_shards


def task_runner_for(runner: Runner, api_url: str | None = None) -> DaskTaskRunner:
    """An existing scheduler (`address`) or a LocalCluster built from `cluster` (default 2 × 1 thread)."""
    if runner.address:
        return DaskTaskRunner(address=runner.address)
    spec = runner.cluster or DaskCluster()
    kwargs: dict[str, Any] = {"n_workers": spec.n_workers, "threads_per_worker": spec.threads_per_worker,
                              "memory_limit": spec.memory_limit, "processes": spec.processes}
    if api_url and spec.processes:
        kwargs["env"] = {"PREFECT_API_URL": api_url}  # workers report task runs to the same server
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


def on_dask() -> bool:
    context = FlowRunContext.get()
    return context is not None and isinstance(context.task_runner, DaskTaskRunner)


def run_on_dask(flow: Flow, recipe: Recipe, run_id: str | None, **parameters: Any) -> Any:
    """Runs `flow` again as a subflow whose tasks go to Dask; returns its result."""
    api_url = get_current_settings().api.url
    if not api_url:
        raise InputError("runner: dask needs a Prefect API server that the Dask workers can reach: start one "
                         "(`prefect server start`) and set PREFECT_API_URL (docs/scaling.md)")
    runner = task_runner_for(recipe.runner, api_url)
    return flow.with_options(task_runner=runner)(recipe.model_dump(mode="json", by_alias=True), run_id, **parameters)


def gpu_worker_count(resource: str) -> int:
    """Workers of this run's cluster that declare `resource` (Dask worker resources) at least once."""
    context = FlowRunContext.get()
    assert context is not None and isinstance(context.task_runner, DaskTaskRunner)
    workers = context.task_runner.client.scheduler_info(n_workers=-1)["workers"].values()
    return sum(1 for worker in workers if worker.get("resources", {}).get(resource, 0) >= 1)


def placed(on_gpu: bool, resource: str) -> contextlib.AbstractContextManager:
    """Tasks submitted inside go only to workers that declare `resource` (when `on_gpu`)."""
    return dask.annotate(resources={resource: 1}) if on_gpu else contextlib.nullcontext()


def extract_by_shard(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], labels: list[str],
                     plan: MergePlan, options: dict[str, Any]) -> list[dict]:
    """Extraction split like the merge: one part per output shard, then one combine; returns what each
    part fetched, where (the per-fine-tune extract tasks then find the stats files)."""
    names = plan_shards.with_options(**options).submit(recipe, base).result()
    futures = [extract_part_task.with_options(**options).submit(recipe, base, finetunes, labels, plan, index)
               for index in range(len(names))]
    parts = [future.result() for future in futures]
    combine_parts_task.with_options(**options).submit(recipe, base, finetunes, labels, plan, parts).result()
    return [{k: part[k] for k in ("index", "worker", "bytes_fetched")} for part in parts]


def merge_by_shard(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], solved: dict,
                   options: dict[str, Any], refresh: bool, on_gpu: bool = False) -> MergeOutput:
    """plan → one task per output shard (spread over workers) → finalize; a progress artifact per shard."""
    planner, shard_task, finalizer = (t.with_options(**options, refresh_cache=refresh)
                                      for t in (plan_shards, merge_shard, finalize_merge))
    names = planner.submit(recipe, base).result()
    progress_id = create_progress_artifact(progress=0.0, key="merge-progress", description="output shards merged")
    with placed(on_gpu, recipe.runner.gpu_resource):
        futures = [shard_task.submit(recipe, base, finetunes, solved, index) for index in range(len(names))]
    shards = []
    for future in as_completed(futures):
        shards.append(future.result())
        update_progress_artifact(progress_id, progress=100.0 * len(shards) / len(futures))
    return finalizer.submit(recipe, base, finetunes, solved, sorted(shards, key=lambda s: s["index"])).result()
