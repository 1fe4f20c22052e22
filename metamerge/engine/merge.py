"""A whole merge into one folder: stream every tensor, verify, then commit.

The output goes to a temporary sibling folder that is verified and only then renamed into
place, so a crash or a bad input never leaves a half-written model where readers look.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from metamerge.engine.coefficients import Coefficients
from metamerge.engine.streaming import MergeJob, ProgressFn, rounding_loss, stream_merge
from metamerge.engine.taskvectors import check_relative_norms
from metamerge.engine.thresholds import ThresholdCache
from metamerge.engine.writer import (
    ShardedWriter,
    copy_aux_files,
    verify_checkpoint,
)
from metamerge.errors import writing
from metamerge.io import outputs
from metamerge.methods.plan import MergePlan


@dataclass
class MergeReport:
    out_dir: Path
    device: str
    tensors: int
    merged_tensors: int
    copied_tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    gram: list[list[float]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    delta_rounding_loss: float = 0.0
    base_sq_norm: float = 0.0
    dropped_rows: dict[str, dict[str, int]] = field(default_factory=dict)
    ties_tensors: int = 0  # with remembered TIES trims: tensors merged, and of those, selected (not reused)
    ties_selected: int = 0
    ties_trims_unsaved: list[str] = field(default_factory=list)  # trim files that could not be written

    def relative_norms(self) -> dict[str, float]:
        """‖τ_t‖ / ‖θ₀‖ per fine-tune over every merged tensor (before any sparsification)."""
        base = math.sqrt(self.base_sq_norm)
        return {label: (math.sqrt(max(self.gram[i][i], 0.0)) / base if base > 0 else math.inf)
                for i, label in enumerate(self.labels)}

    def cosine(self) -> list[list[float]]:
        """Cosine of task vectors; MetaGPT assumes these are near 0 off the diagonal."""
        n = len(self.gram)
        out = [[0.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(n):
                denom = math.sqrt(self.gram[i][i] * self.gram[j][j])
                out[i][j] = self.gram[i][j] / denom if denom > 0 else 0.0
        return out

    def to_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k != "out_dir"}
        data["out_dir"] = str(self.out_dir)
        data["cosine"] = self.cosine()
        data["relative_norms"] = self.relative_norms()
        return data


def merge_checkpoints(
    base_dir: Path, finetunes: list[tuple[str, Path]], coefficients: Coefficients, plan: MergePlan, out_dir: Path, *,
    dtype: str = "auto", device: str = "auto", shard_size_mb: float = 2000, vocab: str = "base",
    progress: ProgressFn | None = None, existing: str = "refuse", max_relative_norm: float | None = None,
    thresholds: ThresholdCache | None = None,
) -> MergeReport:
    """The whole model in one process: every shard, the index, aux files, verified, then renamed in.

    With `max_relative_norm`, a fine-tune whose ‖τ‖/‖θ₀‖ (from this pass's own sums) is above it
    fails the merge before anything is committed: the check costs no extra read of the models.

    `existing` says what may happen to something already at `out_dir` (metamerge.outputs):
    `refuse` (default), `replace` (an earlier metamerge output only) or `keep` (an intact
    metamerge output stays, ours is dropped). Anything else there is never touched. The work
    goes to a marked, locked temporary sibling; ENOSPC / EROFS / EACCES end as one WriteError
    naming `out_dir`, with the temporary removed.

    `thresholds`: TIES trims remembered from earlier merges (`engine/thresholds.py`); the ones
    this merge finds are saved after it committed.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    outputs.check_output(out_dir, existing)
    job = MergeJob(base_dir, finetunes, coefficients, plan, dtype, device, vocab, thresholds)
    tensors_out = job.tensors_out
    total_bytes = sum(info.nbytes for info in tensors_out)
    with writing(out_dir):
        temp = outputs.make_temp(out_dir)
    writer = None
    try:
        with writing(out_dir):
            writer = ShardedWriter(temp.path, tensors_out, shard_size_mb * 1024 * 1024)
            totals = stream_merge(job, job.pieces(tensors_out), writer, total_bytes, progress, "merge")
            writer.finish()
            base_norm = math.sqrt(totals.base_sq_norm)
            check_relative_norms({label: math.sqrt(max(float(totals.gram[i, i]), 0.0)) / base_norm if base_norm else
                                  math.inf for i, label in enumerate(job.labels)}, max_relative_norm)
            verify_checkpoint(temp.path, tensors_out)
            copy_aux_files(base_dir, temp.path)
            set_config_dtype(temp.path, dtype)
            outputs.commit(temp, out_dir, existing)
    except BaseException:
        if writer is not None:
            writer.abort()
        temp.discard()
        raise
    unsaved = thresholds.save() if thresholds is not None else []
    merged = job.merged_count(tensors_out)
    return MergeReport(
        out_dir=out_dir, device=str(job.device), tensors=len(tensors_out), merged_tensors=merged,
        copied_tensors=len(tensors_out) - merged, bytes_read=totals.bytes_read, bytes_written=total_bytes,
        seconds=time.monotonic() - started, gram=totals.gram.tolist(), labels=job.labels,
        delta_rounding_loss=rounding_loss(totals.rounding_num, totals.rounding_den),
        base_sq_norm=totals.base_sq_norm, dropped_rows=job.dropped_rows,
        ties_tensors=thresholds.tensors if thresholds else 0, ties_selected=thresholds.selected if thresholds else 0,
        ties_trims_unsaved=unsaved,
    )


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def set_config_dtype(model_dir: Path, dtype: str) -> None:
    config = model_dir / "config.json"
    if dtype == "auto" or not config.exists():
        return
    data = json.loads(config.read_text())
    for key in ("torch_dtype", "dtype"):
        if key in data:
            data[key] = dtype
    config.write_text(json.dumps(data, indent=2))
