"""merge_flow: resolve → extract (per fine-tune, concurrent) → solve → merge → evaluate → publish.

Every stage is a cached task keyed by content fingerprints (tasks/caching.py): a nightly run
with nothing new finishes in seconds with every stage `Cached`; one new fine-tune re-runs
only its extraction and what depends on the merge.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from flows.scaleout import merge_by_shard, on_dask, run_on_dask
from metamerge import progress, stages
from metamerge.errors import TransientError
from metamerge.methods import plan_for
from metamerge.preflight import check_disk, merge_disk_needs, preflight
from metamerge.recipe import Recipe, load_recipe, parse_recipe
from metamerge.registry import entry_for_ref, extend_recipe
from tasks.evaluate import evaluate_model
from tasks.extract import extract_task_vector
from tasks.gate import check_quality_gate
from tasks.merge import merge_models
from tasks.publish import publish_model
from tasks.resolve import resolve_model
from tasks.result_storage import result_storage_for
from tasks.solve import coefficients_of, solve_coefficients


def load(recipe: str | dict[str, Any] | Recipe) -> Recipe:
    """A path (CLI, deployments) or a mapping (event triggers, API calls) or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe, "<parameters>").resolve_paths(Path.cwd())
    return load_recipe(recipe)


def publish_cached_only_if_intact(publish_task, rec: Recipe, merged: stages.MergeOutput, run_id: str,
                                  asked_run_id: str | None, documents: dict[str, str],
                                  normalized_average: float | None) -> dict[str, Any]:
    """The publish task, whose cached result is trusted only while what it claims is still stored.

    Before the call: is the publication still there (latest.json → a manifest of this merge and
    these documents → every listed object present)? If not, the cache is refreshed and the
    publish really runs (idempotent: objects still there are skipped). After a cache hit, its
    manifest must be the one just checked; a result cached elsewhere that points at another run
    is not trusted either. Validation rather than a key that folds in existence: the published
    location depends on the cached result itself (its run id carries the day it was made), and
    a key that changes whenever objects vanish would leave stale entries that match again later.
    """
    try:
        intact = stages.published_intact(rec, merged.fingerprint, documents, asked_run_id)
    except TransientError:
        intact = None  # cannot tell: publish again (the task retries, uploads are idempotent)
    args = (rec, merged, run_id, documents, normalized_average)
    published = publish_task.with_options(refresh_cache=intact is None)(*args)
    if intact is not None and published["manifest_uri"] != intact:
        published = publish_task.with_options(refresh_cache=True)(*args)
    return published


@flow(name="metagpt-merge", log_prints=True)
def merge_flow(recipe: str | dict[str, Any], run_id: str | None = None,
               finetune_refs: list[str] | None = None) -> dict[str, Any]:
    """`finetune_refs` (from a `model.finetune.discovered` event) extends the recipe's fine-tunes."""
    logger = get_run_logger()
    clock = progress.StageClock()
    rec = load(recipe)
    if finetune_refs:
        rec = extend_recipe(rec, [entry_for_ref(ref, rec.endpoint_url) for ref in finetune_refs])
    if rec.runner.kind == "dask" and not on_dask():
        return run_on_dask(merge_flow, rec, run_id)  # the same flow, as a subflow whose tasks run on Dask
    dask = rec.runner.kind == "dask"
    with clock.stage("preflight"):  # seconds, before any heavy stage: targets, buckets, credentials, disk
        checks = preflight(rec)
    for warning in (c for c in checks if c.startswith("warning: ")):
        logger.warning(warning.removeprefix("warning: "))
    logger.info("preflight passed: %s", "; ".join(c for c in checks if not c.startswith("warning: ")))
    store = stages.shared_store(rec) if dask else None
    storage = result_storage_for(rec.results, rec.endpoint_url)
    opts = {"result_storage": storage} if storage is not None else {}
    resolve_task, extract_task, solve_task, merge_task, evaluate_task, publish_task = (
        t.with_options(**opts) for t in (resolve_model, extract_task_vector, solve_coefficients, merge_models,
                                         evaluate_model, publish_model))
    plan = plan_for(rec.method)
    workdir = str(Path(rec.workdir).resolve())
    Path(workdir).mkdir(parents=True, exist_ok=True)
    labels = [ft.label for ft in rec.finetunes]

    with clock.stage("resolve"):
        base_future = resolve_task.submit(rec.base, workdir, rec.endpoint_url)
        ft_futures = [resolve_task.submit(ft.ref, workdir, rec.endpoint_url) for ft in rec.finetunes]
        base = base_future.result()
        finetunes = [f.result() for f in ft_futures]
    logger.info("resolved base %s and %d fine-tunes", base.fingerprint[:12], len(finetunes))

    with clock.stage("extract"):
        stats_futures = []
        for ft, label in zip(finetunes, labels, strict=True):
            stats = stages.stats_path(base, ft, label, plan, rec.merge.vocab, workdir)
            missing = not (store.exists(stats) if store else stats.exists())
            extract = extract_task.with_options(refresh_cache=missing)
            stats_futures.append(extract.submit(base, ft, label, plan, rec.merge.vocab, workdir, store))
        stats_files = [f.result() for f in stats_futures]
    stats = stages.load_stats(stats_files, store)
    norms = stages.check_task_vectors(rec, stats)  # fails naming a "fine-tune" that is no fine-tune of the base
    dropped = stages.dropped_vocab_rows(stats)
    logger.info("‖τ‖/‖θ₀‖: %s", {k: round(v, 4) for k, v in norms.items()})
    for line in stages.vocab_summary(dropped):
        logger.warning(line)
    with clock.stage("solve"):
        solved = solve_task(labels, stats_files, plan, rec.method.name, store)
    coefficients = coefficients_of(solved)
    logger.info("λ: %s", {k: round(v, 4) for k, v in coefficients.model_level().items()})

    with clock.stage("merge"):
        if dask:  # one task per output shard, spread over the workers; then a small finalize task
            missing = not stages.merge_available(rec, base, finetunes, coefficients)
            merged = merge_by_shard(rec, base, finetunes, solved, opts, refresh=missing)
        else:
            missing = not stages.merge_intact(stages.merged_dir(rec, base, finetunes, coefficients))
            if missing:  # the precise disk check, now that the merge is known to be needed
                check_disk(merge_disk_needs(rec, base.path))
            merged = merge_task.with_options(refresh_cache=missing)(rec, base, finetunes, solved)
    create_table_artifact(key="task-vector-cosine", table=stages.cosine_records(merged.report),
                          description="cosine of task vectors; MetaGPT assumes off-diagonal ≈ 0")
    logger.info("merged into %s (%s)", merged.path, merged.fingerprint[:12])

    table = None
    if rec.evaluation is not None:
        with clock.stage("evaluate"):
            # one (model, task) per cached evaluation: adding a fine-tune (and its task) leaves
            # every existing score in the cache
            all_tasks = list(dict.fromkeys(t for ft in rec.finetunes for t in ft.tasks))

            # under Dask they are submitted all at once (one worker each); locally one after the other
            def scores_of(label: str, path: str, fingerprint: str, tasks: list[str], ref: str | None = None) -> list:
                specs = [stages.eval_spec(rec, (task_name,)) for task_name in tasks]
                if dask:
                    return [evaluate_task.submit(label, path, fingerprint, spec, workdir, ref, store) for spec in specs]
                return [evaluated(evaluate_task(label, path, fingerprint, spec, workdir)) for spec in specs]

            count = [0, (2 + len(rec.finetunes)) * len(all_tasks)]  # base, merged and every fine-tune

            def evaluated(scores: dict) -> dict:
                count[0] += 1
                progress.advance("evaluate", count[0], max(count))
                return scores

            def collect(parts: list) -> dict:
                return {k: v for part in parts for k, v in (part.result() if dask else part).items()}

            base_parts = scores_of("base", str(base.path), base.fingerprint, all_tasks, base.ref)
            ft_parts = {ft.label: scores_of(ft.label, str(m.path), m.fingerprint, list(ft.tasks), m.ref)
                        for ft, m in zip(rec.finetunes, finetunes, strict=True)}
            merged_parts = scores_of("merged", merged.path, merged.fingerprint, all_tasks)
            base_scores = collect(base_parts)
            ft_scores = {label: collect(parts) for label, parts in ft_parts.items()}
            merged_scores = collect(merged_parts)
        table = stages.score_table(rec, base_scores, ft_scores, merged_scores)
        create_table_artifact(key="merge-scores", table=table.as_records(),
                              description="absolute scores; avg_norm = merged score / own fine-tune's score")

    normalized_average = table.normalized_average(table.merged_label) if table is not None else None
    gate = None
    if rec.gate is not None and normalized_average is not None:
        with clock.stage("gate"):
            gate = check_quality_gate(rec, normalized_average)
        create_table_artifact(key="quality-gate", table=gate.as_records(), description=gate.summary())
        logger.info(gate.summary())

    asked_run_id = run_id
    run_id = run_id or stages.run_id_for(merged.fingerprint)
    published = None
    # the report shows the norms checked above and the vocabulary rows each fine-tune lost
    report_data = {**merged.report, "relative_norms": norms, "dropped_rows": dropped}
    documents = {
        "coefficients.json": coefficients.to_json(),
        "merge_report.json": json.dumps(merged.report, indent=1),
        "report.md": stages.report_markdown(rec, [base, *finetunes], coefficients, plan, report_data, table, None),
    }
    if table is not None:
        documents["scores.json"] = json.dumps(
            {"rows": table.rows, "records": table.as_records(), "merged": table.merged_label}, indent=1)
    if gate is not None and not gate.passed:
        report = stages.report_markdown(rec, [base, *finetunes], coefficients, plan, report_data, table, None,
                                        clock.seconds, gate)
        create_markdown_artifact(key="merge-report", markdown=report, description=f"merge report {rec.name} (gate failed)")
        gate.raise_if_failed()  # the run ends Failed, with the score table and the gate's checks as artifacts
    if rec.publish is not None:
        with clock.stage("publish"):
            published = publish_cached_only_if_intact(publish_task, rec, merged, run_id, asked_run_id, documents,
                                                      normalized_average)
        create_link_artifact(key="published-manifest", link=published["manifest_uri"],
                             link_text=published["manifest_uri"], description="manifest of the published merge")
        logger.info("published %s", published["manifest_uri"])
    report = stages.report_markdown(rec, [base, *finetunes], coefficients, plan, report_data, table,
                                    published["manifest_uri"] if published else None, clock.seconds, gate)
    create_markdown_artifact(key="merge-report", markdown=report, description=f"merge report {rec.name}")
    return {
        "recipe": rec.name,
        "run_id": published["run_uri"].rsplit("/", 1)[-1] if published else run_id,
        "merged_path": merged.path,
        "merged_fingerprint": merged.fingerprint,
        "coefficients": coefficients.model_level(),
        "relative_norms": norms,
        "dropped_rows": dropped,
        "cosine": merged.report["cosine"],
        "scores": table.as_records() if table else None,
        "normalized_average": normalized_average,
        "gate": gate.summary() if gate is not None else None,
        "published": published,
        "stage_seconds": clock.seconds,
    }
