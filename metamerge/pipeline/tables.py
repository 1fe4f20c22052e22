"""Markdown tables that the report and the model card both show: inputs, λ, cosines."""

from __future__ import annotations

from metamerge.engine.coefficients import Coefficients
from metamerge.recipe import Recipe
from metamerge.refs import ResolvedModel


def input_lines(recipe: Recipe, inputs: list[ResolvedModel]) -> list[str]:
    lines = ["| role | ref | fingerprint |", "|---|---|---|"]
    for i, model in enumerate(inputs):
        role = "base" if i == 0 else f"fine-tune {recipe.finetunes[i - 1].label}"
        lines.append(f"| {role} | `{model.ref}` | `{model.fingerprint[:16]}` |")
    return lines


def coefficient_lines(recipe: Recipe, coefficients: Coefficients, merge_report: dict) -> list[str]:
    norms = merge_report.get("relative_norms") or {}
    lines = ["‖τ‖/‖θ₀‖ is the task vector's norm relative to the base's (bound: merge.max_relative_norm "
             f"{recipe.merge.max_relative_norm}).", "", "| fine-tune | λ | ‖τ‖/‖θ₀‖ |", "|---|---|---|"]
    return lines + [f"| {task} | {value:.4f} | {norms[task]:.4f} |" if task in norms else f"| {task} | {value:.4f} | - |"
                    for task, value in coefficients.model_level().items()]


def cosine_lines(merge_report: dict) -> list[str]:
    labels = merge_report["labels"]
    lines = ["MetaGPT assumes near-orthogonal task vectors (off-diagonal ≈ 0).", "",
             "| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    return lines + [f"| {a} | " + " | ".join(f"{c:.3f}" for c in merge_report["cosine"][i]) + " |"
                    for i, a in enumerate(labels)]
