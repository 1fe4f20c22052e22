from __future__ import annotations

from pathlib import Path

from prefect import task

from metamerge import stages
from metamerge.methods import MergePlan
from metamerge.refs import ResolvedModel
from metamerge.shared import SharedStore
from tasks.caching import extract_key


@task(name="extract", task_run_name="extract {label}", cache_key_fn=extract_key, persist_result=True)
def extract_task_vector(base: ResolvedModel, finetune: ResolvedModel, label: str, plan: MergePlan,
                        vocab: str, workdir: str, store: SharedStore | None = None) -> str:
    """Compute stage: deterministic, so not retried. Returns the stats file's path (also in `store`, if any)."""
    return str(stages.extract(base, finetune, label, plan, vocab, Path(workdir), store))
