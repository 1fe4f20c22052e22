"""Fault-injection points for crash tests; inert unless METAMERGE_TEST_HANG_AT is set.

A test that must SIGKILL a run *during* the merge or *during* the upload sets
METAMERGE_TEST_HANG_AT=merge|upload and METAMERGE_TEST_HANG_MARKER=<file>: the run touches
the marker at that point and stops there until killed, so the kill lands deterministically.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def hang_point(name: str) -> None:
    if os.environ.get("METAMERGE_TEST_HANG_AT") != name:
        return
    marker = os.environ.get("METAMERGE_TEST_HANG_MARKER")
    if marker:
        Path(marker).write_text(str(os.getpid()))
    while True:  # until SIGKILL
        time.sleep(1)
