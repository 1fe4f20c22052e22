"""The extract task: task-vector statistics of one fine-tune (a compute stage: not retried)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from metamerge.io.shared import SharedStore
from metamerge.methods.plan import MergePlan
from metamerge.pipeline.extract import combine_parts, extract, extract_part, extract_together
from metamerge.recipe import Recipe
from metamerge.refs import ResolvedModel
from metamerge_prefect.tasks.caching import extract_key
from metamerge_prefect.tasks.policy import NETWORK_RETRY


@task(name="extract", task_run_name="extract {label}", cache_key_fn=extract_key, persist_result=True)
def extract_task_vector(base: ResolvedModel, finetune: ResolvedModel, label: str, plan: MergePlan,
                        vocab: str, workdir: str, store: SharedStore | None = None, ranged: bool = False) -> str:
    """Compute stage: deterministic, so not retried. Returns the stats file's path (also in `store`, if any)."""
    return str(extract(base, finetune, label, plan, vocab, Path(workdir), store, ranged))


@task(name="extract-together", task_run_name="extract {labels} in one pass over the base")
def extract_together_task(base: ResolvedModel, finetunes: list[ResolvedModel], labels: list[str], plan: MergePlan,
                          vocab: str, workdir: str) -> list[str]:
    """Several missing stats files at once: the base is read once, not once per fine-tune.

    Not cached itself: the stats files it writes are what the per-fine-tune `extract` tasks
    then find (and cache), so each fine-tune keeps its own cache entry.
    """
    return [str(p) for p in extract_together(base, finetunes, labels, plan, vocab, Path(workdir))]


# runner: dask with inputs read by range: extraction split like the merge, one task per output shard


@task(name="extract-part", task_run_name="extract part {index}", **NETWORK_RETRY)
def extract_part_task(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], labels: list[str],
                      plan: MergePlan, index: int) -> dict:
    """Per-tensor sums of one output shard's tensors: each worker reads its share of the inputs only.

    Not cached itself (like extract-together): the stats files the combine step writes are the cache.
    """
    return extract_part(recipe, base, finetunes, labels, plan, index)


@task(name="extract-combine", task_run_name="combine extraction of {labels}", **NETWORK_RETRY)
def combine_parts_task(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], labels: list[str],
                       plan: MergePlan, parts: list[dict]) -> list[str]:
    """The parts summed into each fine-tune's stats file (identical to one pass's), put in shared storage."""
    return [str(p) for p in combine_parts(recipe, base, finetunes, labels, plan, parts)]
