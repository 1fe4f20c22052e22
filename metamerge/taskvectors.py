"""Per-tensor statistics of one task vector τ = θ_ft − θ_base, streamed tensor by tensor.

MetaGPT needs only ‖τ_t‖² per tensor, so extraction is one pass over (base, fine-tune) that
keeps a float per tensor. It doubles as the compatibility and sanity check (names, shapes,
NaN/Inf) so that a broken fine-tune fails here, before the expensive merge.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from metamerge.checkpoint import CheckpointReader
from metamerge.compat import align, read_aligned
from metamerge.errors import CheckpointError
from metamerge.methods import MergePlan, sq_norm_after_sparsify

STATS_VERSION = 1


@dataclass(frozen=True)
class TaskVectorStats:
    label: str
    sq_norms: dict[str, float]  # float tensors only
    numel: int
    changed_tensors: int

    @property
    def total_sq_norm(self) -> float:
        return sum(self.sq_norms.values())

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"version": STATS_VERSION, **asdict(self)}))

    @classmethod
    def load(cls, path: Path) -> TaskVectorStats:
        data = json.loads(path.read_text())
        data.pop("version", None)
        return cls(**data)


def extract_stats(
    base_dir: Path, finetune_dir: Path, label: str, plan: MergePlan | None = None, vocab: str = "base"
) -> TaskVectorStats:
    """‖τ‖² per float tensor (after the plan's sparsification when it has one), in float64 sums."""
    plan = plan or MergePlan()
    base = CheckpointReader(base_dir, label="base")
    finetune = CheckpointReader(finetune_dir, label=label)
    alignment = align(base, finetune, vocab)
    sq_norms: dict[str, float] = {}
    numel = changed = 0
    for name in base.names:
        if not base.info(name).is_float:
            continue
        tau = read_aligned(finetune, name, alignment).to(torch.float32) - base.read(name).to(torch.float32)
        value = sq_norm_after_sparsify(tau, plan, label, name) if plan.sparsify != "none" else float(
            torch.sum(tau.double() ** 2)
        )
        if not math.isfinite(value):
            raise CheckpointError(
                f"fine-tune {label!r}: tensor {name!r} contains NaN or Inf (in the fine-tune or the base)"
            )
        sq_norms[name] = value
        numel += tau.numel()
        changed += value > 0
    return TaskVectorStats(label=label, sq_norms=sq_norms, numel=numel, changed_tensors=changed)
