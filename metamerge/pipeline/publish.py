"""The gate and publish stages: judge against the last publish, publish, check a publish still stands."""

from __future__ import annotations

import hashlib
from pathlib import Path

from metamerge.errors import writing
from metamerge.evaluation.gate import GateDecision, baseline_from_manifest
from metamerge.evaluation.gate import check_gate as check_gate_against
from metamerge.io import outputs
from metamerge.io.manifests import latest_manifest, published_run_intact
from metamerge.io.publish import PublishResult, Source, StoredObject, publish_run
from metamerge.pipeline.inputs import digest_cache, shared_store
from metamerge.pipeline.merge import MergeOutput
from metamerge.recipe import Recipe, recipe_to_yaml


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
    files: dict[str, Source] = dict(_stored_merge(recipe, Path(merged.path)))
    if not files:
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
                           digests=digest_cache(workdir))
    finally:
        stage.discard()


def _stored_merge(recipe: Recipe, merged: Path) -> dict[str, StoredObject]:
    """The merged folder as objects to copy server-side, when it is committed in shared storage (not on
    this machine) and the publish target is S3 on the same endpoint; else {} (files are uploaded)."""
    assert recipe.publish is not None
    store = shared_store(recipe)
    same_endpoint = (recipe.publish.endpoint_url or recipe.endpoint_url) == store.endpoint_url
    if merged.exists() or store.uri is None or not recipe.publish.target.startswith("s3://") or not same_endpoint:
        return {}
    committed = store.manifest(merged) or {}
    stored = {}
    for name, entry in committed.items():
        if not name.startswith("."):
            bucket, key = store.location(merged / name)
            stored[name] = StoredObject(bucket, key, entry["size"], entry["sha256"])
    return stored


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
