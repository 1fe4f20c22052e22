"""The model card: README.md in every published merge, in Hugging Face's format, with the proof.

A hub (or a colleague) that opens the merged model sees what it is — YAML front matter with
`base_model`, `tags` and `library_name` as mergekit writes them — and, unlike a bare card, the
numbers that say whether it is any good: λ per fine-tune, the cosine matrix, the score table
(absolute and normalized), the recipe and every input's fingerprint.
"""

from __future__ import annotations

import re

import yaml

from metamerge.engine.coefficients import Coefficients
from metamerge.evaluation.scores import ScoreTable
from metamerge.methods.plan import MergePlan
from metamerge.pipeline.tables import coefficient_lines, cosine_lines, input_lines
from metamerge.recipe import Recipe, recipe_to_yaml
from metamerge.refs import ResolvedModel


def hub_id(ref: str) -> str | None:
    """`org/name` of an hf:// ref (what `base_model` expects); local and s3:// refs have none."""
    if not ref.startswith("hf://"):
        return None
    return ref.removeprefix("hf://").split("@", 1)[0]


def paper_links(reference: str) -> str:
    """The registry's citation with every `arXiv NNNN.NNNNN` turned into a link."""
    return re.sub(r"arXiv (\d{4}\.\d{4,5})", r"[arXiv \1](https://arxiv.org/abs/\1)", reference)


def front_matter(recipe: Recipe) -> dict:
    tasks = sorted({task for ft in recipe.finetunes for task in ft.tasks})
    matter: dict = {"library_name": "transformers", "tags": ["merge", "metamerge", recipe.method.name]}
    bases = [hub for hub in [hub_id(recipe.base), *(hub_id(ft.ref) for ft in recipe.finetunes)] if hub]
    if bases:
        matter["base_model"] = bases
    if tasks:
        matter["metamerge"] = {"evaluated_on": tasks}  # lm-eval task names, not hub dataset ids
    return matter


def model_card(recipe: Recipe, inputs: list[ResolvedModel], coefficients: Coefficients, plan: MergePlan,
               report_data: dict, table: ScoreTable | None) -> str:
    method = recipe.method
    lines = ["---", yaml.safe_dump(front_matter(recipe), sort_keys=True).rstrip(), "---", "",
             f"# {recipe.name}", "",
             f"A merge of {len(recipe.finetunes)} fine-tunes of `{recipe.base}` made with "
             f"metamerge using **{method.name}** "
             f"(granularity {coefficients.granularity}, scale {plan.scale}): {paper_links(method.spec.reference)}.",
             "", "## Inputs", "", *input_lines(recipe, inputs),
             "", "## Coefficients (λ per fine-tune, model level)", "", *coefficient_lines(recipe, coefficients, report_data),
             "", "## Cosine of task vectors", "", *cosine_lines(report_data)]
    if table is not None:
        lines += ["", "## Scores (lm-eval; avg_norm = merged score / its own fine-tune's)", "", table.to_markdown()]
    lines += ["", "## Recipe", "", "```yaml", recipe_to_yaml(recipe).rstrip(), "```"]
    return "\n".join(lines) + "\n"
