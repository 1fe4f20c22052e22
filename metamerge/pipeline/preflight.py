"""Preflight: what can be checked in seconds is checked before any heavy stage.

A run that would fail at its publish step after an hour of merging and scoring fails here
instead, in seconds and with one line:

- every place the run writes (workdir, local publish target, `merge --out`) is apart from the
  inputs, and `--out` holds nothing metamerge did not write (metamerge.outputs);
- local places are writable (a hidden probe file, created and removed);
- the S3 publish target, result storage and shared storage are reachable, their bucket exists
  and the credentials may write (a multipart upload created and aborted: no object appears);
- the disks have room for the merged model (estimated from the base's file sizes).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from metamerge.errors import WriteError, describe_os_error
from metamerge.io import outputs
from metamerge.io.s3 import check_s3_writable
from metamerge.io.targets import parse_target
from metamerge.recipe import Recipe

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
MARGIN = 1.02  # headers, index, small documents


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def probe_writable(folder: Path, what: str) -> None:
    """Creates and removes a hidden file in `folder` (or its nearest existing ancestor)."""
    where = _existing_ancestor(folder)
    probe = where / f".metamerge-preflight-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
    except OSError as exc:
        raise WriteError(f"{what} {folder} is not writable: {describe_os_error(exc)}") from None
    probe.unlink()


def estimate_merge_bytes(base_dir: Path, dtype: str = "auto") -> int:
    """Size of the merged checkpoint: the base's weights (rescaled to the output dtype) plus its other files."""
    base_dir = Path(base_dir)
    files = [p for p in base_dir.iterdir() if p.is_file() and not p.name.startswith(".")]
    weights = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    aux = sum(p.stat().st_size for p in files if p.suffix not in WEIGHT_SUFFIXES)
    factor = 1.0
    if dtype in ITEMSIZE:
        stored = None
        try:
            config = json.loads((base_dir / "config.json").read_text())
            stored = config.get("torch_dtype") or config.get("dtype")
        except (OSError, ValueError, AttributeError):
            pass
        factor = ITEMSIZE[dtype] / ITEMSIZE.get(str(stored), ITEMSIZE[dtype])
    return int((weights * factor + aux) * MARGIN)


def check_disk(needs: list[tuple[Path, int, str]]) -> None:
    """`needs`: (folder, bytes, what). Sums what lands on one file system; fails naming the folder."""
    per_device: dict[int, list[tuple[Path, int, str]]] = {}
    for folder, size, what in needs:
        if size <= 0:
            continue
        device = _existing_ancestor(folder).stat().st_dev
        per_device.setdefault(device, []).append((Path(folder), size, what))
    for entries in per_device.values():
        need = sum(size for _, size, _ in entries)
        free = shutil.disk_usage(_existing_ancestor(entries[0][0])).free
        if need > free:
            whats = " and ".join(f"{what} {folder}" for folder, _, what in entries)
            raise WriteError(f"not enough free disk for {whats}: about {need / 1e6:.1f} MB needed (estimated "
                             f"from the base's size), {free / 1e6:.1f} MB free")


def _local_base(recipe: Recipe) -> Path | None:
    ref = recipe.base
    if "://" in ref and not ref.startswith("file://"):
        return None
    path = Path(ref.removeprefix("file://")).expanduser()
    return path if path.is_dir() else None


def _local_publish_target(recipe: Recipe) -> Path | None:
    if recipe.publish is None:
        return None
    target = parse_target(recipe.publish.target)
    return None if target.is_s3 else Path(target.path)


def _merge_present(recipe: Recipe) -> bool:
    """An intact merge of this recipe's name is already in the workdir (a re-run is then likely cached)."""
    merged = Path(recipe.workdir) / "merged"
    return merged.is_dir() and any(outputs.output_state(p) == "intact" for p in merged.glob(f"{recipe.name}-*"))


def merge_disk_needs(recipe: Recipe, base_dir: Path, out: Path | None = None) -> list[tuple[Path, int, str]]:
    """Room for one new merged model: in the workdir (or at `--out`), and once more at a local publish target."""
    size = estimate_merge_bytes(base_dir, recipe.merge.dtype)
    if out is not None:
        return [(Path(out), size, "--out")]
    needs = [(Path(recipe.workdir) / "merged", size, "workdir")]
    if (target := _local_publish_target(recipe)) is not None:
        needs.append((target, size, "publish target"))
    return needs


def preflight(recipe: Recipe, out: Path | None = None, existing: str = "refuse") -> list[str]:
    """Runs every check; raises the first failure (one line). Returns what was checked, for the log.

    With `out` (`metamerge merge --out`: no Prefect, no publishing) the publish target and the
    result and shared storage are not checked; `out` is, with `existing` (refuse | replace).
    """
    started = time.monotonic()
    done: list[str] = []
    inputs = outputs.local_inputs(recipe)
    workdir = Path(recipe.workdir)
    if out is not None:  # the merge-only command publishes nothing and runs no Prefect task
        recipe = recipe.model_copy(update={"publish": None, "results": None, "runner": recipe.runner.model_copy(
            update={"kind": "local", "address": None, "cluster": None, "storage": None})})
    target = _local_publish_target(recipe)

    outputs.refuse_overlap(workdir, "workdir", inputs)
    if target is not None:
        outputs.refuse_overlap(target, "publish target", inputs)
    if out is not None:
        outputs.refuse_overlap(Path(out), "--out", {**inputs, "workdir": workdir})
        outputs.check_output(Path(out), existing)
    done.append("no output overlaps an input")

    probe_writable(workdir, "workdir")
    if target is not None:
        probe_writable(target, "publish target")
    if out is not None:
        probe_writable(Path(out).parent, "--out")
    done.append("local folders writable")

    endpoint = recipe.endpoint_url
    s3_checks = []
    if recipe.publish is not None and target is None:
        s3_checks.append((recipe.publish.target, recipe.publish.endpoint_url or endpoint, "publish target"))
    if recipe.results:
        s3_checks.append((recipe.results, endpoint, "result storage"))
    if recipe.shared_storage:
        s3_checks.append((recipe.shared_storage, endpoint, "shared storage"))
    for uri, url, what in s3_checks:
        warning = check_s3_writable(uri, url, what)
        done.append(warning or f"{what} {uri} writable")

    base_dir = _local_base(recipe)
    if base_dir is not None and (out is not None or not _merge_present(recipe)):
        check_disk(merge_disk_needs(recipe, base_dir, out))
        done.append("free disk for the merged model")
    done.append(f"{time.monotonic() - started:.2f}s")
    return done
