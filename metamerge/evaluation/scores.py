"""Scores turned into the paper's normalized table.

The paper reports, per task, the merged model's score divided by the score of the fine-tune
trained for that task ("Nor"); a merge is judged on the average of those ratios. The quality
gate uses the same number, so what the table shows is what decides publishing.
"""

from __future__ import annotations

from dataclasses import dataclass


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
