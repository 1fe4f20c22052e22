"""merge_flow: resolve → extract (per fine-tune, concurrent) → solve → merge → evaluate → gate → publish."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from metamerge import stages
from metamerge.methods import plan_for
from metamerge.recipe import Recipe, load_recipe, parse_recipe
from tasks.evaluate import evaluate_model
from tasks.extract import extract_task_vector
from tasks.merge import merge_models
from tasks.publish import publish_model
from tasks.resolve import resolve_model
from tasks.solve import coefficients_of, solve_coefficients


def load(recipe: str | dict[str, Any] | Recipe) -> Recipe:
    """A path (CLI, deployments) or a mapping (event triggers, API calls) or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe, "<parameters>").resolve_paths(Path.cwd())
    return load_recipe(recipe)


@flow(name="metagpt-merge", log_prints=True)
def merge_flow(recipe: str | dict[str, Any], run_id: str | None = None) -> dict[str, Any]:
    logger = get_run_logger()
    rec = load(recipe)
    plan = plan_for(rec.method)
    workdir = str(Path(rec.workdir).resolve())
    Path(workdir).mkdir(parents=True, exist_ok=True)
    labels = [ft.label for ft in rec.finetunes]

    base_future = resolve_model.submit(rec.base, workdir)
    ft_futures = [resolve_model.submit(ft.ref, workdir) for ft in rec.finetunes]
    base = base_future.result()
    finetunes = [f.result() for f in ft_futures]
    logger.info("resolved base %s and %d fine-tunes", base.fingerprint[:12], len(finetunes))

    stats_futures = [
        extract_task_vector.submit(base, ft, label, plan, rec.merge.vocab, workdir)
        for ft, label in zip(finetunes, labels, strict=True)
    ]
    stats_files = [f.result() for f in stats_futures]
    solved = solve_coefficients(labels, stats_files, plan, rec.method.name)
    coefficients = coefficients_of(solved)
    logger.info("λ: %s", {k: round(v, 4) for k, v in coefficients.model_level().items()})

    merged = merge_models(rec, base, finetunes, solved)
    logger.info("merged into %s (%s)", merged.path, merged.fingerprint[:12])

    table = None
    if rec.evaluation is not None:
        all_tasks = tuple(dict.fromkeys(t for ft in rec.finetunes for t in ft.tasks))
        full = stages.eval_spec(rec, all_tasks)
        base_scores = evaluate_model("base", str(base.path), base.fingerprint, full, workdir)
        ft_scores = {
            ft.label: evaluate_model(ft.label, str(m.path), m.fingerprint, stages.eval_spec(rec, tuple(ft.tasks)), workdir)
            for ft, m in zip(rec.finetunes, finetunes, strict=True)
        }
        merged_scores = evaluate_model("merged", merged.path, merged.fingerprint, full, workdir)
        table = stages.score_table(rec, base_scores, ft_scores, merged_scores)
        create_table_artifact(key="merge-scores", table=table.as_records(),
                              description="absolute scores; avg_norm = merged score / own fine-tune's score")

    run_id = run_id or stages.run_id_for(merged.fingerprint)
    published = None
    documents = {
        "coefficients.json": coefficients.to_json(),
        "merge_report.json": json.dumps(merged.report, indent=1),
    }
    if table is not None:
        documents["scores.json"] = json.dumps(
            {"rows": table.rows, "records": table.as_records(), "merged": table.merged_label}, indent=1)
    if rec.publish is not None:
        documents["report.md"] = stages.report_markdown(rec, [base, *finetunes], coefficients, plan, merged.report,
                                                        table, None)
        published = publish_model(rec, merged, run_id, documents)
        logger.info("published %s", published["manifest_uri"])
    report = stages.report_markdown(rec, [base, *finetunes], coefficients, plan, merged.report, table,
                                    published["manifest_uri"] if published else None)
    create_markdown_artifact(key="merge-report", markdown=report, description=f"merge report {rec.name}")
    return {
        "recipe": rec.name,
        "run_id": run_id,
        "merged_path": merged.path,
        "merged_fingerprint": merged.fingerprint,
        "coefficients": coefficients.model_level(),
        "cosine": merged.report["cosine"],
        "scores": table.as_records() if table else None,
        "normalized_average": table.normalized_average(table.merged_label) if table else None,
        "published": published,
    }
