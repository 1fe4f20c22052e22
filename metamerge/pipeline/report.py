"""What a run tells its reader: the λ and cosine tables and the markdown report."""

from __future__ import annotations

import json
import math

from metamerge.engine.coefficients import Coefficients
from metamerge.evaluation.gate import GateDecision
from metamerge.evaluation.scores import ScoreTable
from metamerge.methods.plan import MergePlan
from metamerge.pipeline.card import model_card
from metamerge.pipeline.tables import coefficient_lines, cosine_lines, input_lines
from metamerge.recipe import Recipe
from metamerge.refs import ResolvedModel


def coefficient_records(coefficients: Coefficients, plan: MergePlan,
                        norms: dict[str, float] | None = None) -> list[dict]:
    level = coefficients.model_level()
    norms = norms or {}
    return [{"fine-tune": task, "lambda": round(value, 6), "relative norm ‖τ‖/‖θ₀‖": _rounded(norms.get(task)),
             "method": coefficients.method, "granularity": coefficients.granularity, "scale": plan.scale}
            for task, value in level.items()]


def _rounded(value: float | None) -> float | None:
    return None if value is None else (round(value, 6) if math.isfinite(value) else value)


def cosine_records(report: dict) -> list[dict]:
    labels, cosine = report["labels"], report["cosine"]
    return [{"task vector": a, **{b: round(cosine[i][j], 4) for j, b in enumerate(labels)}} for i, a in enumerate(labels)]


def report_markdown(recipe: Recipe, inputs: list[ResolvedModel], coefficients: Coefficients, plan: MergePlan,
                    merge_report: dict, table: ScoreTable | None, published: str | None,
                    stage_seconds: dict[str, float] | None = None, gate: GateDecision | None = None) -> str:
    lines = [f"# Merge report: {recipe.name}", "", f"Method: `{recipe.method.name}`"
             f" (granularity {coefficients.granularity}, scale {plan.scale}); {recipe.method.spec.reference}.",
             "", "## Inputs", "", *input_lines(recipe, inputs),
             "", "## Coefficients (λ per fine-tune, model level)", "", *coefficient_lines(recipe, coefficients, merge_report)]
    placement = merge_report.get("placement")
    if placement and placement["notes"]:
        lines += ["", "## Placement (Dask)", "", *(f"- {note}" for note in placement["notes"])]
    dropped = merge_report.get("dropped_rows") or {}
    if dropped:
        lines += ["", "## Vocabulary rows dropped (vocab: base)", "", "| fine-tune | tensor | rows dropped |",
                  "|---|---|---|"]
        lines += [f"| {label} | {tensor} | {rows} |" for label, tensors in dropped.items()
                  for tensor, rows in sorted(tensors.items())]
    lines += ["", "## Cosine of task vectors", "", *cosine_lines(merge_report)]
    lines += ["", f"Merge: {merge_report['tensors']} tensors, {merge_report['bytes_written'] / 1e6:.1f} MB written "
              f"in {merge_report['seconds']:.2f} s on {merge_report['device']}."]
    if table is not None:
        lines += ["", "## Scores (absolute; avg_norm = merged / own fine-tune)", "", table.to_markdown()]
    if merge_report.get("candidates"):
        lines += ["", f"## Candidates (best of {len(merge_report['candidates'])} by avg_norm)", "",
                  "| candidate | avg_abs | avg_norm | chosen |", "|---|---:|---:|---|"]
        lines += [f"| {c['method']} | {c['avg_abs'] or 0.0:.4f} | {c['avg_norm'] or 0.0:.4f} | {'yes' if c['chosen'] else ''} |"
                  for c in merge_report["candidates"]]
    if gate is not None:
        lines += ["", f"## Quality gate: {'passed' if gate.passed else 'FAILED, not published'}", ""]
        lines += [f"- {row['result']}: {row['check']}" for row in gate.as_records()]
    if stage_seconds:
        lines += ["", "## Stage timings (this run; cached stages are near zero)", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {name} | {sec:.2f} |" for name, sec in stage_seconds.items()]
    if published:
        lines += ["", f"Published: `{published}`"]
    return "\n".join(lines) + "\n"


def report_inputs(merge_report: dict, norms: dict[str, float], dropped: dict[str, dict[str, int]],
                  candidates: list[dict] | None = None, placement: dict | None = None) -> dict:
    """The merge's report plus the norms checked before the merge, the vocabulary rows each fine-tune
    lost, for a best-of-several recipe every candidate's scores, and on Dask where GPU work ran."""
    data = {**merge_report, "relative_norms": norms, "dropped_rows": dropped, "candidates": candidates or []}
    return {**data, "placement": placement} if placement is not None else data


def run_documents(recipe: Recipe, inputs: list[ResolvedModel], coefficients: Coefficients, plan: MergePlan,
                  merge_report: dict, report_data: dict, table: ScoreTable | None) -> dict[str, str]:
    """The small documents a publish carries beside the model (and that its cache key covers).

    Their report.md has no timings, gate or published URI, so that a re-run of the same merge
    publishes the same bytes; the Prefect UI's report adds those (one more render, at the end).
    """
    documents = {
        "coefficients.json": coefficients.to_json(),
        "merge_report.json": json.dumps(merge_report, indent=1),
        "report.md": report_markdown(recipe, inputs, coefficients, plan, report_data, table, None),
    }
    if table is not None:
        documents["scores.json"] = json.dumps(
            {"rows": table.rows, "records": table.as_records(), "merged": table.merged_label}, indent=1)
    if report_data.get("candidates"):
        documents["candidates.json"] = json.dumps(report_data["candidates"], indent=1)
    documents["README.md"] = model_card(recipe, inputs, coefficients, plan, report_data, table)
    return documents
