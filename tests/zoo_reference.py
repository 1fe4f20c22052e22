"""Independent reference numbers for zoo tests: task data read from the task files, merges from the formula.

The pipeline scores with lm-eval; these helpers score with `zoo_contract.multiple_choice_accuracy`
(lm-eval's metric, re-implemented) on the JSONL rows lm-eval itself reads, and build merged
weights straight from θ₀ + Σ λ_t τ_t. Two computations of one number must agree within one
example (float noise can flip a near-tie), on whatever CPU built the zoo.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    prompt: str
    answer: str
    choices: tuple[str, ...]


def task_rows(zoo, task: str) -> list[Row]:
    skill = task.removeprefix("zoo_")
    rows = []
    for line in (Path(zoo.tasks_dir) / "data" / f"{skill}.jsonl").read_text().splitlines():
        doc = json.loads(line)
        rows.append(Row(doc["query"], doc["choices"][doc["gold"]], tuple(doc["choices"])))
    return rows


def one_example(zoo, task: str) -> float:
    """The score step of one example: the tolerance between two computations of one accuracy."""
    return 1.0 / len(task_rows(zoo, task)) + 1e-9


def merged_state(zoo, coefficients: dict[str, float], folders: dict[str, Path] | None = None) -> dict:
    """θ₀ + Σ λ_t (θ_t − θ₀) in float64, from the zoo's files (or `folders`: other full fine-tunes)."""
    from safetensors.torch import load_file

    base = load_file(str(Path(zoo.base) / "model.safetensors"))
    merged = {k: v.double() for k, v in base.items()}
    for label, lam in coefficients.items():
        ft = load_file(str(Path((folders or zoo.finetunes)[label]) / "model.safetensors"))
        for key in merged:
            merged[key] += lam * (ft[key].double() - base[key].double())
    return {k: v.to(base[k].dtype) for k, v in merged.items()}


def accuracy_of_state(zoo, state: dict, task: str) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metamerge.demo.contract import multiple_choice_accuracy

    model = AutoModelForCausalLM.from_pretrained(zoo.base, dtype=torch.float32)
    model.load_state_dict(state)
    tokenizer = AutoTokenizer.from_pretrained(zoo.base)
    return multiple_choice_accuracy(model, tokenizer, task_rows(zoo, task))
