"""The paper-style comparison: every method on the same base, fine-tunes and tasks.

Rows are the base, each fine-tune and each merge method; columns are each task's absolute
score, the average absolute score and the average normalized score (merged / own fine-tune,
the paper's "Nor"). Users read it before trusting a method for their nightly merge, so it is
written three ways: markdown for the README and the Prefect UI, JSON for machines, a bar chart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from metamerge.errors import RecipeError
from metamerge.methods.registry import METHODS, PARAMETERS, compare_defaults
from metamerge.recipe import Method

SUMMARY_COLUMNS = ("avg_abs", "avg_norm")
DEFAULT_METHODS = compare_defaults()


def parse_method(spec: str, seed: int = 0) -> Method:
    """`name`, `name:granularity` (MetaGPT variants) or `name:key=value[:key=value]` (any parameter,
    e.g. `metagpt+ties:disjoint=sum`); random methods get `seed` unless the spec sets one."""
    name, *parts = spec.strip().split(":")
    if name not in METHODS:
        raise RecipeError(f"unknown method {name!r} in --methods; choose from {', '.join(METHODS)}")
    data: dict[str, object] = {"name": name}
    for part in parts:
        key, equals, value = part.partition("=")
        if equals:
            data[key] = value
        else:
            data["granularity"] = part
    if METHODS[name].random:
        data.setdefault("seed", seed)
    try:
        return Method.model_validate(data)
    except ValueError as exc:
        raise RecipeError(f"invalid method {spec!r}: {exc}") from None


def method_label(method: Method) -> str:
    """The spec that `parse_method` reads back: the name, a non-model granularity, then every other
    parameter the method was given explicitly (not the seed: seeds are compared across runs)."""
    label = method.name
    if method.granularity and method.granularity != "model":
        label += f":{method.granularity}"
    for key, param in PARAMETERS.items():
        value = getattr(method, key)
        if key not in ("granularity", "seed") and value is not None:
            label += f":{param.spelled}={value}"
    return label


@dataclass(frozen=True)
class Comparison:
    """rows: label -> {task: score, avg_abs, avg_norm}; `kinds` says base / fine-tune / method."""

    tasks: tuple[str, ...]
    rows: dict[str, dict[str, float | None]]
    kinds: dict[str, str]
    coefficients: dict[str, dict[str, float]]

    @classmethod
    def from_runs(cls, runs: Mapping[str, Mapping[str, object]]) -> Comparison:
        """`runs`: method label -> merge_flow summary (its score records and λ)."""
        tasks: tuple[str, ...] = ()
        rows: dict[str, dict[str, float | None]] = {}
        kinds: dict[str, str] = {}
        coefficients: dict[str, dict[str, float]] = {}
        for method, summary in runs.items():
            records = summary.get("scores")
            if not records:
                raise RecipeError("compare needs an 'evaluation' section in the recipe: there is nothing to compare")
            assert isinstance(records, Sequence)
            tasks = tuple(k for k in records[0] if k not in ("model", *SUMMARY_COLUMNS))
            for record in records[:-1]:  # base and fine-tunes: the same in every run
                label = str(record["model"])
                rows.setdefault(label, _scores(record, tasks))
                kinds.setdefault(label, "base" if label == "base" else "fine-tune")
            rows[method] = _scores(records[-1], tasks)
            kinds[method] = "method"
            coefficients[method] = dict(summary.get("coefficients") or {})
        return cls(tasks=tasks, rows=rows, kinds=kinds, coefficients=coefficients)

    def methods(self) -> list[str]:
        return [label for label, kind in self.kinds.items() if kind == "method"]

    def best_method(self) -> str:
        return max(self.methods(), key=lambda m: self.rows[m]["avg_norm"] or 0.0)

    def to_json(self) -> str:
        """`{row: {task: score, "avg_abs": x, "avg_norm": y}}`; fine-tune rows are `finetune:<name>`."""
        out = {}
        for label, row in self.rows.items():
            key = f"finetune:{label}" if self.kinds[label] == "fine-tune" else label
            out[key] = row
        return json.dumps(out, indent=1)

    def to_markdown(self) -> str:
        headers = ["model", *self.tasks, *SUMMARY_COLUMNS]
        lines = ["| " + " | ".join(headers) + " |", "|---" + "|---:" * (len(headers) - 1) + "|"]
        best = self.best_method() if self.methods() else None
        for label, row in self.rows.items():
            name = {"base": "base", "fine-tune": f"fine-tune `{label}`"}.get(self.kinds[label], f"**{label}**"
                                                                               if label == best else label)
            cells = [_cell(row.get(col)) for col in (*self.tasks, *SUMMARY_COLUMNS)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def records(self) -> list[dict[str, object]]:
        return [{"model": label, "kind": self.kinds[label], **row} for label, row in self.rows.items()]

    def write(self, out_dir: Path, stem: str = "quality", title: str = "") -> dict[str, Path]:
        """Markdown, JSON and a PNG bar chart side by side; returns their paths."""
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md", "chart": out_dir / f"{stem}.png"}
        paths["json"].write_text(self.to_json() + "\n")
        lam = "\n".join(f"| {m} | " + ", ".join(f"{k} {v:.3f}" for k, v in self.coefficients[m].items()) + " |"
                        for m in self.methods())
        paths["markdown"].write_text(
            (f"# {title}\n\n" if title else "") + self.to_markdown()
            + "\n\navg_norm = mean over tasks of (score / score of the fine-tune trained for that task).\n\n"
            + "| method | λ per fine-tune (model level) |\n|---|---|\n" + lam + "\n")
        render_chart(self, paths["chart"], title)
        return paths


def render_chart(comparison: Comparison, path: Path, title: str = "") -> None:
    """Grouped bars: one group per task plus avg_norm, one bar per base / method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = ["base", *comparison.methods()]
    groups = [*comparison.tasks, "avg_norm"]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups) + 0.25 * len(series)), 4.5), dpi=110)
    cmap = plt.get_cmap("tab20")  # up to 20 series apart (methods and their variants)
    for i, label in enumerate(series):
        row = comparison.rows[label]
        values = [row.get(g) or 0.0 for g in groups]
        color = "#9e9e9e" if label == "base" else cmap(i % 20)
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(groups))], values, width, label=label,
               color=color, edgecolor="black" if label.startswith("metagpt") else None, linewidth=0.6)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("accuracy (tasks) / normalized (avg_norm)")
    ax.set_ylim(0, 1.05)
    ax.axhline(1.0, color="black", linewidth=0.5, linestyle=":")
    ax.set_title(title or "merge methods compared")
    ax.legend(ncol=min(5, len(series)), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _scores(record: Mapping[str, object], tasks: Sequence[str]) -> dict[str, float | None]:
    return {col: (float(v) if isinstance((v := record.get(col)), int | float) else None)
            for col in (*tasks, *SUMMARY_COLUMNS)}


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def choose_best(runs: Mapping[str, Mapping[str, object]]) -> tuple[str, list[dict[str, object]]]:
    """Best of several candidates: the label with the highest normalized average, and every
    candidate's row (scores, averages, whether it was chosen) for the report and the artifacts."""
    comparison = Comparison.from_runs(runs)
    best = comparison.best_method()
    return best, [{"method": label, **comparison.rows[label], "chosen": label == best} for label in comparison.methods()]
