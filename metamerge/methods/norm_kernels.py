"""The norm pass's square sums as compiled loops: each input read once, on every core, at memory speed.

MetaGPT reads every input twice, once for ‖τ‖² and once to merge, so the norm pass is half of
its reading. As torch ops it made a float64 copy, a square and a column sum per block, each a
sweep of a scratch several times the input's size, and took about twice as long as the read
(and longest on a slow or busy machine, where compute suffers most). Here each entry is loaded
once, τ is formed, squared and added to its column in registers.

The float is fixed by `norms`' order, not by this code: within a block of 65 536 entries each
of the 256 columns sums its rows in order, from zero; the block sums are added in block order.
Threads take whole blocks and the block sums are added after the loop, so the core count
changes nothing; SIMD lanes are columns, and numba's strict IEEE mode does not reassociate, so
the vector width changes nothing (tested for several target CPUs). The torch fallback in
`norms` makes the same floats with `cumsum`, which is a sequential sum.
"""

from __future__ import annotations

import numpy as np
import torch

from metamerge.methods.numba_runtime import AVAILABLE, LAUNCH, as_arrays, jit, launch_threads

BLOCK = 1 << 16  # entries whose column sums start from zero (norms.BLOCK)
COLUMNS = 256

if AVAILABLE:
    from numba import prange

    @jit(boundscheck=False)
    def _add_squares(x, start, stop, columns):  # pragma: no cover - compiled
        """columns[c] += x[i]² for x[start:stop], row by row (a row is 256 entries, one per column)."""
        whole = start + (stop - start) // COLUMNS * COLUMNS
        for row in range(start, whole, COLUMNS):
            xs = x[row : row + COLUMNS]  # a loop over a slice of constant length vectorizes
            for c in range(COLUMNS):
                v = np.float64(xs[c])
                columns[c] += v * v
        xs = x[whole:stop]
        for c in range(xs.shape[0]):
            v = np.float64(xs[c])
            columns[c] += v * v

    @jit(boundscheck=False)
    def _add_squared_differences(x, base, start, stop, columns):  # pragma: no cover - compiled
        """columns[c] += (x[i] − base[i])², the difference made in float32 (as τ is everywhere)."""
        whole = start + (stop - start) // COLUMNS * COLUMNS
        for row in range(start, whole, COLUMNS):
            xs, bs = x[row : row + COLUMNS], base[row : row + COLUMNS]
            for c in range(COLUMNS):
                v = np.float64(xs[c] - bs[c])
                columns[c] += v * v
        xs, bs = x[whole:stop], base[whole:stop]
        for c in range(xs.shape[0]):
            v = np.float64(xs[c] - bs[c])
            columns[c] += v * v

    @jit(parallel=True, boundscheck=False)
    def _square_sums(rows, n, parts, out):  # pragma: no cover - compiled
        """out[0] += Σ rows[0]², out[t] += Σ (rows[t] − rows[0])², per column, in the fixed order."""
        for b in prange(parts.shape[0]):
            start = b * BLOCK
            stop = min(n, start + BLOCK)
            _add_squares(rows[0], start, stop, parts[b, 0])  # the base block is then in cache for the rest
            for t in range(1, len(rows)):
                _add_squared_differences(rows[t], rows[0], start, stop, parts[b, t])
        for b in range(parts.shape[0]):  # in block order, whatever thread made each block
            for t in range(parts.shape[1]):
                for c in range(COLUMNS):
                    out[t, c] += parts[b, t, c]


def column_square_sums(rows: list[torch.Tensor]) -> np.ndarray:
    """[len(rows), 256] float64: row 0's squares, then each other row's squared difference with row 0.

    `rows`: flat float32 CPU tensors (`as_arrays` makes them contiguous arrays)."""
    n = rows[0].numel()
    parts = np.zeros((-(-n // BLOCK), len(rows), COLUMNS))
    out = np.zeros((len(rows), COLUMNS))
    with LAUNCH:
        launch_threads()
        _square_sums(as_arrays(rows), n, parts, out)
    return out
