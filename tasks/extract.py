"""The extract task: task-vector statistics of one fine-tune (a compute stage: not retried)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from metamerge.io.shared import SharedStore
from metamerge.methods.plan import MergePlan
from metamerge.pipeline.extract import extract
from metamerge.refs import ResolvedModel
from metamerge_prefect.tasks.caching import extract_key


@task(name="extract", task_run_name="extract {label}", cache_key_fn=extract_key, persist_result=True)
def extract_task_vector(base: ResolvedModel, finetune: ResolvedModel, label: str, plan: MergePlan,
                        vocab: str, workdir: str, store: SharedStore | None = None) -> str:
    """Compute stage: deterministic, so not retried. Returns the stats file's path (also in `store`, if any)."""
    return str(extract(base, finetune, label, plan, vocab, Path(workdir), store))
