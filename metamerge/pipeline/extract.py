"""The extract stage: task-vector statistics per fine-tune, and the checks made on them."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from metamerge.engine.lora import check_adapter_base, is_adapter
from metamerge.engine.remote import open_checkpoint
from metamerge.engine.shards import output_shard_tensors
from metamerge.engine.taskvectors import (
    TaskVectorStats,
    check_relative_norms,
    combine_tensor_sums,
    extract_stats,
    extract_stats_many,
    tensor_sums,
)
from metamerge.errors import writing
from metamerge.io.atomic import write_atomic
from metamerge.io.remote_model import FETCHED, RemoteModel
from metamerge.io.shared import SharedStore
from metamerge.methods.plan import MergePlan
from metamerge.pipeline.inputs import input_source, reads_in_place, shared_store
from metamerge.pipeline.keys import stats_path
from metamerge.recipe import Recipe
from metamerge.refs import ResolvedModel


def extract(base: ResolvedModel, finetune: ResolvedModel, label: str, plan: MergePlan, vocab: str, workdir: Path,
            store: SharedStore | None = None, ranged: bool = False) -> Path:
    """Writes ‖τ‖² per tensor to a stats file named by (base, fine-tune, sparsify) content.

    With a shared store (Dask across machines) the file is also put there, for the solve stage;
    `ranged`: s3:// inputs are streamed by byte range, never stored on this machine.
    """
    out = stats_path(base, finetune, label, plan, vocab, workdir)
    if store is not None and not out.exists() and store.exists(out):
        store.ensure(out)
    if not out.exists():
        base_source, ft_source = base.path, finetune.path
        if store is not None:
            base_source, ft_source = input_source(base, store, ranged), input_source(finetune, store, ranged)
        if isinstance(ft_source, Path):
            check_adapter_base(ft_source, label, base.ref, Path(base.path))
        _save(out, extract_stats(base_source, ft_source, label, _weighed(plan), vocab))
    if store is not None:
        store.put(out)
    return out


def extract_part(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], labels: list[str],
                 plan: MergePlan, index: int) -> dict:
    """Per-tensor sums of output shard `index`'s tensors for the full fine-tunes (Dask: one task per shard).

    Each input is read by range (or from this machine), only this shard's tensors: extraction then
    costs each worker its share of (T+1) models, as the merge does. PEFT adapters are left to their
    own extract task. Returns the sums with the bytes fetched and who fetched them.
    """
    store, ranged = shared_store(recipe), reads_in_place(recipe)
    fetched = FETCHED.bytes
    base_source = input_source(base, store, ranged)
    base_reader = open_checkpoint(base_source, "base")
    names = output_shard_tensors(base_reader, index, recipe.merge.dtype, recipe.merge.shard_size_mb)
    sources = [(input_source(ft, store, ranged), label) for ft, label in zip(finetunes, labels, strict=True)]
    full = [(source, label) for source, label in sources if isinstance(source, RemoteModel) or not is_adapter(source)]
    sums = tensor_sums(base_source, full, _weighed(plan), recipe.merge.vocab, set(names), base=base_reader)
    base_reader.close()
    return {"index": index, "sums": sums, "bytes_fetched": FETCHED.bytes - fetched,
            "worker": f"{socket.gethostname()}/{os.getpid()}"}


def combine_parts(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], labels: list[str],
                  plan: MergePlan, parts: list[dict]) -> list[Path]:
    """The stats files of the fine-tunes the parts covered, identical to one pass's; put in shared storage.

    The per-fine-tune extract tasks then find them, so each fine-tune keeps its own cache entry.
    """
    store = shared_store(recipe)
    base_reader = open_checkpoint(input_source(base, store, reads_in_place(recipe)), "base")
    order = [name for name in base_reader.names if base_reader.info(name).is_float]
    sums = [part["sums"] for part in sorted(parts, key=lambda p: p["index"])]
    written = []
    by_label = dict(zip(labels, finetunes, strict=True))
    for stats in combine_tensor_sums(sums, order) if sums[0].labels else []:
        out = stats_path(base, by_label[stats.label], stats.label, plan, recipe.merge.vocab, Path(recipe.workdir))
        _save(out, stats)
        store.put(out)
        written.append(out)
    return written


def extract_together(base: ResolvedModel, finetunes: list[ResolvedModel], labels: list[str], plan: MergePlan,
                     vocab: str, workdir: Path) -> list[Path]:
    """The stats files of several fine-tunes, the missing ones computed in one pass over the base.

    Each file is the one `extract` would write for that fine-tune alone (same name, same bytes),
    so per-fine-tune caching is unchanged; only the base is read once instead of once per
    fine-tune. Local workdirs only (a Dask run extracts per fine-tune, on its workers).
    """
    outs = [stats_path(base, ft, label, plan, vocab, workdir) for ft, label in zip(finetunes, labels, strict=True)]
    missing = [(ft, label, out) for ft, label, out in zip(finetunes, labels, outs, strict=True) if not out.exists()]
    for ft, label, _ in missing:
        check_adapter_base(ft.path, label, base.ref, base.path)
    if missing:
        computed = extract_stats_many(base.path, [(ft.path, label) for ft, label, _ in missing], _weighed(plan), vocab)
        for (_, _, out), stats in zip(missing, computed, strict=True):
            _save(out, stats)
    return outs


def _weighed(plan: MergePlan) -> MergePlan:
    """The sparsified ‖τ‖² matter only where MetaGPT weighs them; other methods extract dense norms."""
    return plan if plan.needs_norms else MergePlan()


def _save(out: Path, stats: TaskVectorStats) -> None:
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, lambda tmp: stats.save(tmp))


def stats_available(base: ResolvedModel, finetune: ResolvedModel, label: str, plan: MergePlan, vocab: str,
                    workdir: Path, store: SharedStore | None = None) -> bool:
    """The stats file a cached extraction points at is still there (here, or in the shared store)."""
    out = stats_path(base, finetune, label, plan, vocab, workdir)
    return store.exists(out) if store is not None else out.exists()


def load_stats(stats_files: list[Path], store: SharedStore | None = None) -> list[TaskVectorStats]:
    return [TaskVectorStats.load(store.ensure(Path(p)) if store else Path(p)) for p in stats_files]


def relative_norms(stats: list[TaskVectorStats]) -> dict[str, float]:
    """‖τ_t‖ / ‖θ₀‖ per fine-tune, over every float tensor, before any sparsification."""
    return {s.label: s.relative_norm for s in stats}


def dropped_vocab_rows(stats: list[TaskVectorStats]) -> dict[str, dict[str, int]]:
    """{fine-tune: {tensor: rows}} that `vocab: base` leaves out (added tokens), only where any."""
    return {s.label: dict(s.dropped_rows) for s in stats if s.dropped_rows}


def check_task_vectors(recipe: Recipe, stats: list[TaskVectorStats]) -> dict[str, float]:
    """‖τ_t‖/‖θ₀‖ per fine-tune; fails naming the fine-tune and the number above `merge.max_relative_norm`."""
    norms = relative_norms(stats)
    check_relative_norms(norms, recipe.merge.max_relative_norm)
    return norms


def vocab_summary(dropped: dict[str, dict[str, int]]) -> list[str]:
    """One line per fine-tune that lost vocabulary rows: `fine-tune 'x': 5 rows dropped from embed, lm_head`."""
    lines = []
    for label, tensors in dropped.items():
        rows = max(tensors.values())
        lines.append(f"fine-tune {label!r}: {rows} vocabulary row(s) beyond the base's dropped (vocab: base) "
                     f"from {', '.join(sorted(tensors))}")
    return lines
