"""The merge task: one streaming merge, with a progress artifact the UI updates while it runs."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from metamerge import progress
from metamerge.pipeline.merge import MergeOutput, merge
from metamerge.recipe import Recipe
from metamerge.refs import ResolvedModel
from metamerge_prefect.tasks.caching import merge_key
from metamerge_prefect.tasks.payloads import coefficients_of


@task(name="merge", task_run_name="merge", cache_key_fn=merge_key, persist_result=True)
def merge_models(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], solved: dict) -> MergeOutput:
    """Streams the merge; a progress artifact moves in 5 % steps while it runs."""
    progress_id = create_progress_artifact(progress=0.0, key="merge-progress", description="tensors merged (bytes)")
    last = [0.0]

    def on_progress(done: int, total: int, _name: str) -> None:
        progress.advance("merge", done, total)  # the CLI's view
        pct = 100.0 * done / max(total, 1)
        if pct - last[0] >= 5 or done == total:
            last[0] = pct
            update_progress_artifact(progress_id, progress=pct)

    return merge(recipe, base, finetunes, coefficients_of(solved), progress=on_progress)
