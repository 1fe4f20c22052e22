"""Per-tensor statistics of one task vector τ = θ_ft − θ_base, streamed tensor by tensor.

MetaGPT needs only ‖τ_t‖² per tensor, so extraction is one pass over (base, fine-tune) that
keeps a float per tensor. It doubles as the compatibility and sanity check (names, shapes,
NaN/Inf) so that a broken fine-tune fails here, before the expensive merge.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from metamerge.engine import checkpoint
from metamerge.engine.checkpoint import CheckpointReader, row_chunks
from metamerge.engine.compat import align, aligned_rows, tied_aliases
from metamerge.engine.lora import LoraReader, is_adapter, open_finetune
from metamerge.engine.pieces import can_map, read_f32
from metamerge.engine.prefetch import read_ahead
from metamerge.engine.remote import ModelSource, open_checkpoint
from metamerge.errors import CheckpointError
from metamerge.io.remote_model import RemoteModel
from metamerge.methods.kernels import chunked
from metamerge.methods.norms import base_and_difference_sq_norms, one_thread, sq_norm, sq_norm_after_sparsify
from metamerge.methods.plan import MergePlan

STATS_VERSION = 5  # 2: ‖θ₀‖², raw ‖τ‖², dropped rows; 3: 64 K blocks; 4: machine-independent; 5: sequential columns


@dataclass(frozen=True)
class TaskVectorStats:
    label: str
    sq_norms: dict[str, float]  # float tensors only (after the plan's sparsification, if any)
    numel: int
    changed_tensors: int
    base_sq_norm: float = 0.0  # ‖θ₀‖² over the same tensors
    raw_sq_norm: float = 0.0  # ‖τ‖² before any sparsification
    dropped_rows: dict[str, int] = field(default_factory=dict)  # vocabulary rows `vocab: base` left out

    @property
    def total_sq_norm(self) -> float:
        return sum(self.sq_norms.values())

    @property
    def relative_norm(self) -> float:
        """‖τ‖ / ‖θ₀‖: a few % for real fine-tunes, ≥ 1 for weights that do not descend from the base."""
        return math.sqrt(self.raw_sq_norm / self.base_sq_norm) if self.base_sq_norm > 0 else math.inf

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"version": STATS_VERSION, **asdict(self)}))

    @classmethod
    def load(cls, path: Path) -> TaskVectorStats:
        data = json.loads(path.read_text())
        data.pop("version", None)
        return cls(**data)


def check_relative_norms(norms: dict[str, float], bound: float | None) -> None:
    """Fails, naming the fine-tune and the number, when ‖τ_t‖/‖θ₀‖ is above `bound` (None: no check).

    Independent weights of one architecture give ‖θ_t − θ₀‖ ≥ ‖θ₀‖ (≈ √2 ‖θ₀‖ for equal scales), real
    fine-tunes a few percent; `merge.max_relative_norm` (default 0.8, docs/recipes.md) sits in between.
    """
    if bound is None:
        return
    for label, value in norms.items():
        if not value <= bound:
            raise CheckpointError(f"fine-tune {label!r}: ‖τ‖/‖θ₀‖ = {value:.3f} is above merge.max_relative_norm "
                                  f"{bound:g}; it does not look like a fine-tune of this base")


def extract_stats(
    base_dir: ModelSource, finetune_dir: ModelSource, label: str, plan: MergePlan | None = None, vocab: str = "base"
) -> TaskVectorStats:
    """‖τ‖² per float tensor (after the plan's sparsification when it has one), in float64 sums.

    Also ‖θ₀‖² and the raw ‖τ‖² (for the relative task-vector norm), and which vocabulary rows
    `vocab: base` drops. NaN/Inf in the base is blamed on the base, not on the fine-tune.
    """
    return extract_stats_many(base_dir, [(finetune_dir, label)], plan, vocab)[0]


@dataclass
class _Sums:
    """One fine-tune's per-tensor sums during a shared pass over the base."""

    label: str
    reader: CheckpointReader | LoraReader
    alignment: object
    values: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # name -> (‖τ‖², raw ‖τ‖², numel)


@dataclass
class TensorSums:
    """Per-tensor sums of one pass over some of a model's tensors, for several fine-tunes.

    Parts over disjoint tensors (one Dask task per output shard) combine into exactly the stats of
    one pass over all tensors: `combine_tensor_sums` adds them up in the base's tensor order, as
    the single pass does, so the floats are identical whichever way the work was split.
    """

    labels: list[str]
    base_sq: dict[str, float]
    values: dict[str, dict[str, tuple[float, float, int]]]
    dropped_rows: dict[str, dict[str, int]]


def extract_stats_many(
    base_dir: ModelSource, finetunes: list[tuple[ModelSource, str]], plan: MergePlan | None = None, vocab: str = "base"
) -> list[TaskVectorStats]:
    """`extract_stats` of several fine-tunes in one pass that reads each base tensor once.

    Each fine-tune's numbers are computed exactly as alone (same pieces, same order of
    operations), so the stats are identical to one-by-one extraction: only the base's
    repeated reads are gone ((T+1) model reads instead of 2T).
    """
    plan = plan or MergePlan()
    base = open_checkpoint(base_dir, "base")
    results: dict[str, TaskVectorStats] = {}
    full: list[tuple[ModelSource, str]] = []
    for finetune_dir, label in finetunes:
        if plan.sparsify == "none" and not isinstance(finetune_dir, RemoteModel) and is_adapter(finetune_dir):
            results[label] = _adapter_stats(base_dir, base, LoraReader(base_dir, finetune_dir, label), label)
        else:
            full.append((finetune_dir, label))
    if full:
        sums = tensor_sums(base_dir, full, plan, vocab, base=base)
        floats = [name for name in base.names if base.info(name).is_float]
        results.update(zip(sums.labels, combine_tensor_sums([sums], floats), strict=True))
    base.close()
    return [results[label] for _, label in finetunes]


def tensor_sums(base_dir: ModelSource, finetunes: list[tuple[ModelSource, str]], plan: MergePlan | None = None,
                vocab: str = "base", names: set[str] | None = None, base: CheckpointReader | None = None) -> TensorSums:
    """One pass over the base's float tensors (only `names`, when given) and every fine-tune's.

    `base`: the base already opened by the caller (its headers are not read again); the caller closes it.
    """
    plan = plan or MergePlan()
    owned = base is None
    base = base if base is not None else open_checkpoint(base_dir, "base")
    sums = [_Sums(label, finetune, align(base, finetune, vocab))
            for label, finetune in ((label, open_finetune(base_dir, d, label)) for d, label in finetunes)]
    tensors = [name for name in base.names if base.info(name).is_float and (names is None or name in names)]
    capacity = checkpoint.CHUNK_ELEMENTS
    aliases = tied_aliases(base) if plan.random else {}
    _expect_reads(base, sums, plan, capacity, tensors)
    pieces = {name: row_chunks(base.info(name), capacity) if chunked(plan) else [None] for name in tensors}
    order = [(name, rows) for name in tensors if sums for rows in pieces[name]]
    slots = [[torch.empty(capacity) for _ in range(len(sums) + 1)] for _ in range(2)] if order else []

    # plain sums only read the pieces: those are mapped when every input can be, and the sums get
    # every core; pieces read by copy leave one core to the reader (a sparsified pass trims in place)
    mapped = plan.sparsify == "none" and all(can_map(r, tensors) for r in [base, *(ft.reader for ft in sums)])

    def load(index: int, slot: int) -> list[torch.Tensor]:
        name, rows = order[index]
        buffers = slots[slot]
        return [read_f32(base, name, rows, buffers[0], mapped)] + [
            read_f32(ft.reader, name, aligned_rows(ft.alignment, name, rows), buffer, mapped)
            for ft, buffer in zip(sums, buffers[1:], strict=True)]

    loaded = read_ahead(len(order), load)
    base_sqs: dict[str, float] = {}
    try:
        with one_thread() if plan.sparsify == "none" and not mapped else nullcontext():
            for name in tensors if sums else []:
                info = base.info(name)
                base_sq = 0.0
                values = [0.0] * len(sums)
                raws = [0.0] * len(sums)
                for rows in pieces[name]:
                    theta0 = thetas = None  # the last piece goes first: read_ahead unmaps it on its thread
                    theta0, *thetas = next(loaded)
                    piece_base_sq, differences = base_and_difference_sq_norms(thetas, theta0)  # one read, in cache
                    base_sq += piece_base_sq
                    if plan.sparsify == "none":  # τ is never written
                        values = [v + d for v, d in zip(values, differences, strict=True)]
                        continue
                    raws = [r + d for r, d in zip(raws, differences, strict=True)]
                    for i, (ft, theta) in enumerate(zip(sums, thetas, strict=True)):
                        tau = theta.sub_(theta0)
                        values[i] += sq_norm_after_sparsify(tau, plan, ft.label, aliases.get(name, name),
                                                            rows[0] if rows else 0,
                                                            info.shape[-1] if len(info.shape) > 1 else None)
                if not math.isfinite(base_sq):
                    raise CheckpointError(f"base {getattr(base_dir, 'ref', base_dir)}: tensor {name!r} contains NaN or Inf")
                base_sqs[name] = base_sq
                for ft, value, raw_sq in zip(sums, values, raws, strict=True):
                    if not math.isfinite(value) or not math.isfinite(raw_sq):
                        raise CheckpointError(f"fine-tune {ft.label!r}: tensor {name!r} contains NaN or Inf")
                    ft.values[name] = (value, raw_sq if plan.sparsify != "none" else value, math.prod(info.shape))
    finally:
        loaded.close()
        for reader in ((base,) if owned else ()) + tuple(ft.reader for ft in sums):
            reader.close()
    return TensorSums([ft.label for ft in sums], base_sqs, {ft.label: ft.values for ft in sums},
                      {ft.label: dict(ft.alignment.dropped_rows) for ft in sums})


def combine_tensor_sums(parts: list[TensorSums], order: list[str]) -> list[TaskVectorStats]:
    """The stats of each fine-tune of `parts`, which must cover `order` (the base's float tensors, in
    its order) exactly once together; summed in that order (see TensorSums)."""
    base_sq = {name: value for part in parts for name, value in part.base_sq.items()}
    if sum(len(part.base_sq) for part in parts) != len(order) or set(base_sq) != set(order):
        raise CheckpointError(f"extraction parts cover {len(base_sq)} tensors, the base has {len(order)} float tensors")
    base_total = 0.0
    for name in order:
        if name in base_sq:
            base_total += base_sq[name]
    stats = []
    for label in parts[0].labels:
        values = {name: v for part in parts for name, v in part.values[label].items()}
        if set(values) != set(base_sq):
            raise CheckpointError(f"fine-tune {label!r}: the extraction parts do not cover the same tensors")
        sq_norms: dict[str, float] = {}
        raw_total, numel, changed = 0.0, 0, 0
        for name in order:
            if name in values:
                value, raw, count = values[name]
                sq_norms[name] = value
                raw_total += raw
                numel += count
                changed += value > 0
        stats.append(TaskVectorStats(label=label, sq_norms=sq_norms, numel=numel, changed_tensors=changed,
                                     base_sq_norm=base_total, raw_sq_norm=raw_total,
                                     dropped_rows=parts[0].dropped_rows[label]))
    return stats


def _expect_reads(base: CheckpointReader, sums: list[_Sums], plan: MergePlan, capacity: int,
                  tensors: list[str]) -> None:
    """The pass's reads in its order, so ranged (S3) readers fetch them ahead."""
    pieces = [(name, rows) for name in tensors if sums
              for rows in (row_chunks(base.info(name), capacity) if chunked(plan) else [None])]
    base.expect(pieces)
    for ft in sums:
        ft.reader.expect([(name, aligned_rows(ft.alignment, name, rows)) for name, rows in pieces])


def _adapter_stats(base_dir: ModelSource, base: CheckpointReader, finetune: LoraReader, label: str) -> TaskVectorStats:
    """‖τ‖² of an adapter from r×r products; only `modules_to_save` tensors are read whole.

    ‖θ₀‖² (for the relative norm) is read once per base and process, so extracting several
    adapters of one base costs one base read plus the adapters' own bytes.
    """
    adapter = finetune.adapter
    base_norms = base_sq_norms(base_dir)
    sq_norms: dict[str, float] = {}
    numel = changed = 0
    for name in base.names:
        info = base.info(name)
        if not info.is_float:
            continue
        if name in adapter.modules:
            value = adapter.sq_norm(name)
        elif name in adapter.full:
            value = sq_norm(adapter.full_tensor(name).to(torch.float32) - base.read(name).to(torch.float32))
        else:
            value = 0.0
        if not math.isfinite(value):
            raise CheckpointError(f"fine-tune {label!r}: tensor {name!r} contains NaN or Inf")
        sq_norms[name] = value
        numel += math.prod(info.shape)
        changed += value > 0
    total = sum(sq_norms.values())
    return TaskVectorStats(label=label, sq_norms=sq_norms, numel=numel, changed_tensors=changed,
                           base_sq_norm=sum(base_norms.values()), raw_sq_norm=total)


_BASE_NORMS: dict[tuple, dict[str, float]] = {}


def base_sq_norms(base_dir: ModelSource) -> dict[str, float]:
    """‖θ₀‖² per float tensor, remembered per base (folder and file state, or S3 listing) in this process."""
    if isinstance(base_dir, RemoteModel):
        key: tuple = (base_dir.fingerprint,)
    else:
        files = sorted(base_dir.glob("*.safetensors"))
        key = (str(base_dir.resolve()), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _BASE_NORMS:
        base = open_checkpoint(base_dir, "base")
        norms = {}
        for name in base.names:
            info = base.info(name)
            if info.is_float:  # row chunks: memory bounded as in every other pass
                value = sum(sq_norm(base.read(name, rows=rows)) for rows in row_chunks(info, checkpoint.CHUNK_ELEMENTS))
                if not math.isfinite(value):
                    raise CheckpointError(f"base {base_dir}: tensor {name!r} contains NaN or Inf")
                norms[name] = value
        base.close()
        _BASE_NORMS[key] = norms
    return _BASE_NORMS[key]
