"""merge_flow: resolve → extract (per fine-tune, concurrent) → solve → merge → evaluate → gate → publish.

Every stage is a cached task keyed by content fingerprints (tasks/caching.py): a nightly run
with nothing new finishes in seconds with every stage `Cached`; one new fine-tune re-runs
only its extraction and what depends on the merge. This module only wires tasks together:
what a stage does, when its cached output is stale and what the report says live in
`metamerge.pipeline`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from metamerge import progress
from metamerge.faults import rendezvous
from metamerge.methods.registry import plan_for
from metamerge.pipeline.evaluate import eval_spec, score_table
from metamerge.pipeline.extract import (
    check_task_vectors,
    dropped_vocab_rows,
    load_stats,
    stats_available,
    vocab_summary,
)
from metamerge.pipeline.finetunes import entry_for_ref, extend_recipe
from metamerge.pipeline.inputs import reads_in_place, shared_store
from metamerge.pipeline.keys import run_id_for
from metamerge.pipeline.merge import merge_available
from metamerge.pipeline.placement import place
from metamerge.pipeline.preflight import preflight
from metamerge.pipeline.report import cosine_records, report_inputs, report_markdown, run_documents
from metamerge.recipe import load_any
from metamerge_prefect.flows.alerts import alert_on_failure
from metamerge_prefect.flows.best_of import best_of
from metamerge_prefect.flows.scaleout import (
    extract_by_shard,
    gpu_worker_count,
    merge_by_shard,
    on_dask,
    placed,
    run_on_dask,
)
from metamerge_prefect.tasks.assets import register_published_asset
from metamerge_prefect.tasks.evaluate import evaluate_model
from metamerge_prefect.tasks.extract import extract_task_vector, extract_together_task
from metamerge_prefect.tasks.gate import check_quality_gate
from metamerge_prefect.tasks.history import record_history
from metamerge_prefect.tasks.merge import merge_models
from metamerge_prefect.tasks.payloads import coefficients_of
from metamerge_prefect.tasks.publish import publish_model, publish_unless_intact
from metamerge_prefect.tasks.resolve import resolve_model
from metamerge_prefect.tasks.result_storage import result_storage_for
from metamerge_prefect.tasks.slots import EVAL_SLOTS, MERGE_SLOTS, stage_slot
from metamerge_prefect.tasks.solve import solve_coefficients


@flow(name="metagpt-merge", log_prints=True, on_failure=[alert_on_failure])
def merge_flow(recipe: str | dict[str, Any], run_id: str | None = None,
               finetune_refs: list[str] | None = None, candidates: list[dict] | None = None) -> dict[str, Any]:
    """`finetune_refs` (from a `model.finetune.discovered` event) extends the recipe's fine-tunes;
    `candidates` (from best_of) are the scores of the methods this run's method was chosen from."""
    logger = get_run_logger()
    clock = progress.StageClock()
    rec = load_any(recipe)
    if finetune_refs:
        rec = extend_recipe(rec, [entry_for_ref(ref, rec.endpoint_url) for ref in finetune_refs])
    if rec.candidates:  # this flow per candidate, then the winner's publish; the targets are checked first
        preflight(rec)
        return best_of(merge_flow, rec, run_id)
    if rec.runner.kind == "dask" and not on_dask():
        return run_on_dask(merge_flow, rec, run_id, candidates=candidates)  # the same flow, as a subflow whose tasks run on Dask
    dask = rec.runner.kind == "dask"
    placement = None
    if dask:  # GPU work goes to workers that declare a GPU; with none, to CPU workers (and the report says so)
        rec, placement = place(rec, gpu_worker_count(rec.runner.gpu_resource))
        for note in placement.notes:
            logger.info("placement: %s", note)
    with clock.stage("preflight"):  # seconds, before any heavy stage: targets, buckets, credentials, disk
        checks = preflight(rec)
    for warning in (c for c in checks if c.startswith("warning: ")):
        logger.warning(warning.removeprefix("warning: "))
    logger.info("preflight passed: %s", "; ".join(c for c in checks if not c.startswith("warning: ")))
    store = shared_store(rec) if dask else None
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
        download = not reads_in_place(rec)  # read in place: s3:// inputs are listed here, fetched by range on workers
        base_future = resolve_task.submit(rec.base, workdir, rec.endpoint_url, download)
        ft_futures = [resolve_task.submit(ft.ref, workdir, rec.endpoint_url, download) for ft in rec.finetunes]
        base = base_future.result()
        finetunes = [f.result() for f in ft_futures]
    logger.info("resolved base %s and %d fine-tunes", base.fingerprint[:12], len(finetunes))

    with clock.stage("extract"):
        # a task whose stats file is gone is refreshed (its cached path would point at nothing)
        missing = {label for ft, label in zip(finetunes, labels, strict=True)
                   if not stats_available(base, ft, label, plan, rec.merge.vocab, workdir, store)}
        todo = [ft for ft, label in zip(finetunes, labels, strict=True) if label in missing]
        extraction_fetch = None
        if len(missing) > 1 and not dask:  # one pass over the base for all of them; the tasks below then find the files
            extract_together_task(base, todo, [label for label in labels if label in missing], plan, rec.merge.vocab,
                                  workdir)
        elif missing and dask and reads_in_place(rec):  # split by output shard: each worker reads its share only
            extraction_fetch = extract_by_shard(rec, base, todo, [label for label in labels if label in missing], plan,
                                                opts)
        stats_futures = [
            extract_task.with_options(refresh_cache=label in missing).submit(base, ft, label, plan, rec.merge.vocab,
                                                                             workdir, store, reads_in_place(rec))
            for ft, label in zip(finetunes, labels, strict=True)
        ]
        stats_files = [f.result() for f in stats_futures]
        stats = load_stats(stats_files, store)
        norms = check_task_vectors(rec, stats)  # fails naming a "fine-tune" that is no fine-tune of the base
        dropped = dropped_vocab_rows(stats)
    logger.info("‖τ‖/‖θ₀‖: %s", {k: round(v, 4) for k, v in norms.items()})
    for line in vocab_summary(dropped):
        logger.warning(line)
    with clock.stage("solve"):
        solved = solve_task(labels, stats_files, plan, rec.method.name, store)
    coefficients = coefficients_of(solved)
    logger.info("λ: %s", {k: round(v, 4) for k, v in coefficients.model_level().items()})

    refresh = not merge_available(rec, base, finetunes, coefficients)
    rendezvous("merge-slot")  # tests: concurrent runs line up here, so that only the slot can serialize their merges
    with clock.stage("merge"), stage_slot(MERGE_SLOTS, needed=refresh):  # one merge per GPU across runs
        if dask:  # one task per output shard, spread over the workers; then a small finalize task
            merged = merge_by_shard(rec, base, finetunes, solved, opts, refresh=refresh,
                                    on_gpu=placement is not None and placement.merge_on_gpu)
        else:
            merged = merge_task.with_options(refresh_cache=refresh)(rec, base, finetunes, solved)
    create_table_artifact(key="task-vector-cosine", table=cosine_records(merged.report),
                          description="cosine of task vectors; MetaGPT assumes off-diagonal ≈ 0")
    logger.info("merged into %s (%s)", merged.path, merged.fingerprint[:12])

    table = None
    if rec.evaluation is not None:
        with clock.stage("evaluate"):
            # one (model, task) per cached evaluation: adding a fine-tune (and its task) leaves
            # every existing score in the cache
            all_tasks = list(dict.fromkeys(t for ft in rec.finetunes for t in ft.tasks))
            models = [("base", str(base.path), base.fingerprint, all_tasks, base.ref)]
            models += [(ft.label, str(m.path), m.fingerprint, list(ft.tasks), m.ref)
                       for ft, m in zip(rec.finetunes, finetunes, strict=True)]
            models += [("merged", merged.path, merged.fingerprint, all_tasks, None)]
            resolved = [base, *finetunes, None]  # a LoRA fine-tune is scored on the base
            jobs = [(i, label, path, fingerprint, eval_spec(rec, (task,), resolved[i], base), ref)
                    for i, (label, path, fingerprint, tasks, ref) in enumerate(models) for task in tasks]
            scores: list[dict] = [{} for _ in models]  # by position: a fine-tune may be called "base"
            if dask:  # all at once, one worker each
                with stage_slot(EVAL_SLOTS), placed(placement.evaluation_on_gpu, rec.runner.gpu_resource):
                    futures = [(i, evaluate_task.submit(label, path, fp, spec, workdir, ref, store))
                               for i, label, path, fp, spec, ref in jobs]
                    for i, future in futures:
                        scores[i].update(future.result())
            else:  # one after the other, with the CLI's progress; a slot per evaluation
                for done, (i, label, path, fp, spec, _ref) in enumerate(jobs, start=1):
                    with stage_slot(EVAL_SLOTS):
                        scores[i].update(evaluate_task(label, path, fp, spec, workdir))
                    progress.advance("evaluate", done, len(jobs))
        table = score_table(rec, scores[0], {ft.label: scores[i] for i, ft in enumerate(rec.finetunes, start=1)},
                            scores[-1])
        create_table_artifact(key="merge-scores", table=table.as_records(),
                              description="absolute scores; avg_norm = merged score / own fine-tune's score")

    normalized_average = table.normalized_average(table.merged_label) if table is not None else None
    gate = None
    if rec.gate is not None and normalized_average is not None:
        with clock.stage("gate"):
            gate = check_quality_gate(rec, normalized_average)
        create_table_artifact(key="quality-gate", table=gate.as_records(), description=gate.summary())
        logger.info(gate.summary())

    inputs = [base, *finetunes]
    report_data = report_inputs(merged.report, norms, dropped, candidates,
                                placement.as_dict() if placement is not None else None)
    documents = run_documents(rec, inputs, coefficients, plan, merged.report, report_data, table)
    if gate is not None and not gate.passed:
        report = report_markdown(rec, inputs, coefficients, plan, report_data, table, None, clock.seconds, gate)
        create_markdown_artifact(key="merge-report", markdown=report, description=f"merge report {rec.name} (gate failed)")
        gate.raise_if_failed()  # the run ends Failed, with the score table and the gate's checks as artifacts
    asked_run_id = run_id
    run_id = run_id or run_id_for(merged.fingerprint)
    published = None
    if rec.publish is not None:
        with clock.stage("publish"):
            published = publish_unless_intact(publish_task, rec, merged, run_id, asked_run_id, documents,
                                              normalized_average)
            create_link_artifact(key="published-manifest", link=published["manifest_uri"],
                                 link_text=published["manifest_uri"], description="manifest of the published merge")
            logger.info("published %s", published["manifest_uri"])
            record_history.with_options(**opts)(rec, published["manifest_uri"])
            register_published_asset(published, rec.name, rec.method.name, base, dict(zip(labels, finetunes, strict=True)),
                                     {"run_id": published["run_uri"].rsplit("/", 1)[-1], "flow_run_id": str(flow_run.id),
                                      "lambda": coefficients.model_level(), "normalized_average": normalized_average,
                                      "manifest": published["manifest_uri"], "merged_sha256": merged.fingerprint},
                                     **opts)
    report = report_markdown(rec, inputs, coefficients, plan, report_data, table,
                             published["manifest_uri"] if published else None, clock.seconds, gate)
    create_markdown_artifact(key="merge-report", markdown=report, description=f"merge report {rec.name}")
    return {
        "recipe": rec.name,
        "flow_run_id": str(flow_run.id),
        "run_id": published["run_uri"].rsplit("/", 1)[-1] if published else run_id,
        "merged_path": merged.path,
        "merged_fingerprint": merged.fingerprint,
        "placement": placement.as_dict() if placement is not None else None,
        "extraction_fetch": extraction_fetch,
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
