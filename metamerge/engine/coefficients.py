"""Closed-form coefficient solvers: which weight λ each task vector gets, per tensor.

MetaGPT (arXiv 2406.11385) picks λ_t = ‖τ_t‖² / Σ_k ‖τ_k‖² with no data and no search. The
paper sums the norms over the whole model; `layer` and `tensor` granularity compute the same
ratio per transformer block or per tensor (an extension, reported separately).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_group(tensor_name: str) -> str:
    """Tensors of one transformer block share a group; tensors outside blocks stand alone."""
    match = LAYER_PATTERN.search(tensor_name)
    return f"layer.{match.group(1)}" if match else tensor_name


def group_of(tensor_name: str, granularity: str) -> str:
    if granularity == "model":
        return "model"
    if granularity == "layer":
        return layer_group(tensor_name)
    if granularity == "tensor":
        return tensor_name
    raise ValueError(f"unknown granularity {granularity!r}")


@dataclass(frozen=True)
class Coefficients:
    """λ per task for every group of tensors, plus which group each tensor belongs to."""

    method: str
    granularity: str
    tasks: list[str]
    groups: dict[str, list[float]]
    tensor_groups: dict[str, str]

    def weights_for(self, tensor_name: str) -> list[float]:
        group = self.tensor_groups.get(tensor_name, "model")
        return self.groups[group]

    def model_level(self) -> dict[str, float]:
        """λ per task over the whole model: exact for `model`, a size-weighted mean otherwise."""
        if "model" in self.groups:
            return dict(zip(self.tasks, self.groups["model"], strict=True))
        counts: dict[str, int] = {}
        for group in self.tensor_groups.values():
            counts[group] = counts.get(group, 0) + 1
        total = sum(counts.values()) or 1
        return {
            task: sum(self.groups[g][i] * n for g, n in counts.items()) / total
            for i, task in enumerate(self.tasks)
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Coefficients:
        return cls(**json.loads(text))

    def save(self, path: Path) -> None:
        path.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> Coefficients:
        return cls.from_json(path.read_text())


def metagpt_lambdas(sq_norms: Sequence[float]) -> list[float]:
    """λ_t = n_t / Σ n_k. If every task vector is zero the split is moot; use 1/T."""
    total = float(sum(sq_norms))
    if total <= 0.0:
        return [1.0 / len(sq_norms)] * len(sq_norms)
    return [float(n) / total for n in sq_norms]


def solve_metagpt(
    tasks: Sequence[str], sq_norms: Mapping[str, Mapping[str, float]], granularity: str = "model", method: str = "metagpt"
) -> Coefficients:
    """`sq_norms[task][tensor]` = ‖τ_task‖² restricted to that tensor (float tensors only)."""
    tensor_names = list(sq_norms[tasks[0]])
    group_totals: dict[str, list[float]] = {}
    tensor_groups: dict[str, str] = {}
    for name in tensor_names:
        group = group_of(name, granularity)
        tensor_groups[name] = group
        totals = group_totals.setdefault(group, [0.0] * len(tasks))
        for i, task in enumerate(tasks):
            totals[i] += float(sq_norms[task][name])
    groups = {g: metagpt_lambdas(t) for g, t in group_totals.items()}
    return Coefficients(method, granularity, list(tasks), groups, tensor_groups)


def solve_constant(tasks: Sequence[str], weight: float, method: str) -> Coefficients:
    """Average (1/T), task arithmetic (λ) and TIES/DARE (1, scaled later) use one weight for all."""
    return Coefficients(method, "model", list(tasks), {"model": [float(weight)] * len(tasks)}, {})
