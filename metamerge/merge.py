"""The streaming merge engine: θ = θ₀ + Δ(τ_1..τ_T), one tensor at a time.

For each tensor name it reads the base and every fine-tune (mmap), computes in float32 on the
chosen device, writes the result straight into the output shard, and forgets it. Reading the
next tensor overlaps with computing this one (a background thread; pinned buffers on CUDA),
and writing overlaps with the next read. Peak memory is a few tensors, never the model.
The output goes to a temporary sibling folder that is verified and only then renamed into
place, so a crash or a bad input never leaves a half-written model where readers look.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metamerge import checkpoint, outputs
from metamerge.checkpoint import (
    CheckpointReader,
    ShardedWriter,
    TensorInfo,
    copy_aux_files,
    plan_shards,
    row_chunks,
    shard_filenames,
    verify_checkpoint,
    verify_shard,
    write_index,
)
from metamerge.coefficients import Coefficients
from metamerge.compat import Alignment, align, aligned_rows, tied_aliases
from metamerge.errors import CheckpointError, writing
from metamerge.faults import hang_point
from metamerge.methods import MergePlan, chunked, combine, sparsify_
from metamerge.taskvectors import check_relative_norms

OUTPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ProgressFn = Callable[[int, int, str], None]


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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("merge.device is 'cuda' but no CUDA device is available")
    return torch.device(device)


def output_plan(base: CheckpointReader, dtype: str) -> list[TensorInfo]:
    """Output tensors: the base's names and shapes; float dtype per the recipe, others kept."""
    target = OUTPUT_DTYPES.get(dtype)
    plan = []
    for name in base.names:
        info = base.info(name)
        out_dtype = target if (target is not None and info.is_float) else info.dtype
        plan.append(TensorInfo(name, out_dtype, info.shape))
    return plan


class _Workspace:
    """Reusable float32 buffers of one in-flight piece: inputs [T+1, capacity] and its result.

    Two of them alternate (read piece i+1 while computing piece i, write piece i while
    computing i+1); reusing buffers avoids a page fault per fresh megabyte, which otherwise
    costs as much as the arithmetic.
    """

    def __init__(self, inputs: int, capacity: int, pin: bool):
        self.capacity = capacity
        self.inputs = torch.empty((inputs, capacity), dtype=torch.float32, pin_memory=pin)
        self.result = torch.empty(capacity, dtype=torch.float32)


class _Inputs:
    """Reads one piece (a tensor or its row chunk) of every checkpoint as float32 rows."""

    def __init__(self, base: CheckpointReader, finetunes: list[tuple[CheckpointReader, Alignment]], device: torch.device):
        self.base, self.finetunes, self.device = base, finetunes, device

    def load(self, name: str, rows: tuple[int, int] | None, workspace: _Workspace) -> torch.Tensor:
        """[T+1, n] float32 on the compute device; row 0 is the base. Non-float: the raw tensor."""
        if not self.base.info(name).is_float:
            return self.base.read(name, rows=rows)
        n = math.prod(self.base.piece_shape(name, rows))
        pin = self.device.type == "cuda"
        if n <= workspace.capacity:
            stacked = workspace.inputs[:, :n]
        else:
            stacked = torch.empty((len(self.finetunes) + 1, n), dtype=torch.float32, pin_memory=pin)
        sources = [(self.base, rows)] + [(r, aligned_rows(a, name, rows)) for r, a in self.finetunes]
        for row, (reader, piece_rows) in zip(stacked, sources, strict=True):
            reader.read_f32_into(name, row, piece_rows)
        return stacked.to(self.device) if pin else stacked


def _merge_piece(
    stacked: torch.Tensor, weights: torch.Tensor, plan: MergePlan, labels: list[str], name: str, part: int,
    out: torch.Tensor | None, seed_name: str | None = None, base_label: str = "base",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Returns (merged float32 piece, flat; gram of the raw task vectors [T, T] in float64; ‖θ₀ piece‖²).

    Works in place: rows 1..T of `stacked` become the task vectors; row 0 stays the base.
    """
    if plan.sparsify == "none" and plan.consensus == "none" and not plan.normalize and out is not None:
        return _linear_piece_blocked(stacked, weights, plan, labels, name, out, base_label)
    base, taus = stacked[0], stacked[1:]
    base_sq = float(torch.dot(base, base))
    taus.sub_(base)
    gram = (taus @ taus.T).double()
    _require_finite(gram, base_sq, labels, name, base_label)
    sparsify_(taus, plan, labels, seed_name or name, part)
    delta = combine(taus, weights, plan, out=out)
    return delta.add_(base), gram, base_sq


def _require_finite(gram: torch.Tensor, base_sq: float, labels: list[str], name: str, base_label: str) -> None:
    """‖θ₀‖² and ‖τ_t‖² (the gram's diagonal) are non-finite iff they hold NaN/Inf: a free input check.

    The base is checked first: NaN in θ₀ makes every τ_t NaN, and the base, not a fine-tune, is to blame.
    """
    if not math.isfinite(base_sq):
        raise CheckpointError(f"{base_label}: tensor {name!r} contains NaN or Inf")
    if not bool(torch.isfinite(gram.diagonal()).all()):
        bad = [labels[i] for i in range(len(labels)) if not math.isfinite(float(gram[i, i]))]
        raise CheckpointError(f"fine-tune {', '.join(repr(b) for b in bad)}: tensor {name!r} contains NaN or Inf")


LINEAR_BLOCK = 1 << 15


def _linear_piece_blocked(
    stacked: torch.Tensor, weights: torch.Tensor, plan: MergePlan, labels: list[str], name: str, out: torch.Tensor,
    base_label: str = "base",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Linear merges in cache-sized column blocks: τ, the gram and θ₀ + Σ w τ touch memory once."""
    count = stacked.shape[0] - 1
    gram = torch.zeros((count, count), dtype=torch.float64)
    base_sq = 0.0
    row = weights.reshape(1, -1) * plan.scale
    for start in range(0, stacked.shape[1], LINEAR_BLOCK):
        block = stacked[:, start : start + LINEAR_BLOCK]
        taus = block[1:]
        base_sq += float(torch.dot(block[0], block[0]))
        taus.sub_(block[0])
        gram += (taus @ taus.T).double()
        target = out[start : start + LINEAR_BLOCK].reshape(1, -1)
        torch.matmul(row, taus, out=target)
        target.add_(block[0])
    _require_finite(gram, base_sq, labels, name, base_label)
    return out[: stacked.shape[1]], gram, base_sq


class _Job:
    """The inputs of one merge, opened and aligned, and its output plan (shared by every entry point)."""

    def __init__(self, base_dir: Path, finetunes: list[tuple[str, Path]], coefficients: Coefficients,
                 plan: MergePlan, dtype: str, device: str, vocab: str):
        self.device = resolve_device(device)
        self.base = CheckpointReader(base_dir, label="base")
        self.base_label = f"base {Path(base_dir)}"
        readers = [CheckpointReader(path, label=label) for label, path in finetunes]
        self.pairs = [(reader, align(self.base, reader, vocab)) for reader in readers]
        self.labels = [label for label, _ in finetunes]
        # vocabulary rows (added tokens) that `vocab: base` leaves out, per fine-tune and tensor
        self.dropped_rows = {label: alignment.dropped_rows for (label, _), (_, alignment)
                             in zip(finetunes, self.pairs, strict=True) if alignment.dropped_rows}
        if coefficients.tasks != self.labels:
            raise CheckpointError(f"coefficients are for {coefficients.tasks}, merge inputs are {self.labels}")
        self.coefficients, self.plan = coefficients, plan
        self.tensors_out = output_plan(self.base, dtype)

    def pieces(self, tensors: list[TensorInfo]) -> list[tuple[TensorInfo, tuple[int, int] | None]]:
        """Work items in write order: whole tensors, or row chunks for element-wise methods."""
        base = self.base
        return [
            (info, rows)
            for info in tensors
            for rows in (row_chunks(base.info(info.name), checkpoint.CHUNK_ELEMENTS)
                         if base.info(info.name).is_float and chunked(self.plan) else [None])
        ]

    def merged_count(self, tensors: list[TensorInfo]) -> int:
        return sum(1 for info in tensors if self.base.info(info.name).is_float)


@dataclass
class _Totals:
    """What a stream of pieces adds up to; shard partials sum to the whole model's."""

    gram: torch.Tensor
    base_sq_norm: float = 0.0
    bytes_read: int = 0
    rounding_num: float = 0.0
    rounding_den: float = 0.0


def _stream(job: _Job, work: list, writer: ShardedWriter, total_bytes: int, progress: ProgressFn | None,
            hang_at: str) -> _Totals:
    """Reads, merges and writes every piece of `work` in order, overlapping read, compute and write."""
    base, plan, labels, coefficients, compute_device = job.base, job.plan, job.labels, job.coefficients, job.device
    inputs = _Inputs(base, job.pairs, compute_device)
    aliases = tied_aliases(base) if plan.sparsify == "random" else {}
    capacity = checkpoint.CHUNK_ELEMENTS  # whole tensors larger than this (TIES only) get their own buffers
    workspaces = [_Workspace(len(labels) + 1, capacity, compute_device.type == "cuda") for _ in range(2)]
    totals = _Totals(gram=torch.zeros((len(labels), len(labels)), dtype=torch.float64))
    weights_cache: dict[str, torch.Tensor] = {}
    with ThreadPoolExecutor(max_workers=1) as reader_pool, ThreadPoolExecutor(max_workers=1) as writer_pool:
        pending_read: Future = reader_pool.submit(inputs.load, work[0][0].name, work[0][1], workspaces[0])
        pending_write: Future | None = None
        done_bytes = 0
        for index, (info, rows) in enumerate(work):
            loaded = pending_read.result()
            workspace = workspaces[index % 2]
            if index + 1 < len(work):
                following = work[index + 1]
                pending_read = reader_pool.submit(inputs.load, following[0].name, following[1], workspaces[(index + 1) % 2])
            shape = base.piece_shape(info.name, rows)
            totals.bytes_read += loaded.numel() * loaded.element_size()
            if base.info(info.name).is_float:
                group = coefficients.tensor_groups.get(info.name, "model")
                if group not in weights_cache:
                    weights_cache[group] = torch.tensor(coefficients.groups[group], dtype=torch.float32, device=compute_device)
                n = loaded.shape[1]
                out = workspace.result[:n] if n <= workspace.capacity and compute_device.type == "cpu" else None
                result32, gram, base_sq = _merge_piece(loaded, weights_cache[group], plan, labels, info.name,
                                                       rows[0] if rows else 0, out, aliases.get(info.name),
                                                       job.base_label)
                totals.gram += gram.cpu()
                totals.base_sq_norm += base_sq
                result = result32.reshape(shape).to(info.dtype)
                if info.dtype != torch.float32:
                    base32 = loaded[0].reshape(shape)
                    lost = result.to(torch.float32) - result32.reshape(shape)
                    totals.rounding_num += float(torch.linalg.vector_norm(lost, dtype=torch.float64)) ** 2
                    totals.rounding_den += float(torch.linalg.vector_norm(result32.reshape(shape) - base32, dtype=torch.float64)) ** 2
                    if not bool(torch.isfinite(result).all()):
                        raise CheckpointError(f"tensor {info.name!r} overflows {info.dtype} after merging")
            else:
                result = loaded
            if pending_write is not None:
                pending_write.result()
            pending_write = writer_pool.submit(writer.write, info.name, result.to("cpu"))
            done_bytes += result.numel() * result.element_size()
            if progress is not None:
                progress(done_bytes, total_bytes, info.name)
            if index == len(work) // 2:
                hang_point(hang_at)
        if pending_write is not None:
            pending_write.result()
    return totals


def _rounding_loss(num: float, den: float) -> float:
    return math.sqrt(num / den) if den > 0 else 0.0


def merge_checkpoints(
    base_dir: Path,
    finetunes: list[tuple[str, Path]],
    coefficients: Coefficients,
    plan: MergePlan,
    out_dir: Path,
    *,
    dtype: str = "auto",
    device: str = "auto",
    shard_size_mb: float = 2000,
    vocab: str = "base",
    progress: ProgressFn | None = None,
    existing: str = "refuse",
    max_relative_norm: float | None = None,
) -> MergeReport:
    """The whole model in one process: every shard, the index, aux files, verified, then renamed in.

    With `max_relative_norm`, a fine-tune whose ‖τ‖/‖θ₀‖ (from this pass's own sums) is above it
    fails the merge before anything is committed: the check costs no extra read of the models.

    `existing` says what may happen to something already at `out_dir` (metamerge.outputs):
    `refuse` (default), `replace` (an earlier metamerge output only) or `keep` (an intact
    metamerge output stays, ours is dropped). Anything else there is never touched. The work
    goes to a marked, locked temporary sibling; ENOSPC / EROFS / EACCES end as one WriteError
    naming `out_dir`, with the temporary removed.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    outputs.check_output(out_dir, existing)
    job = _Job(base_dir, finetunes, coefficients, plan, dtype, device, vocab)
    tensors_out = job.tensors_out
    total_bytes = sum(info.nbytes for info in tensors_out)
    with writing(out_dir):
        temp = outputs.make_temp(out_dir)
    writer = None
    try:
        with writing(out_dir):
            writer = ShardedWriter(temp.path, tensors_out, shard_size_mb * 1024 * 1024)
            totals = _stream(job, job.pieces(tensors_out), writer, total_bytes, progress, "merge")
            writer.finish()
            base_norm = math.sqrt(totals.base_sq_norm)
            check_relative_norms({label: math.sqrt(max(float(totals.gram[i, i]), 0.0)) / base_norm if base_norm else
                                  math.inf for i, label in enumerate(job.labels)}, max_relative_norm)
            verify_checkpoint(temp.path, tensors_out)
            copy_aux_files(base_dir, temp.path)
            _set_config_dtype(temp.path, dtype)
            outputs.commit(temp, out_dir, existing)
    except BaseException:
        if writer is not None:
            writer.abort()
        temp.discard()
        raise
    merged = job.merged_count(tensors_out)
    return MergeReport(
        out_dir=out_dir, device=str(job.device), tensors=len(tensors_out), merged_tensors=merged,
        copied_tensors=len(tensors_out) - merged, bytes_read=totals.bytes_read, bytes_written=total_bytes,
        seconds=time.monotonic() - started, gram=totals.gram.tolist(), labels=job.labels,
        delta_rounding_loss=_rounding_loss(totals.rounding_num, totals.rounding_den),
        base_sq_norm=totals.base_sq_norm, dropped_rows=job.dropped_rows,
    )


# --- one output shard per call (scale-out: DESIGN.md §9) ------------------------------------------


def output_shard_files(base_dir: Path, dtype: str = "auto", shard_size_mb: float = 2000) -> list[str]:
    """File names of the output shards, from the base's header alone: how many shard tasks to start."""
    tensors = output_plan(CheckpointReader(base_dir, label="base"), dtype)
    return shard_filenames(len(plan_shards(tensors, shard_size_mb * 1024 * 1024)))


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


def merge_shard(
    base_dir: Path,
    finetunes: list[tuple[str, Path]],
    coefficients: Coefficients,
    plan: MergePlan,
    out_dir: Path,
    index: int,
    *,
    dtype: str = "auto",
    device: str = "auto",
    shard_size_mb: float = 2000,
    vocab: str = "base",
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
    job = _Job(base_dir, finetunes, coefficients, plan, dtype, device, vocab)
    tmp_dir = out_dir / f".shard-{index}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    writer = ShardedWriter(tmp_dir, job.tensors_out, shard_size_mb * 1024 * 1024, only=index)
    tensors = writer.shards[index]
    filename = writer.filenames[index]
    total_bytes = sum(info.nbytes for info in tensors)
    try:
        with writing(out_dir / filename):
            totals = _stream(job, job.pieces(tensors), writer, total_bytes, progress, "merge-shard")
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


def finalize_merge(
    base_dir: Path,
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
    tensors_out = output_plan(CheckpointReader(base_dir, label="base"), dtype)
    planned = plan_shards(tensors_out, shard_size_mb * 1024 * 1024)
    filenames = shard_filenames(len(planned))
    got = sorted(report.filename for report in shards)
    if got != sorted(filenames):
        raise CheckpointError(f"finalize: shards {got} do not match the plan {filenames}")
    outputs.check_output(out_dir, existing)
    with writing(out_dir):
        temp = outputs.make_temp(out_dir)
    try:
        with writing(out_dir):
            for report in shards:
                _link_or_copy(Path(report.path), temp.path / report.filename)
            write_index(temp.path, planned, filenames)
            verify_checkpoint(temp.path, tensors_out)
            copy_aux_files(base_dir, temp.path)
            _set_config_dtype(temp.path, dtype)
            outputs.commit(temp, out_dir, existing)
    except BaseException:
        temp.discard()
        raise
    gram = torch.zeros((len(labels), len(labels)), dtype=torch.float64)
    for report in shards:
        gram += torch.tensor(report.gram, dtype=torch.float64)
    merged = sum(report.merged_tensors for report in shards)
    ordered = sorted(shards, key=lambda r: r.index)
    return MergeReport(
        out_dir=out_dir, device=ordered[0].device, tensors=len(tensors_out), merged_tensors=merged,
        copied_tensors=len(tensors_out) - merged, bytes_read=sum(r.bytes_read for r in shards),
        bytes_written=sum(r.bytes_written for r in shards),
        seconds=sum(r.seconds for r in shards) + time.monotonic() - started, gram=gram.tolist(), labels=labels,
        delta_rounding_loss=_rounding_loss(sum(r.rounding_num for r in shards), sum(r.rounding_den for r in shards)),
        base_sq_norm=sum(r.base_sq_norm for r in shards), dropped_rows=ordered[0].dropped_rows,
    )


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _set_config_dtype(model_dir: Path, dtype: str) -> None:
    config = model_dir / "config.json"
    if dtype == "auto" or not config.exists():
        return
    data = json.loads(config.read_text())
    for key in ("torch_dtype", "dtype"):
        if key in data:
            data[key] = dtype
    config.write_text(json.dumps(data, indent=2))
