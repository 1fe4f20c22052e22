"""Fault-injection points for crash and race tests; inert unless METAMERGE_TEST_* is set.

A test that must SIGKILL a run *during* the merge or *during* the upload sets
METAMERGE_TEST_HANG_AT=merge|merge-shard|stage-upload|upload and METAMERGE_TEST_HANG_MARKER=<file>: the run
writes its pid to the marker at that point and stops there until killed, so the kill lands
deterministically. With METAMERGE_TEST_HANG_ONCE=1 only the first process to arrive hangs
(a Dask worker killed there has its task re-run on another worker, which must pass).
METAMERGE_TEST_PAUSE_AT=<point> with METAMERGE_TEST_PAUSE_S=<seconds> only slows that point
down, so that a tiny merge lasts long enough for two runs to contend for one concurrency slot.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def hang_point(name: str) -> None:
    if os.environ.get("METAMERGE_TEST_PAUSE_AT") == name:
        time.sleep(float(os.environ.get("METAMERGE_TEST_PAUSE_S", "3")))
    if os.environ.get("METAMERGE_TEST_HANG_AT") != name:
        return
    marker = os.environ.get("METAMERGE_TEST_HANG_MARKER")
    if marker and os.environ.get("METAMERGE_TEST_HANG_ONCE"):
        # once per marker: the first process to get here hangs; a retry elsewhere passes through
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
    elif marker:
        Path(marker).write_text(str(os.getpid()))
    while True:  # until SIGKILL
        time.sleep(1)


def rendezvous(name: str) -> None:
    """Lines up concurrent processes at one point, for race tests; inert unless METAMERGE_TEST_RENDEZVOUS_AT=name.

    With METAMERGE_TEST_RENDEZVOUS_DIR=<folder> and METAMERGE_TEST_RENDEZVOUS_N=<n>, each arriving
    process takes the next free slot k, waits until n processes have arrived, then goes on after
    k × 2 s: the first to arrive is the first to leave, deterministically.
    """
    if os.environ.get("METAMERGE_TEST_RENDEZVOUS_AT") != name:
        return
    folder = Path(os.environ["METAMERGE_TEST_RENDEZVOUS_DIR"])
    count = int(os.environ.get("METAMERGE_TEST_RENDEZVOUS_N", "2"))
    folder.mkdir(parents=True, exist_ok=True)
    slot = 0
    while True:
        try:
            os.close(os.open(folder / f"slot-{slot}", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
            break
        except FileExistsError:
            slot += 1
    deadline = time.monotonic() + 300
    while len(list(folder.glob("slot-*"))) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2.0 * slot)
