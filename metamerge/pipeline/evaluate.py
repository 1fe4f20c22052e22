"""The evaluate stage: one (model, task) score, cached by the model's and the task's content."""

from __future__ import annotations

import json
from pathlib import Path

from metamerge.engine.lora import is_adapter
from metamerge.errors import writing
from metamerge.evaluation.backend import EvalBackend, EvalSpec
from metamerge.evaluation.lmeval import LM_EVAL
from metamerge.evaluation.scores import ScoreTable
from metamerge.io.atomic import write_atomic
from metamerge.io.shared import SharedStore
from metamerge.pipeline.inputs import local_model
from metamerge.pipeline.keys import short_hash, task_spec_hash
from metamerge.recipe import Recipe
from metamerge.refs import ResolvedModel

# the backend every evaluation uses (its version is part of each score's cache key)
EVALUATION: EvalBackend = LM_EVAL


def eval_spec(recipe: Recipe, tasks: tuple[str, ...], model: ResolvedModel | None = None,
              base: ResolvedModel | None = None) -> EvalSpec:
    """The evaluation of `tasks`; a LoRA adapter (`model`) is scored on top of `base`."""
    ev = recipe.evaluation
    assert ev is not None
    adapter_base = (str(base.path), base.fingerprint) if model is not None and base is not None and \
        is_adapter(model.path) else None
    return EvalSpec(tasks=tasks, tasks_dir=Path(ev.tasks_dir) if ev.tasks_dir else None,
                    limit=ev.limit, batch_size=ev.batch_size, device=ev.device, adapter_base=adapter_base)


def evaluate(model_path: str, model_fingerprint: str, spec: EvalSpec, workdir: Path,
             ref: str | None = None, store: SharedStore | None = None) -> dict[str, dict]:
    """Scores of one model; on a worker that lacks the model, `ref` or the shared store brings it."""
    out = Path(workdir) / "scores" / f"{short_hash(model_fingerprint, task_spec_hash(spec), EVALUATION.version())}.json"
    if out.exists():
        return json.loads(out.read_text())
    path = Path(model_path)
    if store is not None and not path.exists():
        if ref is not None:
            path = local_model(ResolvedModel(ref, path, model_fingerprint), store).path
        else:
            path = store.ensure_dir(path)
    scores = EVALUATION.scores(path, spec)
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, lambda tmp: tmp.write_text(json.dumps(scores, indent=1)))
    return scores


def score_table(recipe: Recipe, base_scores: dict, finetune_scores: dict[str, dict], merged_scores: dict) -> ScoreTable:
    rows = {"base": {t: v["score"] for t, v in base_scores.items()}}
    for label, scores in finetune_scores.items():
        rows[label] = {t: v["score"] for t, v in scores.items()}
    merged_label = f"merged ({recipe.method.name})"
    rows[merged_label] = {t: v["score"] for t, v in merged_scores.items()}
    own = {ft.label: tuple(ft.tasks) for ft in recipe.finetunes}
    return ScoreTable(rows=rows, own_tasks=own, merged_label=merged_label)
