"""A merge split by output shard: any worker merges one shard, one call assembles them.

Each shard is written, verified and reported on its own; assembling links the shards, writes
the index and commits the folder. The result is byte-equal to a whole merge of the same inputs.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metamerge.engine.checkpoint import CheckpointReader, TensorInfo
from metamerge.engine.coefficients import Coefficients
from metamerge.engine.merge import MergeReport, link_or_copy, set_config_dtype
from metamerge.engine.remote import ModelSource, open_checkpoint
from metamerge.engine.streaming import MergeJob, ProgressFn, output_plan, rounding_loss, stream_merge
from metamerge.engine.writer import (
    ShardedWriter,
    copy_aux_files,
    group_into_shards,
    shard_filenames,
    verify_checkpoint,
    verify_shard,
    write_index,
)
from metamerge.errors import CheckpointError, writing
from metamerge.io import outputs
from metamerge.methods.plan import MergePlan

# --- one output shard per call (scale-out: docs/design.md §9) ------------------------------------------


def output_shard_files(base_dir: ModelSource, dtype: str = "auto", shard_size_mb: float = 2000) -> list[str]:
    """File names of the output shards, from the base's header alone: how many shard tasks to start."""
    tensors = output_plan(open_checkpoint(base_dir, "base"), dtype)
    return shard_filenames(len(group_into_shards(tensors, shard_size_mb * 1024 * 1024)))


def output_shard_tensors(base: CheckpointReader, index: int, dtype: str = "auto", shard_size_mb: float = 2000,
                         ) -> list[str]:
    """Names of the tensors in output shard `index`: the share of one Dask task (merge or extraction)."""
    tensors = output_plan(base, dtype)
    return [info.name for info in group_into_shards(tensors, shard_size_mb * 1024 * 1024)[index]]


@dataclass
class ShardReport:
    """One shard's file and its share of the whole-model report (gram, bytes, rounding partials)."""

    index: int
    filename: str
    path: str
    tensors: int
    merged_tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    gram: list[list[float]]
    rounding_num: float
    rounding_den: float
    device: str
    base_sq_norm: float = 0.0
    dropped_rows: dict[str, dict[str, int]] = field(default_factory=dict)


def merge_shard_file(
    base_dir: ModelSource, finetunes: list[tuple[str, ModelSource]], coefficients: Coefficients, plan: MergePlan,
    out_dir: Path, index: int, *, dtype: str = "auto", device: str = "auto", shard_size_mb: float = 2000, vocab: str = "base",
    progress: ProgressFn | None = None,
) -> ShardReport:
    """Merges only the tensors of output shard `index` into `out_dir/<its file name>`.

    It reads only those tensors from every input, and the plan, header, piece order and DARE
    keys are the whole-model run's, so the file is byte-identical to that run's shard. Written
    to a temporary name, its header re-read and checked, then renamed: a killed task leaves
    nothing under the final name.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    job = MergeJob(base_dir, finetunes, coefficients, plan, dtype, device, vocab)
    tmp_dir = out_dir / f".shard-{index}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    writer = ShardedWriter(tmp_dir, job.tensors_out, shard_size_mb * 1024 * 1024, only=index)
    tensors = writer.shards[index]
    filename = writer.filenames[index]
    total_bytes = sum(info.nbytes for info in tensors)
    try:
        with writing(out_dir / filename):
            totals = stream_merge(job, job.pieces(tensors), writer, total_bytes, progress, "merge-shard")
            writer.finish()
            verify_shard(tmp_dir / filename, tensors)
            os.replace(tmp_dir / filename, out_dir / filename)
    except BaseException:
        writer.abort()
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return ShardReport(
        index=index, filename=filename, path=str(out_dir / filename), tensors=len(tensors),
        merged_tensors=job.merged_count(tensors), bytes_read=totals.bytes_read, bytes_written=total_bytes,
        seconds=time.monotonic() - started, gram=totals.gram.tolist(), rounding_num=totals.rounding_num,
        rounding_den=totals.rounding_den, device=str(job.device), base_sq_norm=totals.base_sq_norm,
        dropped_rows=job.dropped_rows,
    )


def assemble_shard_files(
    base_dir: ModelSource,
    shards: list[ShardReport],
    labels: list[str],
    out_dir: Path,
    *,
    dtype: str = "auto",
    shard_size_mb: float = 2000,
    existing: str = "refuse",
) -> MergeReport:
    """Assembles merged shards into the checkpoint `merge_checkpoints` would have written.

    Shard files are hard-linked (copied across file systems) into a temporary folder, the index
    is written from the same plan as ShardedWriter's, aux files come from the base, the whole
    checkpoint is verified, then renamed into place. The shard reports sum to the model's report.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    tensors_out, planned, filenames = planned_shards(base_dir, shards, dtype, shard_size_mb)
    outputs.check_output(out_dir, existing)
    with writing(out_dir):
        temp = outputs.make_temp(out_dir)
    try:
        with writing(out_dir):
            for report in shards:
                link_or_copy(Path(report.path), temp.path / report.filename)
            write_index(temp.path, planned, filenames)
            verify_checkpoint(temp.path, tensors_out)
            copy_aux_files(base_dir, temp.path)
            set_config_dtype(temp.path, dtype)
            outputs.commit(temp, out_dir, existing)
    except BaseException:
        temp.discard()
        raise
    return sum_shard_reports(shards, labels, out_dir, len(tensors_out), time.monotonic() - started)


def planned_shards(base_dir: ModelSource, shards: list[ShardReport], dtype: str, shard_size_mb: float,
                   ) -> tuple[list[TensorInfo], list[list[TensorInfo]], list[str]]:
    """The whole merge's output plan (tensors, shards, file names), checked against the shards made."""
    tensors_out = output_plan(open_checkpoint(base_dir, "base"), dtype)
    planned = group_into_shards(tensors_out, shard_size_mb * 1024 * 1024)
    filenames = shard_filenames(len(planned))
    got = sorted(report.filename for report in shards)
    if got != sorted(filenames):
        raise CheckpointError(f"finalize: shards {got} do not match the plan {filenames}")
    return tensors_out, planned, filenames


def sum_shard_reports(shards: list[ShardReport], labels: list[str], out_dir: Path, tensors: int,
                      seconds: float) -> MergeReport:
    """The whole model's report from its shards' partial sums (gram, bytes, rounding)."""
    gram = torch.zeros((len(labels), len(labels)), dtype=torch.float64)
    for report in shards:
        gram += torch.tensor(report.gram, dtype=torch.float64)
    merged = sum(report.merged_tensors for report in shards)
    ordered = sorted(shards, key=lambda r: r.index)
    return MergeReport(
        out_dir=out_dir, device=ordered[0].device, tensors=tensors, merged_tensors=merged,
        copied_tensors=tensors - merged, bytes_read=sum(r.bytes_read for r in shards),
        bytes_written=sum(r.bytes_written for r in shards),
        seconds=sum(r.seconds for r in shards) + seconds, gram=gram.tolist(), labels=labels,
        delta_rounding_loss=rounding_loss(sum(r.rounding_num for r in shards), sum(r.rounding_den for r in shards)),
        base_sq_norm=sum(r.base_sq_norm for r in shards), dropped_rows=ordered[0].dropped_rows,
    )
