from __future__ import annotations

from prefect import task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from tqdm import tqdm

from metamerge import stages
from metamerge.recipe import Recipe
from metamerge.refs import ResolvedModel
from tasks.caching import merge_key
from tasks.solve import coefficients_of


@task(name="merge", task_run_name="merge", cache_key_fn=merge_key, persist_result=True)
def merge_models(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], solved: dict) -> stages.MergeOutput:
    """Streams the merge; a progress artifact moves in 5 % steps while it runs."""
    progress_id = create_progress_artifact(progress=0.0, key="merge-progress", description="tensors merged (bytes)")
    last = [0.0]
    bar = tqdm(total=1, unit="B", unit_scale=True, desc="merge", disable=None)  # the CLI's view

    def on_progress(done: int, total: int, _name: str) -> None:
        bar.total = total
        bar.update(done - bar.n)
        pct = 100.0 * done / max(total, 1)
        if pct - last[0] >= 5 or done == total:
            last[0] = pct
            update_progress_artifact(progress_id, progress=pct)

    coefficients = coefficients_of(solved)
    try:
        output = stages.merge(recipe, base, finetunes, coefficients, progress=on_progress)
    finally:
        bar.close()
    create_table_artifact(key="task-vector-cosine", table=stages.cosine_records(output.report),
                          description="cosine of task vectors; MetaGPT assumes off-diagonal ≈ 0")
    return output
