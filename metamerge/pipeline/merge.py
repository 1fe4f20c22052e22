"""The merge stage: one content-addressed merged folder per (inputs, coefficients, options)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from metamerge.engine.coefficients import Coefficients
from metamerge.engine.merge import MergeReport, merge_checkpoints
from metamerge.engine.thresholds import ThresholdCache
from metamerge.errors import writing
from metamerge.io import outputs
from metamerge.io.atomic import write_once
from metamerge.io.digests import fingerprint_dir
from metamerge.methods.registry import plan_for
from metamerge.pipeline.inputs import digest_cache, shared_store
from metamerge.pipeline.keys import merge_report_path, merged_dir, trims_key
from metamerge.pipeline.preflight import check_disk, merge_disk_needs
from metamerge.recipe import Recipe
from metamerge.refs import ResolvedModel


@dataclass(frozen=True)
class MergeOutput:
    path: str
    fingerprint: str
    report: dict


def merge_intact(out_dir: Path) -> bool:
    """The merged folder and its report are there, every file the merge wrote present with its size.

    Folders written before outputs carried a marker count as intact when they and their report exist.
    """
    out_dir = Path(out_dir)
    if not merge_report_path(out_dir).exists():
        return False
    state = outputs.output_state(out_dir)
    if state == "intact":
        return True
    return state == "foreign" and out_dir.is_dir() and outputs.read_output_marker(out_dir) is None


def merge(
    recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], coefficients: Coefficients,
    progress: Callable[[int, int, str], None] | None = None,
) -> MergeOutput:
    plan = plan_for(recipe.method)
    workdir = Path(recipe.workdir)
    out_dir = merged_dir(recipe, base, finetunes, coefficients)
    report_file = merge_report_path(out_dir)
    outputs.remove_stale_temporaries(out_dir)
    if merge_intact(out_dir):
        report = json.loads(report_file.read_text())
    else:
        check_disk(merge_disk_needs(recipe, base.path))  # now that the merge is known to be needed
        # the folder's name is its content's address: an intact one a concurrent run committed is kept,
        # a damaged one metamerge wrote is replaced, anything else there is refused
        result: MergeReport = merge_checkpoints(
            base.path, [(ft.label, f.path) for ft, f in zip(recipe.finetunes, finetunes, strict=True)],
            coefficients, plan, out_dir, dtype=recipe.merge.dtype, device=recipe.merge.device,
            shard_size_mb=recipe.merge.shard_size_mb, vocab=recipe.merge.vocab, progress=progress, existing="keep",
            thresholds=remembered_trims(recipe, base, finetunes),
        )
        with writing(report_file):
            report = write_once(report_file, result.to_dict())
    return MergeOutput(str(out_dir), fingerprint_dir(out_dir, digest_cache(workdir)), report)


def remembered_trims(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel]) -> ThresholdCache | None:
    """TIES-style trims, remembered per fine-tune in the workdir: a nightly merge selects only for new ones."""
    plan = plan_for(recipe.method)
    if plan.sparsify != "magnitude":
        return None
    return ThresholdCache(Path(recipe.workdir) / "trims", [trims_key(base, f, plan, recipe.merge.vocab) for f in finetunes])


def merge_available(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel],
                    coefficients: Coefficients) -> bool:
    """The merged model exists here or in shared storage: its cached task results are still good.

    The one criterion for "merge again": the flow refreshes the merge task's cache when it fails,
    and `merge` itself re-merges exactly then.
    """
    out = merged_dir(recipe, base, finetunes, coefficients)
    if merge_intact(out):
        return True
    store = shared_store(recipe)
    return store.uri is not None and store.exists(merge_report_path(out))
