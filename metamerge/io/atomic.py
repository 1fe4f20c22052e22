"""Small files written so that readers never see half of one."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Written under a temporary name, then renamed: readers never see half a file, a failure leaves none."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_once(path: Path, data: dict) -> dict:
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
