"""Where each stage's output lives, named by the content it was made from.

Every path and key here is derived from content fingerprints plus the code version (never
from timestamps), which is what makes stages cacheable and resumable by any orchestrator,
Prefect or a plain script.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

from metamerge import __version__
from metamerge.engine.coefficients import Coefficients
from metamerge.engine.taskvectors import STATS_VERSION
from metamerge.engine.thresholds import VERSION as THRESHOLDS_VERSION
from metamerge.evaluation.backend import EvalSpec
from metamerge.methods.plan import MergePlan
from metamerge.methods.registry import plan_for
from metamerge.recipe import Recipe
from metamerge.refs import ResolvedModel

CODE_VERSION = f"metamerge-{__version__}"


def short_hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    # the sparsified ‖τ‖² matter only where MetaGPT weighs them; every other method extracts dense norms
    sparsify = (plan.sparsify, plan.density, plan.seed, plan.gamma, plan.epsilon) if plan.needs_norms else ("none",)
    key = short_hash(base.fingerprint, finetune.fingerprint, label, sparsify, vocab, CODE_VERSION, STATS_VERSION)
    return Path(workdir) / "stats" / f"{key}.json"


def trims_key(base: ResolvedModel, finetune: ResolvedModel, plan: MergePlan, vocab: str) -> str:
    """The name of a fine-tune's remembered TIES trims (`engine/thresholds.py`): its content, the
    base's, the density that sets k and how vocabularies are aligned."""
    return short_hash(base.fingerprint, finetune.fingerprint, plan.density, vocab, CODE_VERSION, THRESHOLDS_VERSION)


def merged_dir(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], coefficients: Coefficients) -> Path:
    """Where a merge of exactly these inputs, coefficients and options lives in the workdir."""
    key = short_hash(base.fingerprint, [f.fingerprint for f in finetunes], coefficients.to_json(),
                     asdict(plan_for(recipe.method)), recipe.merge.model_dump(mode="json", exclude={"max_relative_norm"}),
                     CODE_VERSION)
    return Path(recipe.workdir) / "merged" / f"{recipe.name}-{key}"


def merge_report_path(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".report.json")


# --- the merge split by output shard (runner: dask; docs/design.md §9) ----------------------------------


def shard_dir(recipe: Recipe, base: ResolvedModel, finetunes: list[ResolvedModel], coefficients: Coefficients) -> Path:
    """Where a worker writes (and, with a store, from where it uploads) the shards of one merge."""
    out = merged_dir(recipe, base, finetunes, coefficients)
    return out.with_name(out.name + ".shards")


def task_spec_hash(spec: EvalSpec) -> str:
    """Hash of the task definitions themselves (YAML and data), not just their names."""
    digest = hashlib.sha256(json.dumps([spec.tasks, spec.limit], default=str).encode())
    if spec.adapter_base is not None:  # an adapter's score depends on the base it is applied to
        digest.update(b"adapter-on:" + spec.adapter_base[1].encode())
    if spec.tasks_dir is not None:
        for file in sorted(Path(spec.tasks_dir).rglob("*")):
            if file.is_file():
                digest.update(file.relative_to(spec.tasks_dir).as_posix().encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def run_id_for(merged_fingerprint: str) -> str:
    """One run id per merged model per day: a same-day re-run resumes the same prefix."""
    return f"{time.strftime('%Y%m%d', time.gmtime())}-{merged_fingerprint[:12]}"
