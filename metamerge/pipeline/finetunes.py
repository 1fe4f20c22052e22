"""A registry of fine-tunes: a local folder or an S3 prefix with one sub-folder per fine-tune.

Layout (documented in docs/operations.md):

    <registry>/<name>/model*.safetensors, config.json, tokenizer files ...
    <registry>/<name>/finetune.json   {"base": "<ref of the base it was tuned from>",
                                       "tasks": ["<lm-eval task>", ...]}

The watcher compares what the registry holds for the recipe's base against the inputs of the
last published merge, so a new fine-tune is merged exactly once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from metamerge.io.manifests import latest_manifest
from metamerge.io.s3 import s3_client
from metamerge.io.targets import parse_target
from metamerge.recipe import Recipe

METADATA = "finetune.json"


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    ref: str
    base: str
    tasks: tuple[str, ...]


def list_registry(registry: str, endpoint_url: str | None = None) -> list[RegistryEntry]:
    """Every folder of the registry that carries a finetune.json, sorted by name."""
    target = parse_target(registry)
    entries = []
    if target.is_s3:
        client = s3_client(endpoint_url)
        prefix = f"{target.prefix}/" if target.prefix else ""
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=target.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):]
                if rel.count("/") == 1 and rel.endswith(f"/{METADATA}"):
                    name = rel.split("/", 1)[0]
                    meta = json.loads(client.get_object(Bucket=target.bucket, Key=obj["Key"])["Body"].read())
                    entries.append(_entry(name, f"s3://{target.bucket}/{prefix}{name}", meta))
    else:
        root = Path(target.path)
        for folder in sorted(p for p in root.iterdir() if (p / METADATA).is_file()) if root.is_dir() else []:
            entries.append(_entry(folder.name, str(folder.resolve()), json.loads((folder / METADATA).read_text())))
    return sorted(entries, key=lambda e: e.name)


def _entry(name: str, ref: str, meta: dict) -> RegistryEntry:
    return RegistryEntry(name=meta.get("name", name), ref=ref, base=str(meta.get("base", "")),
                         tasks=tuple(meta.get("tasks", ())))


def published_finetune_refs(recipe: Recipe) -> set[str]:
    """Refs merged by the last published run of this recipe's model (empty if none)."""
    if recipe.publish is None:
        return set()
    manifest = latest_manifest(recipe.publish.target, recipe.name, recipe.publish.endpoint_url or recipe.endpoint_url)
    if manifest is None:
        return set()
    return set(manifest.get("inputs", {}).get("finetunes", []))


def same_base(entry: RegistryEntry, recipe: Recipe) -> bool:
    return entry.base.rstrip("/") == recipe.base.rstrip("/")


def extend_recipe(recipe: Recipe, entries: list[RegistryEntry]) -> Recipe:
    """The recipe plus registry fine-tunes it does not list yet (by ref)."""
    known = {ft.ref.rstrip("/") for ft in recipe.finetunes}
    labels = {ft.label for ft in recipe.finetunes}
    added = []
    for entry in entries:
        if entry.ref.rstrip("/") in known:
            continue
        name = entry.name if entry.name not in labels else f"{entry.name}-{len(labels)}"
        labels.add(name)
        added.append({"ref": entry.ref, "name": name, "tasks": list(entry.tasks)})
    if not added:
        return recipe
    data = recipe.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["finetunes"] = [*data["finetunes"], *added]
    return Recipe.model_validate(data)


def entry_for_ref(ref: str, endpoint_url: str | None = None) -> RegistryEntry:
    """Reads the finetune.json next to a fine-tune given only its ref (event payloads carry refs)."""
    from metamerge.io.manifests import read_json

    meta = read_json(f"{ref.rstrip('/')}/{METADATA}", endpoint_url)
    return _entry(ref.rstrip("/").rsplit("/", 1)[-1], ref, meta)


@dataclass(frozen=True)
class Discovery:
    """What a registry holds for a recipe: `refs` is what a merge adds, `new` what triggers one."""

    ignored: tuple[RegistryEntry, ...]  # fine-tunes of another base
    new: tuple[RegistryEntry, ...]  # neither in the recipe nor in its last published merge
    refs: tuple[str, ...]  # every fine-tune of this base that the recipe lacks


def discover(recipe: Recipe, registry: str) -> Discovery:
    """Compares the registry with the recipe and with the inputs of its last published merge."""
    entries = list_registry(registry, recipe.endpoint_url)
    ignored = tuple(e for e in entries if not same_base(e, recipe))
    candidates = [e for e in entries if same_base(e, recipe)]
    in_recipe = {ft.ref.rstrip("/") for ft in recipe.finetunes}
    published = published_finetune_refs(recipe)
    outside = [e for e in candidates if e.ref.rstrip("/") not in in_recipe]
    return Discovery(ignored=ignored, new=tuple(e for e in outside if e.ref not in published),
                     refs=tuple(e.ref for e in outside))
