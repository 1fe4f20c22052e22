"""TIES trims remembered between merges: a nightly merge of unchanged fine-tunes selects nothing.

A fine-tune's trim of a tensor (its k-th largest |τ| and where its dropped ties begin) depends
only on the base, that fine-tune and the density, so it is kept per fine-tune, in one small
file named by the caller from their content (`pipeline/keys.py`). With every fine-tune's trim
of a tensor known, TIES merges it in one pass instead of a counting pass plus a merging pass;
when a new fine-tune joins, only the base and that fine-tune are read for its count.

Nothing here is trusted: `ties.ties_piece` keeps a one-pass merge only if each fine-tune kept
exactly k entries, which holds for the right trim alone, and selects again otherwise. So a
missing, damaged, stale or tampered file costs time, never bytes. Files are replaced whole
(write, then rename), so two merges writing at once lose at most the other's new entries.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from metamerge.io.atomic import write_atomic
from metamerge.methods.ties import Trim

VERSION = 1


class ThresholdCache:
    """One file per fine-tune (`keys`, in merge order) under `folder`, read at start, written by `save`."""

    def __init__(self, folder: Path, keys: list[str]):
        self.folder, self.keys = Path(folder), keys
        self.known = [_load(self.folder / f"{key}.json") for key in keys]
        self.learned: list[dict[str, Trim]] = [{} for _ in keys]
        self.tensors = self.selected = 0  # TIES tensors merged; of those, selected (the rest reused trims)

    def trims(self, name: str) -> list[Trim | None]:
        """Each fine-tune's trim of `name` (None where unknown: `ties_piece` selects for those alone)."""
        self.tensors += 1
        return self.peek(name)

    def peek(self, name: str) -> list[Trim | None]:
        """`trims(name)` without counting it as merged: the read-ahead thread looks before the merge does."""
        return [known.get(name) for known in self.known]

    def learn(self, name: str, trims: list[Trim]) -> None:
        """The trims a selection found (also where remembered ones were wrong)."""
        self.selected += 1
        for known, learned, trim in zip(self.known, self.learned, trims, strict=True):
            if known.get(name) != trim:
                learned[name] = trim

    def save(self) -> list[str]:
        """Writes the files that learned something (after a merge committed: its trims are right).

        Returns what could not be written (a full disk, a read-only folder): the merge stands, the
        next one selects those tensors again.
        """
        unsaved = []
        for key, known, learned in zip(self.keys, self.known, self.learned, strict=True):
            if not learned:
                continue
            path = self.folder / f"{key}.json"
            entries = {**_load(path), **known, **learned}  # what another merge added meanwhile stays
            text = json.dumps({"version": VERSION, "tensors": {name: list(trim) for name, trim in sorted(entries.items())}})
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                write_atomic(path, lambda tmp, text=text: tmp.write_text(text))
            except OSError as error:
                unsaved.append(f"{path}: {error.strerror or error}")
                continue
            known.update(learned)
            learned.clear()
        return unsaved


def _load(path: Path) -> dict[str, Trim]:
    """A file's trims; empty when it is missing, unreadable or not of this version (a miss, not an error)."""
    try:
        data = json.loads(path.read_text())
        if data.get("version") != VERSION:
            return {}
        trims = {str(name): (float(value[0]), int(value[1])) for name, value in data["tensors"].items()}
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return {}
    return {name: trim for name, trim in trims.items() if math.isfinite(trim[0])}
