"""Linear merges (average, task arithmetic, MetaGPT's merge) as one compiled pass over their rows.

As torch ops a 64 K block took ten sweeps (T differences, ‖θ₀‖², the gram, the scaling, T
adds, θ₀): 18.6 ms per 8 M-entry piece at T = 3 on one thread, in memory, which is about the
I/O floor's time for that piece on a VM whose page cache reads at 25 GB/s, so task arithmetic
was bound by its arithmetic there. Here each entry is loaded once and every step stays in
registers or L1 (`compiled.SUB` entries at a time).

The merged float is the torch kernel's (`kernels.weighted_sum_`): (((+0 + w₀τ₀) + w₁τ₁) + …)
+ θ₀, each product and add rounded once: numba's strict IEEE mode neither fuses nor
reassociates them (tested against numpy, for several target CPUs). Only the diagnostics (gram,
‖θ₀‖²) come from `compiled._dot`'s reassociated float32 runs: they are reported, never merged.
"""

from __future__ import annotations

import numpy as np
import torch

from metamerge.methods.compiled import BLOCK, RUN, SUB, _add_gram, _dot, _mirror
from metamerge.methods.numba_runtime import AVAILABLE, LAUNCH, as_arrays, jit, launch_threads

if AVAILABLE:
    from numba import prange

    @jit(parallel=True, boundscheck=False)
    def _linear_pass(rows, weights, n, out, gram, base_sq):  # pragma: no cover - compiled
        """out = θ₀ + Σ w τ over the rows, block by block on every thread; each block's gram and Σ θ₀²."""
        count = len(rows) - 1
        blocks = (n + BLOCK - 1) // BLOCK
        for b in prange(blocks):
            start = b * BLOCK
            end = min(n, start + BLOCK)
            width = end - start
            base = rows[0][start:end]
            base_sq[b] = _dot(base, base)
            taus = np.empty((count, RUN), np.float32)
            for s0 in range(0, width, SUB):
                s1 = min(width, s0 + SUB)
                span = s1 - s0
                part, merged = base[s0:s1], out[start + s0 : start + s1]
                for i in range(span):
                    merged[i] = np.float32(0.0)
                for t in range(count):
                    row, tau = rows[t + 1][start + s0 : start + s1], taus[t, s0 % RUN : s0 % RUN + span]
                    w = weights[t]
                    for i in range(span):  # a loop over slices vectorizes; mul and add stay two roundings
                        tau[i] = row[i] - part[i]
                        merged[i] = merged[i] + w * tau[i]
                for i in range(span):
                    merged[i] = merged[i] + part[i]
                if s1 % RUN == 0 or s1 == width:  # a run of the gram's sums is complete: add it while in L1
                    _add_gram(gram[b], taus, s1 - s0 // RUN * RUN)
            _mirror(gram[b])


def linear_merge(rows: list[torch.Tensor], weights: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, float]:
    """out[:n] = θ₀ + Σ_t w_t (θ_t − θ₀) for rows [θ₀, θ_1 … θ_T]; returns (gram [T, T] float64, ‖θ₀‖²)."""
    count, n = len(rows) - 1, rows[0].numel()
    blocks = (n + BLOCK - 1) // BLOCK
    gram = np.zeros((blocks, count, count))
    base_sq = np.zeros(blocks)
    with LAUNCH:
        launch_threads(blocks)
        _linear_pass(as_arrays(rows), weights.to(torch.float32).reshape(-1).numpy(), n, out[:n].numpy(), gram, base_sq)
    return torch.from_numpy(gram.sum(axis=0)), float(base_sq.sum())
