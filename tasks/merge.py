from __future__ import annotations

from prefect import task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from metamerge import progress, stages
from metamerge.recipe import Recipe
from metamerge.refs import ResolvedModel
from tasks.caching import merge_key
from tasks.solve import coefficients_of


@task(name="merge", task_run_name="merge", cache_key_fn=merge_key, persist_result=True)
def merge_models(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], solved: dict) -> stages.MergeOutput:
    """Streams the merge; a progress artifact moves in 5 % steps while it runs."""
    progress_id = create_progress_artifact(progress=0.0, key="merge-progress", description="tensors merged (bytes)")
    last = [0.0]

    def on_progress(done: int, total: int, _name: str) -> None:
        progress.advance("merge", done, total)  # the CLI's view
        pct = 100.0 * done / max(total, 1)
        if pct - last[0] >= 5 or done == total:
            last[0] = pct
            update_progress_artifact(progress_id, progress=pct)

    coefficients = coefficients_of(solved)
    output = stages.merge(recipe, base, finetunes, coefficients, progress=on_progress)
    create_table_artifact(key="task-vector-cosine", table=stages.cosine_records(output.report),
                          description="cosine of task vectors; MetaGPT assumes off-diagonal ≈ 0")
    return output
