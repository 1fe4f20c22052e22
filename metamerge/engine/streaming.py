"""The streaming loop: θ = θ₀ + Δ(τ_1..τ_T), one tensor (or row chunk) at a time.

For each piece it reads the base and every fine-tune (mmap), computes in float32 on the
chosen device, writes the result straight into the output shard, and forgets it. Reading the
next piece overlaps with computing this one (a background thread; pinned buffers on CUDA),
and writing overlaps with the next read. Peak memory is a few tensors, never the model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass

import torch

from metamerge.engine import checkpoint
from metamerge.engine.checkpoint import CheckpointReader, TensorInfo, row_chunks
from metamerge.engine.coefficients import Coefficients
from metamerge.engine.compat import align, aligned_rows, is_vocab_tensor, tied_aliases
from metamerge.engine.lora import open_finetune
from metamerge.engine.pieces import PieceReader, WholeResult, Workspace
from metamerge.engine.prefetch import read_ahead
from metamerge.engine.remote import ModelSource, open_checkpoint
from metamerge.engine.thresholds import ThresholdCache
from metamerge.engine.writer import (
    ShardedWriter,
)
from metamerge.errors import CheckpointError
from metamerge.faults import hang_point
from metamerge.methods import ties
from metamerge.methods.kernels import chunked, combine, linear_blocked, sparsify_
from metamerge.methods.native import linear_kernels, use_compiled
from metamerge.methods.plan import MergePlan

OUTPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ProgressFn = Callable[[int, int, str], None]


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


def _reads_only(plan: MergePlan) -> Callable[[int], bool]:
    """Which pieces (by entry count) the merge only reads: those may be mapped files. Linear merges
    and the compiled TIES passes form τ into their own scratch; every other path makes τ in place."""
    return lambda n: plan.linear or (ties.fused(plan, n, torch.device("cpu")) and ties.use_compiled())


def _merge_piece(
    stacked: torch.Tensor | list[torch.Tensor], weights: torch.Tensor, plan: MergePlan, labels: list[str],
    name: str, part: int, out: torch.Tensor | None, seed_name: str | None = None, base_label: str = "base",
    shape: tuple[int, ...] = (), trims: ThresholdCache | None = None, ahead: ties.Brackets | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Returns (merged float32 piece, flat; gram of the raw task vectors [T, T] in float64; ‖θ₀ piece‖²).

    `stacked` is a [T+1, n] tensor, row 0 the base, whose rows 1..T become the task vectors, or
    (for the paths that only read, see `_reads_only`) a list of its rows, which may be mapped files.
    `shape` is the piece's shape: DELLA ranks within its rows, Iso-C treats a 2-D one as a matrix.
    `trims`: TIES trims remembered between merges (whole tensors only), and where to learn them.
    `ahead`: TIES brackets made on the read-ahead thread (`ties.brackets_ahead`).
    """
    if plan.linear and out is not None:
        return _linear_piece_blocked(list(stacked), weights, plan, labels, name, out, base_label)
    if ties.fused(plan, stacked[0].numel(), stacked[0].device):
        return ties.ties_piece(stacked, weights, plan, out,
                               lambda gram, base_sq: _require_finite(gram, base_sq, labels, name, base_label),
                               trims.trims(name) if trims is not None else None,
                               (lambda found: trims.learn(name, found)) if trims is not None else None, ahead)
    assert isinstance(stacked, torch.Tensor), "only read-only paths get rows"
    if ties.small(plan, stacked.shape[1], stacked.device):
        merged = ties.small_piece(stacked, weights, plan, out, lambda gram, base_sq: _require_finite(
            gram, base_sq, labels, name, base_label))
        if merged is not None:
            return merged
    base, taus = stacked[0], stacked[1:]
    base_sq = float(torch.dot(base, base))
    taus.sub_(base)
    gram = (taus @ taus.T).double()
    _require_finite(gram, base_sq, labels, name, base_label)
    sparsify_(taus, plan, labels, seed_name or name, part, row_length=shape[-1] if len(shape) > 1 else None)
    # Iso-C leaves vocabulary tables (embeddings, LM head) as a mean: their rows are tokens, not a map
    spectral = plan.spectral != "none" and len(shape) == 2 and not is_vocab_tensor(name)
    matrix = (shape[0], shape[1]) if spectral else None
    delta = combine(taus, weights, plan, out=out, matrix_shape=matrix)
    return delta.add_(base), gram, base_sq


def _require_finite(gram: torch.Tensor, base_sq: float, labels: list[str], name: str, base_label: str) -> None:
    """‖θ₀‖² and ‖τ_t‖² (the gram's diagonal) are non-finite iff they hold NaN/Inf: a free input check.

    The base is checked first: NaN in θ₀ makes every τ_t NaN, and the base, not a fine-tune, is to blame.
    """
    if not math.isfinite(base_sq):
        raise CheckpointError(f"{base_label}: tensor {name!r} contains NaN or Inf")
    norms = gram.diagonal().tolist()  # (a few torch steps here cost 0.15 ms per piece inside a merge)
    if not all(math.isfinite(norm) for norm in norms):
        bad = [labels[i] for i, norm in enumerate(norms) if not math.isfinite(norm)]
        raise CheckpointError(f"fine-tune {', '.join(repr(b) for b in bad)}: tensor {name!r} contains NaN or Inf")


def _linear_piece_blocked(
    rows: list[torch.Tensor], weights: torch.Tensor, plan: MergePlan, labels: list[str], name: str, out: torch.Tensor,
    base_label: str = "base",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Linear merges in one pass over the rows (compiled, `methods/linear_kernels.py`) or in torch's
    cache-sized blocks (`kernels.linear_blocked`): the same floats. The rows are only read (they
    may be mapped files)."""
    scaled = weights * plan.scale
    compiled = use_compiled() and all(r.dtype == torch.float32 and r.is_contiguous() and r.device.type == "cpu"
                                      for r in rows)
    gram, base_sq = (linear_kernels().linear_merge if compiled else linear_blocked)(rows, scaled, out)
    _require_finite(gram, base_sq, labels, name, base_label)
    return out[: rows[0].numel()], gram, base_sq


class MergeJob:
    """The inputs of one merge, opened and aligned, and its output plan (shared by every entry point)."""

    def __init__(self, base_dir: ModelSource, finetunes: list[tuple[str, ModelSource]], coefficients: Coefficients,
                 plan: MergePlan, dtype: str, device: str, vocab: str, thresholds: ThresholdCache | None = None):
        self.device = resolve_device(device)
        self.thresholds = thresholds
        self.base = open_checkpoint(base_dir, "base")
        self.base_label = f"base {getattr(base_dir, 'ref', base_dir)}"
        readers = [open_finetune(base_dir, path, label) for label, path in finetunes]
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


def compute_threads() -> int:
    """Intra-op threads for a CPU merge: the cores left after the reader and the writer thread.

    A linear merge is a stream of short, memory-bound passes; torch threads that contend with the two
    I/O threads for the same cores slow it down (2 cores: 1.25 s with 2 threads, 0.95–1.04 s with 1,
    benchmark family, task arithmetic). Never more than the process was already allowed.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads(), cores - 2))


def stream_merge(job: MergeJob, work: list, writer: ShardedWriter, total_bytes: int, progress: ProgressFn | None,
                 hang_at: str) -> _Totals:
    """Reads, merges and writes every piece of `work` in order, overlapping read, compute and write."""
    if job.device.type != "cpu" or not job.plan.linear:  # TIES & co. are compute-bound: every core helps
        try:
            return _stream_merge(job, work, writer, total_bytes, progress, hang_at)
        finally:
            ties.release_buffers()
    previous = torch.get_num_threads()
    torch.set_num_threads(compute_threads())
    try:
        return _stream_merge(job, work, writer, total_bytes, progress, hang_at)
    finally:
        torch.set_num_threads(previous)


def _stream_merge(job: MergeJob, work: list, writer: ShardedWriter, total_bytes: int, progress: ProgressFn | None,
                  hang_at: str) -> _Totals:
    base, plan, labels, coefficients, compute_device = job.base, job.plan, job.labels, job.coefficients, job.device
    inputs = PieceReader(base, job.pairs, compute_device, _reads_only(plan))
    aliases = tied_aliases(base) if plan.random else {}
    _expect_reads(job, work)
    capacity = checkpoint.CHUNK_ELEMENTS  # whole tensors larger than this (TIES only) get their own buffers
    workspaces = [Workspace(len(labels) + 1, capacity, compute_device.type == "cuda") for _ in range(2)]
    whole = WholeResult()
    totals = _Totals(gram=torch.zeros((len(labels), len(labels)), dtype=torch.float64))
    weights_cache: dict[str, torch.Tensor] = {}

    def load(index: int, slot: int) -> tuple[torch.Tensor | list[torch.Tensor], ties.Brackets | None]:
        """On the read-ahead thread: the piece, and the TIES brackets it will need (`ties.brackets_ahead`)
        where its pages were mapped ahead anyway. A bigger piece's sample would fault in most of it
        (4096 positions, 64 KB each) next to the piece being merged: 320 MB more peak RSS when the
        LM head and the embedding follow each other. The merge brackets those itself."""
        info, rows = work[index]
        loaded = inputs.load(info.name, rows, workspaces[slot])
        if not base.info(info.name).is_float or loaded[0].numel() > capacity:
            return loaded, None
        trims = job.thresholds if rows is None else None
        return loaded, ties.brackets_ahead(loaded, plan, trims.peek(info.name) if trims is not None else None)

    reads = read_ahead(len(work), load)
    with closing(reads), ThreadPoolExecutor(max_workers=1) as writer_pool:
        pending_write: Future | None = None
        done_bytes = 0
        for index, (info, rows) in enumerate(work):
            loaded, ahead = next(reads)
            workspace = workspaces[index % 2]  # the slot read_ahead loaded this piece into
            shape = base.piece_shape(info.name, rows)
            totals.bytes_read += sum(row.numel() * row.element_size() for row in
                                     (loaded if isinstance(loaded, list) else [loaded]))
            if base.info(info.name).is_float:
                group = coefficients.tensor_groups.get(info.name, "model")
                if group not in weights_cache:
                    weights_cache[group] = torch.tensor(coefficients.groups[group], dtype=torch.float32, device=compute_device)
                n = loaded[0].numel()
                out = None
                if compute_device.type == "cpu" and n <= workspace.capacity:
                    out = workspace.result[:n]
                elif compute_device.type == "cpu":  # a whole tensor (TIES & co.): its write must be done first,
                    if pending_write is not None:  # which also gives the loading thread time to unmap the last
                        pending_write.result()  # whole piece (its first pass beside that: peak RSS 898 → 1062 MB)
                    out = whole.take(n)
                result32, gram, base_sq = _merge_piece(loaded, weights_cache[group], plan, labels, info.name,
                                                       rows[0] if rows else 0, out, aliases.get(info.name),
                                                       job.base_label, tuple(shape),
                                                       job.thresholds if rows is None else None, ahead)
                totals.gram += gram.cpu()
                totals.base_sq_norm += base_sq
                result = result32.reshape(shape).to(info.dtype)
                if info.dtype != torch.float32:
                    base32 = loaded[0].reshape(shape)
                    lost = result.to(torch.float32) - result32.reshape(shape)
                    totals.rounding_num += float(torch.linalg.vector_norm(lost, dtype=torch.float64)) ** 2
                    totals.rounding_den += float(torch.linalg.vector_norm(result32.reshape(shape) - base32, dtype=torch.float64)) ** 2
                    del base32
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
            # no reference may outlive the piece: read_ahead starts the next load only after it takes this
            # one back, so a mapped piece is unmapped before a third one is mapped (RSS: two in flight)
            del loaded
        if pending_write is not None:
            pending_write.result()
    return totals


def _expect_reads(job: MergeJob, work: list) -> None:
    """Tells every reader the pieces to come, in order: ranged (S3) readers fetch them ahead."""
    job.base.expect([(info.name, rows) for info, rows in work])
    floats = [(info, rows) for info, rows in work if job.base.info(info.name).is_float]
    for reader, alignment in job.pairs:
        reader.expect([(info.name, aligned_rows(alignment, info.name, rows)) for info, rows in floats])


def rounding_loss(num: float, den: float) -> float:
    return math.sqrt(num / den) if den > 0 else 0.0
