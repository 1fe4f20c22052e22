"""The merge stage split by output shard (runner: dask; docs/design.md §9)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

from metamerge.engine import shards as engine_shards
from metamerge.engine.coefficients import Coefficients
from metamerge.engine.shards import ShardReport
from metamerge.errors import writing
from metamerge.io.atomic import write_once
from metamerge.io.digests import fingerprint_dir
from metamerge.methods.registry import plan_for
from metamerge.pipeline.inputs import digest_cache, local_model, shared_store
from metamerge.pipeline.keys import merge_report_path, merged_dir, shard_dir
from metamerge.pipeline.merge import MergeOutput, merge_intact
from metamerge.recipe import Recipe
from metamerge.refs import ResolvedModel


def plan_merge_shards(recipe: Recipe, base: ResolvedModel) -> list[str]:
    """Output shard file names, from the base's header: one merge task per name."""
    base = local_model(base, shared_store(recipe))
    return engine_shards.output_shard_files(base.path, recipe.merge.dtype, recipe.merge.shard_size_mb)


def merge_output_shard(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], coefficients: Coefficients,
                index: int, progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Merges output shard `index` on whichever machine runs this; the file goes to shared storage.

    Returns the shard's report (a dict, small) with the host and process that did the work.
    """
    store = shared_store(recipe)
    base = local_model(base, store)
    finetunes = [local_model(f, store) for f in finetunes]
    out = shard_dir(recipe, base, finetunes, coefficients)
    out.mkdir(parents=True, exist_ok=True)
    report = engine_shards.merge_shard_file(
        base.path, [(ft.label, f.path) for ft, f in zip(recipe.finetunes, finetunes, strict=True)], coefficients,
        plan_for(recipe.method), out, index, dtype=recipe.merge.dtype, device=recipe.merge.device,
        shard_size_mb=recipe.merge.shard_size_mb, vocab=recipe.merge.vocab, progress=progress,
    )
    store.put(Path(report.path))
    return {**asdict(report), "worker": f"{socket.gethostname()}/{os.getpid()}"}


def finalize_sharded_merge(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], coefficients: Coefficients,
                   shards: list[dict]) -> MergeOutput:
    """Index, aux files, verification and commit of a merge done shard by shard; then shared.

    The result is the folder `merge` would have produced (byte-equal files). With a store, the
    merged folder and its report are uploaded so evaluation and publishing can run anywhere.
    """
    store = shared_store(recipe)
    out_dir = merged_dir(recipe, base, finetunes, coefficients)
    report_file = merge_report_path(out_dir)
    if merge_intact(out_dir) or (store.uri is not None and not out_dir.exists() and store.exists(report_file)):
        store.ensure(report_file)
        store.ensure_dir(out_dir)
        report = json.loads(report_file.read_text())
    else:
        base = local_model(base, store)
        names = {f.name for f in fields(ShardReport)}
        reports = [ShardReport(**{k: v for k, v in shard.items() if k in names}) for shard in shards]
        for report in reports:
            store.ensure(Path(report.path))
        result = engine_shards.assemble_shard_files(base.path, reports, [ft.label for ft in recipe.finetunes], out_dir,
                                       dtype=recipe.merge.dtype, shard_size_mb=recipe.merge.shard_size_mb,
                                       existing="keep")
        report = result.to_dict()
        report["shards"] = [{k: shard[k] for k in ("index", "filename", "worker", "seconds", "bytes_written")}
                            for shard in sorted(shards, key=lambda s: s["index"])]
        with writing(report_file):
            report = write_once(report_file, report)
        store.put_dir(out_dir)
        store.put(report_file)
        for shard in reports:
            store.remove(Path(shard.path))
        shutil.rmtree(shard_dir(recipe, base, finetunes, coefficients), ignore_errors=True)
    return MergeOutput(str(out_dir), fingerprint_dir(out_dir, digest_cache(Path(recipe.workdir))), report)
