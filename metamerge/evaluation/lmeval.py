"""The lm-eval backend: one model folder, some tasks, one primary score per task.

lm-eval runs in-process on the local HF checkpoint (no server, no hub); the primary metric of
a task is the first of a fixed preference list that the task reports.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from metamerge.errors import EvaluationError
from metamerge.evaluation.backend import EvalBackend, EvalSpec, Scores

PREFERRED_METRICS = ("acc,none", "exact_match,strict-match", "exact_match,none", "pass@1,none")


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


def primary_metric(task_result: Mapping[str, object]) -> tuple[str, float]:
    """The one number a task contributes to the table; accuracy first, as the paper's tables."""
    for key in PREFERRED_METRICS:
        value = task_result.get(key)
        if isinstance(value, int | float):
            return key, float(value)
    for key, value in task_result.items():
        if "," in key and "stderr" not in key and isinstance(value, int | float):
            return key, float(value)
    raise EvaluationError(f"lm-eval returned no numeric metric: {sorted(task_result)}")


def _model_args(model_dir: Path, spec: EvalSpec) -> dict[str, str]:
    """A full checkpoint is `pretrained`; a LoRA adapter is lm-eval's `peft` on its base."""
    if spec.adapter_base is not None:
        return {"pretrained": spec.adapter_base[0], "peft": str(model_dir), "dtype": "float32", "device": spec.device}
    return {"pretrained": str(model_dir), "dtype": "float32", "device": spec.device}


def lm_eval_scores(model_dir: Path, spec: EvalSpec) -> Scores:
    """Runs lm-eval offline on a local checkpoint; returns {task: {"score", "metric"}}."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lm_eval
    from lm_eval.tasks import TaskManager

    if spec.tasks_dir is not None:
        manager = TaskManager(include_path=str(spec.tasks_dir), include_defaults=False)
    else:
        manager = TaskManager()
    try:
        output = lm_eval.simple_evaluate(
            model="hf",
            model_args=_model_args(model_dir, spec),
            tasks=list(spec.tasks),
            task_manager=manager,
            batch_size=spec.batch_size,
            limit=spec.limit,
            log_samples=False,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    except Exception as exc:  # lm-eval raises many types; one clear line is what users need
        raise EvaluationError(f"lm-eval failed on {model_dir}: {type(exc).__name__}: {exc}") from exc
    if not output or "results" not in output:
        raise EvaluationError(f"lm-eval returned no results for {model_dir}")
    scores: dict[str, dict[str, float | str]] = {}
    for task in spec.tasks:
        if task not in output["results"]:
            raise EvaluationError(f"lm-eval returned no result for task {task!r} on {model_dir}")
        metric, value = primary_metric(output["results"][task])
        scores[task] = {"score": value, "metric": metric}
    return scores


LM_EVAL = EvalBackend("lm-eval", lm_eval_version, lm_eval_scores)
