"""The evaluate task: lm-eval on one (model, task), cached by both contents."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from metamerge.evaluation.backend import EvalSpec
from metamerge.io.shared import SharedStore
from metamerge.pipeline.evaluate import evaluate
from metamerge_prefect.tasks.caching import evaluate_key


@task(name="evaluate", task_run_name="evaluate {label} on {spec.tasks}", cache_key_fn=evaluate_key, persist_result=True)
def evaluate_model(label: str, model_path: str, fingerprint: str, spec: EvalSpec, workdir: str,
                   ref: str | None = None, store: SharedStore | None = None) -> dict:
    """lm-eval on one model; scores are cached by (model fingerprint, task spec, lm-eval version).

    On a Dask worker that lacks the model, `ref` (remote inputs) or `store` (the merged model) fetches it.
    """
    return evaluate(model_path, fingerprint, spec, Path(workdir), ref, store)
