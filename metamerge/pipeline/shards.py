"""The merge stage split by output shard (runner: dask; docs/design.md §9)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

from metamerge.engine import shards as engine_shards
from metamerge.engine.coefficients import Coefficients
from metamerge.engine.merge import MergeReport, set_config_dtype
from metamerge.engine.remote import RemoteCheckpointReader
from metamerge.engine.shards import ShardReport
from metamerge.engine.writer import copy_aux_files, verify_reader, write_index
from metamerge.errors import writing
from metamerge.io import outputs
from metamerge.io.atomic import write_once
from metamerge.io.digests import fingerprint_dir, fingerprint_of
from metamerge.io.remote_model import FETCHED, RemoteModel, S3File
from metamerge.io.shared import SharedStore
from metamerge.methods.registry import plan_for
from metamerge.pipeline.inputs import digest_cache, input_source, reads_in_place, shared_store
from metamerge.pipeline.keys import merge_report_path, merged_dir, shard_dir
from metamerge.pipeline.merge import MergeOutput, merge_intact
from metamerge.recipe import Recipe
from metamerge.refs import ResolvedModel


def plan_merge_shards(recipe: Recipe, base: ResolvedModel) -> list[str]:
    """Output shard file names, from the base's header: one merge task per name."""
    source = input_source(base, shared_store(recipe), reads_in_place(recipe))
    return engine_shards.output_shard_files(source, recipe.merge.dtype, recipe.merge.shard_size_mb)


def merge_output_shard(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], coefficients: Coefficients,
                index: int, progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Merges output shard `index` on whichever machine runs this.

    s3:// inputs are read by byte range (only this shard's tensors). With an S3 store the shard
    is uploaded to the merged folder's own key, left invisible until finalize commits it, and the
    local file is removed. Returns the shard's report (a dict, small) with the host and process
    that did the work and the bytes it fetched by range.
    """
    store = shared_store(recipe)
    fetched = FETCHED.bytes
    base_source = input_source(base, store, reads_in_place(recipe))
    sources = [input_source(f, store, reads_in_place(recipe)) for f in finetunes]
    out = shard_dir(recipe, base, finetunes, coefficients)
    out.mkdir(parents=True, exist_ok=True)
    report = engine_shards.merge_shard_file(
        base_source, [(ft.label, source) for ft, source in zip(recipe.finetunes, sources, strict=True)], coefficients,
        plan_for(recipe.method), out, index, dtype=recipe.merge.dtype, device=recipe.merge.device,
        shard_size_mb=recipe.merge.shard_size_mb, vocab=recipe.merge.vocab, progress=progress,
    )
    result = {**asdict(report), "worker": f"{socket.gethostname()}/{os.getpid()}",
              "bytes_fetched": FETCHED.bytes - fetched}
    if store.uri is not None:
        final = merged_dir(recipe, base, finetunes, coefficients) / report.filename
        result["staged"] = store.stage(Path(report.path), final)
        Path(report.path).unlink(missing_ok=True)
    return result


def finalize_sharded_merge(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], coefficients: Coefficients,
                   shards: list[dict]) -> MergeOutput:
    """Index, aux files, verification and commit of a merge done shard by shard.

    The result is the folder `merge` would have produced (byte-equal files). With an S3 store the
    folder is assembled in the store itself (`_commit_in_store`): no tensor byte is downloaded.
    """
    store = shared_store(recipe)
    out_dir = merged_dir(recipe, base, finetunes, coefficients)
    report_file = merge_report_path(out_dir)
    committed = store.manifest(out_dir) if store.uri is not None and not out_dir.exists() else None
    if merge_intact(out_dir) or (committed is not None and store.exists(report_file)):
        store.ensure(report_file)
        report = json.loads(report_file.read_text())
        fingerprint = fingerprint_of(committed) if committed is not None else fingerprint_dir(
            out_dir, digest_cache(Path(recipe.workdir)))
        return MergeOutput(str(out_dir), fingerprint, report)
    names = {f.name for f in fields(ShardReport)}
    reports = [ShardReport(**{k: v for k, v in shard.items() if k in names}) for shard in shards]
    base_source = input_source(base, store, reads_in_place(recipe))
    labels = [ft.label for ft in recipe.finetunes]
    if store.uri is not None and all("staged" in shard for shard in shards):
        result, fingerprint = _commit_in_store(recipe, store, base_source, reports, shards, labels, out_dir)
    else:
        for shard in reports:
            store.ensure(Path(shard.path))
        result = engine_shards.assemble_shard_files(base_source, reports, labels, out_dir, dtype=recipe.merge.dtype,
                                                    shard_size_mb=recipe.merge.shard_size_mb, existing="keep")
        fingerprint = None
    report = result.to_dict()
    report["shards"] = [{k: shard.get(k) for k in ("index", "filename", "worker", "seconds", "bytes_written",
                                                   "bytes_fetched")}
                        for shard in sorted(shards, key=lambda s: s["index"])]
    with writing(report_file):
        report = write_once(report_file, report)
    store.put(report_file)
    if fingerprint is None:
        store.put_dir(out_dir)
        fingerprint = fingerprint_dir(out_dir, digest_cache(Path(recipe.workdir)))
    for shard in reports:
        store.remove(Path(shard.path))
    shutil.rmtree(shard_dir(recipe, base, finetunes, coefficients), ignore_errors=True)
    return MergeOutput(str(out_dir), fingerprint, report)


def _commit_in_store(recipe: Recipe, store: SharedStore, base_source, reports: list[ShardReport], shards: list[dict],
                     labels: list[str], out_dir: Path) -> tuple[MergeReport, str]:
    """Completes the staged shard uploads, verifies their headers by range, adds the small files; manifest last.

    Only the index, config/tokenizer files, the output marker and the folder's manifest are
    written; a folder without its manifest does not exist for any reader (`SharedStore.manifest`).
    """
    started = time.monotonic()
    tensors_out, planned, filenames = engine_shards.planned_shards(base_source, reports, recipe.merge.dtype,
                                                                   recipe.merge.shard_size_mb)
    entries: dict[str, dict] = {}
    objects: dict[str, S3File] = {}
    for shard in shards:
        staged = shard["staged"]
        etag = store.commit_staged(staged)
        entries[shard["filename"]] = {"size": staged["size"], "sha256": staged["sha256"]}
        objects[shard["filename"]] = S3File(staged["key"], etag, staged["size"])
    bucket, prefix = store.location(out_dir)
    written = RemoteModel(ref=f"s3://{bucket}/{prefix}", bucket=bucket, files=objects, fingerprint="",
                          endpoint_url=store.endpoint_url)
    verify_reader(RemoteCheckpointReader(written, f"written checkpoint {out_dir.name}"), tensors_out)
    small = out_dir.parent / f".{out_dir.name}.small-{os.getpid()}"
    shutil.rmtree(small, ignore_errors=True)
    small.mkdir(parents=True)
    try:
        write_index(small, planned, filenames)
        copy_aux_files(base_source, small)
        set_config_dtype(small, recipe.merge.dtype)
        sizes = {**{name: e["size"] for name, e in entries.items()},
                 **{p.name: p.stat().st_size for p in small.iterdir()}}
        (small / outputs.OUTPUT_MARKER).write_text(outputs.output_marker_text(dict(sorted(sizes.items()))))
        for file in sorted(small.iterdir()):
            entries[file.name] = store.put(file, out_dir / file.name)
        result = engine_shards.sum_shard_reports(reports, labels, out_dir, len(tensors_out), time.monotonic() - started)
        store.put_manifest(out_dir, entries)
    finally:
        shutil.rmtree(small, ignore_errors=True)
    return result, fingerprint_of(entries)
