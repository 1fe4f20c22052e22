"""Where metamerge writes, and the rule it never breaks: never delete, move or overwrite what it did not write.

- Every folder metamerge produces (a merged checkpoint) carries `.metamerge-output.json`, listing
  its files and sizes. Only such a folder, holding nothing but those files, may ever be replaced,
  and only when the caller asks for it (`metamerge merge --replace`, or the workdir's own
  content-addressed folders). Anything else that exists and is not empty is refused.
- A place to write may never be, lie inside, or contain an input (base, fine-tunes, workdir).
- Work in progress goes to a hidden temporary sibling `.<name>.<tag>-<pid>-<random>` that holds
  `.metamerge-temp.json`, on which its process keeps an exclusive `flock` while it lives. A later
  run deletes such a folder only when that lock can be taken, i.e. its owner is dead (SIGKILL
  releases it too); a look-alike folder without the marker is never touched.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from metamerge.errors import OutputError

OUTPUT_MARKER = ".metamerge-output.json"
TEMP_MARKER = ".metamerge-temp.json"
MARKERS = (OUTPUT_MARKER, TEMP_MARKER)
# --- outputs metamerge wrote ------------------------------------------------------------------------


def _listing(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in MARKERS}


def write_output_marker(folder: Path, kind: str = "merge") -> None:
    """Records that metamerge wrote `folder`, and exactly which files (name → size) it holds.

    Nothing time-dependent: two merges of the same inputs stay byte-identical, marker included.
    """
    (Path(folder) / OUTPUT_MARKER).write_text(output_marker_text(_listing(Path(folder)), kind))


def output_marker_text(files: dict[str, int], kind: str = "merge") -> str:
    """The marker of a folder holding `files` (name → size), also for one assembled in S3 (finalize in place)."""
    from metamerge import __version__

    return json.dumps({"tool": "metamerge", "version": __version__, "kind": kind, "files": files}, indent=1)


def read_output_marker(folder: Path) -> dict | None:
    try:
        record = json.loads((Path(folder) / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("tool") == "metamerge" else None


def output_state(path: Path) -> str:
    """absent | empty | intact | damaged (ours, files missing or resized) | foreign (not ours, or with extra files)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return "absent"
    if path.is_symlink() or not path.is_dir():
        return "foreign"
    if not any(path.iterdir()):
        return "empty"
    record = read_output_marker(path)
    if record is None:
        return "foreign"
    listed: dict[str, int] = record.get("files", {})
    present = _listing(path)
    if set(present) - set(listed):
        return "foreign"  # somebody put files of their own in it: never delete those
    return "intact" if present == listed else "damaged"


def check_output(out: Path, existing: str = "refuse", flag: str = "--replace") -> str:
    """Raises unless `out` may receive a new output under `existing` (refuse | replace | keep); returns its state.

    `replace` and `keep` only ever apply to an output metamerge wrote (`keep` leaves an intact one
    as it is, e.g. the workdir's content-addressed merge that a concurrent run just committed).
    """
    state = output_state(out)
    if state in ("absent", "empty"):
        return state
    if state == "foreign":
        if not Path(out).is_dir():
            raise OutputError(f"{out} exists and is not a folder; metamerge never overwrites what it did not write")
        raise OutputError(f"{out} exists, is not empty and was not written by metamerge; choose a new or empty "
                          "folder (nothing was changed)")
    if existing == "refuse":
        raise OutputError(f"{out} holds an earlier metamerge output; pass {flag} to replace it, or choose a new folder")
    return state


# --- inputs are never written to ----------------------------------------------------------------------


def _relation(path: Path, other: Path) -> str | None:
    a, b = Path(path).resolve(), Path(other).resolve()
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def refuse_overlap(path: Path, what: str, protected: dict[str, Path]) -> None:
    """`what` (e.g. "--out", "workdir") may not be, lie inside, or contain any protected folder."""
    for label, other in protected.items():
        relation = _relation(path, other)
        if relation == "is":
            raise OutputError(f"{what} {path} is the {label} folder; metamerge never writes into its inputs")
        if relation is not None:
            raise OutputError(f"{what} {path} {relation} the {label} folder {other}; choose a folder apart "
                              "from every input")


def local_inputs(recipe) -> dict[str, Path]:
    """The recipe's local input folders (remote refs are downloaded into the workdir, not given by the user)."""
    def local(ref: str) -> Path | None:
        if "://" in ref and not ref.startswith("file://"):
            return None
        return Path(ref.removeprefix("file://")).expanduser()

    found: dict[str, Path] = {}
    if (base := local(recipe.base)) is not None:
        found["base"] = base
    for ft in recipe.finetunes:
        if (path := local(ft.ref)) is not None:
            found[f"fine-tune {ft.label!r}"] = path
    if recipe.evaluation is not None and recipe.evaluation.tasks_dir:
        found["evaluation.tasks_dir"] = Path(recipe.evaluation.tasks_dir)
    return found


# --- temporaries ----------------------------------------------------------------------------------------


@dataclass
class TempDir:
    """A temporary folder this process owns (its lock is held until `close`)."""

    path: Path
    fd: int | None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.close()


def temp_name(out: Path, tag: str = "tmp") -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def make_temp(out: Path, tag: str = "tmp") -> TempDir:
    """A marked, locked temporary sibling of `out`; the lock dies with this process, however it dies."""
    path = temp_name(out, tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir()
    fd = os.open(path / TEMP_MARKER, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({"tool": "metamerge", "pid": os.getpid(), "host": socket.gethostname(),
                             "for": str(out), "created": time.time()}).encode())
    return TempDir(path, fd)


def _owner_is_gone(folder: Path) -> bool:
    """True only for a folder metamerge marked as temporary whose owning process holds no lock any more."""
    try:
        fd = os.open(Path(folder) / TEMP_MARKER, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False  # no marker: not a temporary of ours (or one being committed right now)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live process owns it
        try:
            record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            return False
        return isinstance(record, dict) and record.get("tool") == "metamerge"
    finally:
        os.close(fd)


def remove_stale_temporaries(out: Path, tag: str = "tmp") -> list[Path]:
    """Deletes the temporaries of `out` left by killed runs (marked, and no live owner); returns them."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for candidate in out.parent.glob(f".{glob.escape(out.name)}.{tag}-*"):
        if candidate.is_dir() and not candidate.is_symlink() and _owner_is_gone(candidate):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def commit(temp: TempDir, out: Path, existing: str = "refuse", kind: str = "merge") -> bool:
    """Marks the finished temporary as metamerge's output and renames it to `out`.

    Returns False when `existing="keep"` found an intact output already there (the temporary is
    then discarded). Raises OutputError, leaving `out` untouched, when the rule forbids replacing.
    """
    out = Path(out)
    write_output_marker(temp.path, kind)
    try:
        for _ in range(3):
            state = check_output(out, existing)
            if state == "intact" and existing == "keep":
                temp.discard()
                return False
            if state in ("absent", "empty"):
                try:
                    os.rename(temp.path, out)  # atomic; replaces an empty folder, fails on a non-empty one
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                        continue  # somebody wrote there meanwhile: look again
                    raise
                (out / TEMP_MARKER).unlink(missing_ok=True)
                return True
            # ours, to be replaced: swap it out, swap ours in, then delete the old one
            old = temp_name(out, "old")
            os.rename(out, old)
            os.rename(temp.path, out)
            (out / TEMP_MARKER).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)
            return True
        raise OutputError(f"{out} keeps changing while metamerge commits its output; nothing was replaced")
    finally:
        temp.close()

