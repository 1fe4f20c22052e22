"""Scores models with lm-eval and turns scores into the paper's normalized table.

The paper reports, per task, the merged model's score divided by the score of the fine-tune
trained for that task ("Nor"); a merge is judged on the average of those ratios. The quality
gate uses the same number, so what the table shows is what decides publishing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from metamerge.errors import EvaluationError

PREFERRED_METRICS = ("acc,none", "exact_match,strict-match", "exact_match,none", "pass@1,none")


@dataclass(frozen=True)
class EvalSpec:
    tasks: tuple[str, ...]
    tasks_dir: Path | None = None
    limit: int | None = None
    batch_size: int = 16
    device: str = "cpu"


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


def evaluate_model(model_dir: Path, spec: EvalSpec) -> dict[str, dict[str, float | str]]:
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
            model_args={"pretrained": str(model_dir), "dtype": "float32", "device": spec.device},
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


@dataclass(frozen=True)
class ScoreTable:
    """Rows: model label -> {task: score}; `own_task` maps each fine-tune label to its tasks."""

    rows: dict[str, dict[str, float]]
    own_tasks: dict[str, tuple[str, ...]]
    merged_label: str

    def reference_scores(self) -> dict[str, float]:
        """Each task's denominator: the score of the fine-tune trained for it."""
        ref: dict[str, float] = {}
        for label, tasks in self.own_tasks.items():
            for task in tasks:
                ref[task] = self.rows[label][task]
        return ref

    def normalized(self, label: str) -> dict[str, float]:
        ref = self.reference_scores()
        row = self.rows[label]
        return {t: (row[t] / ref[t] if ref[t] > 0 else 0.0) for t in ref if t in row}

    def normalized_average(self, label: str) -> float:
        values = list(self.normalized(label).values())
        return sum(values) / len(values) if values else 0.0

    def tasks(self) -> list[str]:
        return list(self.reference_scores())

    def as_records(self) -> list[dict[str, object]]:
        """One record per model row, in a form both markdown and Prefect tables accept."""
        records = []
        tasks = self.tasks()
        for label, row in self.rows.items():
            record: dict[str, object] = {"model": label}
            for task in tasks:
                record[task] = round(row[task], 4) if task in row else None
            present = [row[t] for t in tasks if t in row]
            record["avg_abs"] = round(sum(present) / len(present), 4) if present else None
            if all(t in row for t in tasks):
                record["avg_norm"] = round(self.normalized_average(label), 4)
            else:
                record["avg_norm"] = None
            records.append(record)
        return records

    def to_markdown(self) -> str:
        records = self.as_records()
        headers = list(records[0]) if records else ["model"]
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        for rec in records:
            cells = ["" if rec[h] is None else (f"{rec[h]:.3f}" if isinstance(rec[h], float) else str(rec[h])) for h in headers]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
