"""One plain function per pipeline stage (DESIGN.md §3), so orchestration stays a thin wrapper.

Each stage takes and returns small values (paths, fingerprints, dicts) and writes its bulky
output under the recipe's workdir at a path derived from content fingerprints, which is what
makes stages cacheable and resumable by any orchestrator, Prefect or a plain script.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from metamerge import __version__, outputs
from metamerge import merge as engine
from metamerge.coefficients import Coefficients, solve_constant, solve_metagpt
from metamerge.errors import InputError, TransientError, writing
from metamerge.evaluate import EvalSpec, ScoreTable, evaluate_model, lm_eval_version
from metamerge.gate import GateDecision, baseline_from_manifest
from metamerge.gate import check_gate as check_gate_against
from metamerge.merge import MergeReport, ShardReport, merge_checkpoints
from metamerge.methods import MergePlan, plan_for
from metamerge.recipe import Recipe, recipe_to_yaml
from metamerge.refs import DigestCache, ResolvedModel, fingerprint_dir, resolve_ref
from metamerge.shared import SharedStore
from metamerge.storage import PublishResult, latest_manifest, publish_run, published_run_intact
from metamerge.taskvectors import STATS_VERSION, TaskVectorStats, check_relative_norms, extract_stats

CODE_VERSION = f"metamerge-{__version__}"


def short_hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _digests(workdir: Path) -> DigestCache:
    return DigestCache(Path(workdir) / "digests.json")


def resolve(ref: str, workdir: Path, endpoint_url: str | None = None) -> ResolvedModel:
    return resolve_ref(ref, Path(workdir), endpoint_url)


def ref_signature(ref: str) -> str:
    """Cheap change detector for a local ref (names, sizes, mtimes), a cache key read from no tensor.

    Remote refs are not cached by Prefect: their resolve step asks the remote for ETags/commits.
    """
    folder = Path(ref.removeprefix("file://"))
    if not folder.is_dir():
        return f"missing:{ref}"
    entries = [(p.relative_to(folder).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
               for p in sorted(folder.rglob("*")) if p.is_file()]
    return short_hash(str(folder.resolve()), entries)


def stats_path(base: ResolvedModel, finetune: ResolvedModel, label: str, plan: MergePlan, vocab: str, workdir: Path) -> Path:
    sparsify = (plan.sparsify, plan.density, plan.seed)
    key = short_hash(base.fingerprint, finetune.fingerprint, label, sparsify, vocab, CODE_VERSION, STATS_VERSION)
    return Path(workdir) / "stats" / f"{key}.json"


def extract(base: ResolvedModel, finetune: ResolvedModel, label: str, plan: MergePlan, vocab: str, workdir: Path,
            store: SharedStore | None = None) -> Path:
    """Writes ‖τ‖² per tensor to a stats file named by (base, fine-tune, sparsify) content.

    With a shared store (Dask across machines) the file is also put there, for the solve stage.
    """
    out = stats_path(base, finetune, label, plan, vocab, workdir)
    if store is not None and not out.exists() and store.exists(out):
        store.ensure(out)
    if not out.exists():
        if store is not None:
            base, finetune = local_model(base, store), local_model(finetune, store)
        stats = extract_stats(base.path, finetune.path, label, plan, vocab)
        with writing(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(out, lambda tmp: stats.save(tmp))
    if store is not None:
        store.put(out)
    return out


def shared_store(recipe: Recipe) -> SharedStore:
    """How this recipe's workers share workdir files (an S3 location under `runner: dask`, else none)."""
    return SharedStore(str(Path(recipe.workdir).resolve()), recipe.shared_storage, recipe.endpoint_url)


def local_model(model: ResolvedModel, store: SharedStore) -> ResolvedModel:
    """The model on this machine. A worker that did not resolve a remote ref downloads it itself."""
    if Path(model.path).exists():
        return model
    if "://" in model.ref and not model.ref.startswith("file://"):
        again = resolve_ref(model.ref, Path(store.workdir), store.endpoint_url)
        if again.fingerprint != model.fingerprint:
            raise TransientError(f"{model.ref} changed since this run resolved it; re-run to merge the new version")
        return again
    raise InputError(f"{model.ref}: folder {model.path} is not on this machine; on a multi-machine cluster use "
                     "s3:// or hf:// refs, or a shared file system")


def solve(labels: list[str], stats_files: list[Path], plan: MergePlan, method_name: str,
          store: SharedStore | None = None) -> Coefficients:
    if plan.weighting == "metagpt":
        stats = [TaskVectorStats.load(store.ensure(Path(p)) if store else Path(p)) for p in stats_files]
        return solve_metagpt(labels, {s.label: s.sq_norms for s in stats}, plan.granularity, method_name)
    weight = 1.0 / len(labels) if plan.weighting == "uniform" else plan.weight
    return solve_constant(labels, weight, method_name)


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


@dataclass(frozen=True)
class MergeOutput:
    path: str
    fingerprint: str
    report: dict


def merged_dir(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], coefficients: Coefficients) -> Path:
    """Where a merge of exactly these inputs, coefficients and options lives in the workdir."""
    key = short_hash(base.fingerprint, [f.fingerprint for f in finetunes], coefficients.to_json(),
                     asdict(plan_for(recipe.method)), recipe.merge.model_dump(mode="json", exclude={"max_relative_norm"}),
                     CODE_VERSION)
    return Path(recipe.workdir) / "merged" / f"{recipe.name}-{key}"


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Written under a temporary name, then renamed: readers never see half a file, a failure leaves none."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_once(path: Path, data: dict) -> dict:
    """Creates `path` with `data` unless it exists; returns what the file holds (the first writer's data).

    A merged folder's name is its content's address, so every merge of it writes the same bytes;
    its report (timings, device) is the first one's. A re-merge that restores a damaged folder, or
    a concurrent run of the same recipe, then publishes exactly the documents already published.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.link(tmp, path)  # atomic, and fails if the file exists
        return data
    except FileExistsError:
        try:
            return json.loads(path.read_text())
        except ValueError:  # a report half-written by an older version: ours replaces it
            tmp.replace(path)
            return data
    finally:
        tmp.unlink(missing_ok=True)


def merge_report_path(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".report.json")


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
        # the folder's name is its content's address: an intact one a concurrent run committed is kept,
        # a damaged one metamerge wrote is replaced, anything else there is refused
        result: MergeReport = merge_checkpoints(
            base.path, [(ft.label, f.path) for ft, f in zip(recipe.finetunes, finetunes, strict=True)],
            coefficients, plan, out_dir, dtype=recipe.merge.dtype, device=recipe.merge.device,
            shard_size_mb=recipe.merge.shard_size_mb, vocab=recipe.merge.vocab, progress=progress, existing="keep",
        )
        with writing(report_file):
            report = _write_once(report_file, result.to_dict())
    return MergeOutput(str(out_dir), fingerprint_dir(out_dir, _digests(workdir)), report)


# --- the merge split by output shard (runner: dask; DESIGN.md §9) ----------------------------------


def shard_dir(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], coefficients: Coefficients) -> Path:
    """Where a worker writes (and, with a store, from where it uploads) the shards of one merge."""
    out = merged_dir(recipe, base, finetunes, coefficients)
    return out.with_name(out.name + ".shards")


def merge_available(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel],
                    coefficients: Coefficients) -> bool:
    """The merged model exists here or in shared storage: its cached task results are still good."""
    out = merged_dir(recipe, base, finetunes, coefficients)
    if merge_intact(out):
        return True
    store = shared_store(recipe)
    return store.uri is not None and store.exists(merge_report_path(out))


def plan_merge_shards(recipe: Recipe, base: ResolvedModel) -> list[str]:
    """Output shard file names, from the base's header: one merge task per name."""
    base = local_model(base, shared_store(recipe))
    return engine.output_shard_files(base.path, recipe.merge.dtype, recipe.merge.shard_size_mb)


def merge_shard(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], coefficients: Coefficients,
                index: int, progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Merges output shard `index` on whichever machine runs this; the file goes to shared storage.

    Returns the shard's report (a dict, small) with the host and process that did the work.
    """
    store = shared_store(recipe)
    base = local_model(base, store)
    finetunes = [local_model(f, store) for f in finetunes]
    out = shard_dir(recipe, base, finetunes, coefficients)
    out.mkdir(parents=True, exist_ok=True)
    report = engine.merge_shard(
        base.path, [(ft.label, f.path) for ft, f in zip(recipe.finetunes, finetunes, strict=True)], coefficients,
        plan_for(recipe.method), out, index, dtype=recipe.merge.dtype, device=recipe.merge.device,
        shard_size_mb=recipe.merge.shard_size_mb, vocab=recipe.merge.vocab, progress=progress,
    )
    store.put(Path(report.path))
    return {**asdict(report), "worker": f"{socket.gethostname()}/{os.getpid()}"}


def finalize_merge(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], coefficients: Coefficients,
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
        result = engine.finalize_merge(base.path, reports, [ft.label for ft in recipe.finetunes], out_dir,
                                       dtype=recipe.merge.dtype, shard_size_mb=recipe.merge.shard_size_mb,
                                       existing="keep")
        report = result.to_dict()
        report["shards"] = [{k: shard[k] for k in ("index", "filename", "worker", "seconds", "bytes_written")}
                            for shard in sorted(shards, key=lambda s: s["index"])]
        with writing(report_file):
            report = _write_once(report_file, report)
        store.put_dir(out_dir)
        store.put(report_file)
        for shard in reports:
            store.remove(Path(shard.path))
        shutil.rmtree(shard_dir(recipe, base, finetunes, coefficients), ignore_errors=True)
    return MergeOutput(str(out_dir), fingerprint_dir(out_dir, _digests(Path(recipe.workdir))), report)


def eval_spec(recipe: Recipe, tasks: tuple[str, ...]) -> EvalSpec:
    ev = recipe.evaluation
    assert ev is not None
    return EvalSpec(tasks=tasks, tasks_dir=Path(ev.tasks_dir) if ev.tasks_dir else None,
                    limit=ev.limit, batch_size=ev.batch_size, device=ev.device)


def task_spec_hash(spec: EvalSpec) -> str:
    """Hash of the task definitions themselves (YAML and data), not just their names."""
    digest = hashlib.sha256(json.dumps([spec.tasks, spec.limit], default=str).encode())
    if spec.tasks_dir is not None:
        for file in sorted(Path(spec.tasks_dir).rglob("*")):
            if file.is_file():
                digest.update(file.relative_to(spec.tasks_dir).as_posix().encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def evaluate(model_path: str, model_fingerprint: str, spec: EvalSpec, workdir: Path,
             ref: str | None = None, store: SharedStore | None = None) -> dict[str, dict]:
    """Scores of one model; on a worker that lacks the model, `ref` or the shared store brings it."""
    out = Path(workdir) / "scores" / f"{short_hash(model_fingerprint, task_spec_hash(spec), lm_eval_version())}.json"
    if out.exists():
        return json.loads(out.read_text())
    path = Path(model_path)
    if store is not None and not path.exists():
        if ref is not None:
            path = local_model(ResolvedModel(ref, path, model_fingerprint), store).path
        else:
            path = store.ensure_dir(path)
    scores = evaluate_model(path, spec)
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(out, lambda tmp: tmp.write_text(json.dumps(scores, indent=1)))
    return scores


def score_table(recipe: Recipe, base_scores: dict, finetune_scores: dict[str, dict], merged_scores: dict) -> ScoreTable:
    rows = {"base": {t: v["score"] for t, v in base_scores.items()}}
    for label, scores in finetune_scores.items():
        rows[label] = {t: v["score"] for t, v in scores.items()}
    merged_label = f"merged ({recipe.method.name})"
    rows[merged_label] = {t: v["score"] for t, v in merged_scores.items()}
    own = {ft.label: tuple(ft.tasks) for ft in recipe.finetunes}
    return ScoreTable(rows=rows, own_tasks=own, merged_label=merged_label)


def coefficient_records(coefficients: Coefficients, plan: MergePlan,
                        norms: dict[str, float] | None = None) -> list[dict]:
    level = coefficients.model_level()
    norms = norms or {}
    return [{"fine-tune": task, "lambda": round(value, 6), "relative norm ‖τ‖/‖θ₀‖": _rounded(norms.get(task)),
             "method": coefficients.method, "granularity": coefficients.granularity, "scale": plan.scale}
            for task, value in level.items()]


def _rounded(value: float | None) -> float | None:
    return None if value is None else (round(value, 6) if math.isfinite(value) else value)


def cosine_records(report: dict) -> list[dict]:
    labels, cosine = report["labels"], report["cosine"]
    return [{"task vector": a, **{b: round(cosine[i][j], 4) for j, b in enumerate(labels)}} for i, a in enumerate(labels)]


def run_id_for(merged_fingerprint: str) -> str:
    """One run id per merged model per day: a same-day re-run resumes the same prefix."""
    return f"{time.strftime('%Y%m%d', time.gmtime())}-{merged_fingerprint[:12]}"


def report_markdown(recipe: Recipe, inputs: list[ResolvedModel], coefficients: Coefficients, plan: MergePlan,
                    merge_report: dict, table: ScoreTable | None, published: str | None,
                    stage_seconds: dict[str, float] | None = None, gate: GateDecision | None = None) -> str:
    lines = [f"# Merge report: {recipe.name}", "", f"Method: `{recipe.method.name}`"
             f" (granularity {coefficients.granularity}, scale {plan.scale})", "", "## Inputs", "",
             "| role | ref | fingerprint |", "|---|---|---|"]
    for i, model in enumerate(inputs):
        role = "base" if i == 0 else f"fine-tune {recipe.finetunes[i - 1].label}"
        lines.append(f"| {role} | `{model.ref}` | `{model.fingerprint[:16]}` |")
    norms = merge_report.get("relative_norms") or {}
    lines += ["", "## Coefficients (λ per fine-tune, model level)", "",
              "‖τ‖/‖θ₀‖ is the task vector's norm relative to the base's (bound: merge.max_relative_norm "
              f"{recipe.merge.max_relative_norm}).", "", "| fine-tune | λ | ‖τ‖/‖θ₀‖ |", "|---|---|---|"]
    lines += [f"| {task} | {value:.4f} | {norms[task]:.4f} |" if task in norms else f"| {task} | {value:.4f} | - |"
              for task, value in coefficients.model_level().items()]
    dropped = merge_report.get("dropped_rows") or {}
    if dropped:
        lines += ["", "## Vocabulary rows dropped (vocab: base)", "", "| fine-tune | tensor | rows dropped |",
                  "|---|---|---|"]
        lines += [f"| {label} | {tensor} | {rows} |" for label, tensors in dropped.items()
                  for tensor, rows in sorted(tensors.items())]
    lines += ["", "## Cosine of task vectors", "", "MetaGPT assumes near-orthogonal task vectors (off-diagonal ≈ 0).", ""]
    labels = merge_report["labels"]
    lines += ["| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for i, a in enumerate(labels):
        lines.append(f"| {a} | " + " | ".join(f"{c:.3f}" for c in merge_report["cosine"][i]) + " |")
    lines += ["", f"Merge: {merge_report['tensors']} tensors, {merge_report['bytes_written'] / 1e6:.1f} MB written "
              f"in {merge_report['seconds']:.2f} s on {merge_report['device']}."]
    if table is not None:
        lines += ["", "## Scores (absolute; avg_norm = merged / own fine-tune)", "", table.to_markdown()]
    if gate is not None:
        lines += ["", f"## Quality gate: {'passed' if gate.passed else 'FAILED, not published'}", ""]
        lines += [f"- {row['result']}: {row['check']}" for row in gate.as_records()]
    if stage_seconds:
        lines += ["", "## Stage timings (this run; cached stages are near zero)", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {name} | {sec:.2f} |" for name, sec in stage_seconds.items()]
    if published:
        lines += ["", f"Published: `{published}`"]
    return "\n".join(lines) + "\n"


def check_gate(recipe: Recipe, normalized_average: float) -> GateDecision:
    """Reads the last publish of this model only when the gate compares with it."""
    assert recipe.gate is not None
    previous = None
    if recipe.gate.no_regression and recipe.publish is not None:
        manifest = latest_manifest(recipe.publish.target, recipe.name, recipe.publish.endpoint_url or recipe.endpoint_url)
        previous = baseline_from_manifest(manifest)
    return check_gate_against(recipe.gate, normalized_average, previous)


def publish_documents(recipe: Recipe, documents: dict[str, str]) -> dict[str, str]:
    """Every small document a publish carries, recipe.yaml first."""
    return {"recipe.yaml": recipe_to_yaml(recipe), **documents}


def publish(recipe: Recipe, merged: MergeOutput, run_id: str, documents: dict[str, str],
            normalized_average: float | None = None) -> PublishResult:
    """Publishes the merged model plus small documents (recipe, λ, scores, report).

    The documents are staged in a folder of this call's own (a marked, locked temporary under
    `<workdir>/publish/`), so a concurrent run of the same recipe can never rewrite them between
    this run's manifest and its upload; the folder is removed afterwards.
    """
    assert recipe.publish is not None
    workdir = Path(recipe.workdir)
    anchor = workdir / "publish" / run_id
    outputs.remove_stale_temporaries(anchor, tag="stage")
    files: dict[str, Path] = {}
    merged_dir = shared_store(recipe).ensure_dir(Path(merged.path))
    for file in sorted(p for p in merged_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
        files[file.name] = file
    with writing(anchor.parent):
        stage = outputs.make_temp(anchor, tag="stage")
    try:
        with writing(stage.path):
            for name, text in publish_documents(recipe, documents).items():
                (stage.path / name).write_text(text)
                files[name] = stage.path / name
        return publish_run(files, recipe.publish.target, recipe.name, run_id,
                           recipe.publish.endpoint_url or recipe.endpoint_url,
                           extra={"merged_fingerprint": merged.fingerprint, "method": recipe.method.name,
                                  "normalized_average": normalized_average,
                                  "inputs": {"base": recipe.base, "finetunes": [ft.ref for ft in recipe.finetunes]}},
                           digests=_digests(workdir))
    finally:
        stage.discard()


def published_intact(recipe: Recipe, merged_fingerprint: str, documents: dict[str, str],
                     run_id: str | None = None) -> str | None:
    """The manifest URI of this very publication if it is still there, else None (publish again).

    "There" means: `latest.json` of the model points at a manifest of this merge with these
    documents (and this run id, when one was asked for), and every file that manifest lists
    still exists with its size. A cached publish is trusted only then.
    """
    assert recipe.publish is not None
    wanted = {name: hashlib.sha256(text.encode()).hexdigest()
              for name, text in publish_documents(recipe, documents).items()}

    def is_ours(manifest: dict) -> bool:
        files = manifest.get("files", {})
        return (manifest.get("merged_fingerprint") == merged_fingerprint
                and (run_id is None or manifest.get("run_id") == run_id)
                and all(files.get(name, {}).get("sha256") == digest for name, digest in wanted.items()))

    return published_run_intact(recipe.publish.target, recipe.name,
                                recipe.publish.endpoint_url or recipe.endpoint_url, is_ours)
