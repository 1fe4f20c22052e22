"""What an evaluation backend is: a name, a version (part of every score's cache key), and scores.

The pipeline asks `EVALUATION` for scores and never names lm-eval itself; another harness
(a vLLM server, an internal eval service) is one module that builds an EvalBackend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Scores = dict[str, dict[str, float | str]]  # {task: {"score": float, "metric": "acc,none"}}


@dataclass(frozen=True)
class EvalSpec:
    tasks: tuple[str, ...]
    tasks_dir: Path | None = None
    limit: int | None = None
    batch_size: int = 16
    device: str = "cpu"
    # a LoRA adapter is scored on its base: (base folder, base fingerprint); None for full checkpoints
    adapter_base: tuple[str, str] | None = None


@dataclass(frozen=True)
class EvalBackend:
    name: str
    version: Callable[[], str]
    scores: Callable[[Path, EvalSpec], Scores]
