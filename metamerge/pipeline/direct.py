"""`metamerge merge`: the stages run in-process into one folder, without Prefect.

The fastest path for one local merge. The same stage functions as the flow, so the same
checks and the same bytes; what it skips is caching of the merge itself, evaluation and
publishing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from metamerge import progress
from metamerge.engine.coefficients import Coefficients
from metamerge.engine.lora import check_adapter_base
from metamerge.engine.merge import MergeReport, merge_checkpoints
from metamerge.io import outputs
from metamerge.methods.registry import plan_for
from metamerge.pipeline import preflight
from metamerge.pipeline.extract import check_task_vectors, extract_together, load_stats
from metamerge.pipeline.inputs import resolve
from metamerge.pipeline.merge import remembered_trims
from metamerge.pipeline.solve import solve
from metamerge.recipe import Recipe


@dataclass(frozen=True)
class DirectMerge:
    coefficients: Coefficients
    report: MergeReport
    relative_norms: dict[str, float]


def merge_into(rec: Recipe, target: Path, existing: str, clock: progress.StageClock) -> DirectMerge:
    """Preflight, resolve, extract (methods that weigh norms), solve, then one streaming merge into `target`."""
    preflight.preflight(rec, out=target, existing=existing)
    outputs.remove_stale_temporaries(target)  # what killed runs left next to --out
    plan = plan_for(rec.method)
    workdir = Path(rec.workdir)
    with clock.stage("resolve"):
        base = resolve(rec.base, workdir)
        if "://" in rec.base and not rec.base.startswith("file://"):  # remote: its size is known only now
            preflight.check_disk(preflight.merge_disk_needs(rec, base.path, target))
        finetunes = [resolve(ft.ref, workdir) for ft in rec.finetunes]
    labels = [ft.label for ft in rec.finetunes]
    with clock.stage("extract"):
        for f, label in zip(finetunes, labels, strict=True):  # also when the method weighs no norm
            check_adapter_base(f.path, label, base.ref, base.path)
        stats = extract_together(base, finetunes, labels, plan, rec.merge.vocab, workdir) if plan.needs_norms else []
        # with stats, a bad "fine-tune" fails before the merge; without, the merge pass checks it before committing
        norms = check_task_vectors(rec, load_stats(stats)) if stats else None
    with clock.stage("solve"):
        coefficients = solve(labels, stats, plan, rec.method.name)
    with clock.stage("merge"):
        report = merge_checkpoints(base.path, [(label, f.path) for label, f in zip(labels, finetunes, strict=True)],
                                   coefficients, plan, target, dtype=rec.merge.dtype, device=rec.merge.device,
                                   shard_size_mb=rec.merge.shard_size_mb, vocab=rec.merge.vocab,
                                   progress=lambda done, total, _name: progress.advance("merge", done, total),
                                   existing=existing, max_relative_norm=rec.merge.max_relative_norm,
                                   thresholds=remembered_trims(rec, base, finetunes))
    return DirectMerge(coefficients, report, norms or report.relative_norms())
