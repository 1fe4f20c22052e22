"""What every compiled kernel module shares: the jit options, the launch lock, the thread count,
the rows as arrays. One place, so TIES' passes and the norm pass compile and launch alike.

`AVAILABLE` is False when numba cannot be imported: the torch implementations then run, which
give the same floats. Like torch's own OpenMP threads, numba's do not survive fork(): a
process that computed must not fork a child that computes (Dask's worker processes are
spawned, and nothing here forks).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

try:  # pragma: no branch - the import decides which implementation runs, both are tested
    import numba
    from numba import njit

    from metamerge.methods import kernel_cache

    kernel_cache.install()  # a change to any kernel file recompiles every kernel (see there)
    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised by tests that hide numba
    AVAILABLE = False

# numba's fallback threading layer ("workqueue", where libgomp is missing) aborts the process when
# two threads launch parallel loops at once; merges in one process (Prefect's thread pool) take turns.
LAUNCH = threading.Lock()


def jit(**options):
    """njit, cached on disk where numba finds a writable place (else compiled once per process).

    Without the GIL: the kernels touch no Python object, and while one runs the read-ahead
    thread maps and prepares the next piece, which needs the GIL between its system calls.
    """
    def wrap(function):
        try:
            return njit(cache=True, nogil=True, **options)(function)
        except RuntimeError:  # no writable cache location, e.g. a read-only install
            return njit(nogil=True, **options)(function)
    return wrap


def launch_threads(blocks: int | None = None) -> None:
    """Before a kernel: as many threads as torch uses (the merge's choice), and no more than its
    blocks: a one-block kernel (a norm's weight) then runs on the calling thread, where a second
    thread had to be woken on a busy core for nothing."""
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, blocks or torch.get_num_threads())
    numba.set_num_threads(max(1, threads))


def as_arrays(rows: list[torch.Tensor]) -> tuple[np.ndarray, ...]:
    """The rows as a tuple of contiguous float32 arrays (numba compiles one kernel per row count)."""
    if any(row.dtype != torch.float32 or not row.is_contiguous() or row.device.type != "cpu" for row in rows):
        raise ValueError("the compiled kernels need contiguous float32 CPU rows")
    return tuple(row.numpy() for row in rows)
