"""TIES' two passes as compiled loops (numba): one sweep of memory per pass, every core.

Torch's eager CPU ops make a temporary and a sweep per step, and TIES needs about twenty
steps per entry (difference, magnitude, bracket tests, trim, election, agreement, sums), so
the blocked torch passes (`ties_torch.first_pass`, `second_pass`) take several times as
long as reading the inputs. Here each block of entries is read once per pass and every step
stays in registers. The loops are written without branches on the data (selects only) so
LLVM vectorizes them, and without reassociation of float sums (numba's default strict IEEE
mode), so the merged floats are those of the torch kernels on every CPU, bit for bit (tested).
Only the diagnostics (gram, ‖θ₀‖²: float32 runs summed in float64) may reassociate: they are
reported, never merged. The inputs are only read (they may be mapped files): τ = θ_t − θ₀ is
made where it is used.

`AVAILABLE` (from `numba_runtime`, which also holds the jit options and the launch lock) is
False when numba cannot be imported: TIES then runs on the torch passes, which give the same floats.
"""

from __future__ import annotations

import numpy as np
import torch

from metamerge.methods.numba_runtime import AVAILABLE, LAUNCH, as_arrays, jit, launch_threads
from metamerge.methods.simd import WIDTH, scan_band

if AVAILABLE:
    from numba import prange

BLOCK = 1 << 16  # entries per block: a block's rows stay in cache between the steps of a pass
BAND_CAPACITY = BLOCK // 8  # in-bracket |τ| a block keeps from its first pass (the bracket holds ~2.5 %)
# Entries per step within a block: each step's τ and trimmed τ (T rows) and the second pass's
# vote, total and mass (3 rows) stay in L1 between the loops that write and read them. With the
# scratch rows as long as the block (1.5 MB at T = 3, beyond L2) the second pass took 0.32 s on
# the benchmark family; with 256 entries 0.18 s (in memory, same floats; 1024: 0.26 s, 128: 0.18 s).
SUB = 256
RUN = 1024  # products per float32 partial sum of the gram (`_dot`)
assert RUN % SUB == 0, "the passes add the gram's runs at step ends"


if AVAILABLE:
    @jit(boundscheck=False, fastmath={"reassoc"})
    def _dot(x, y):  # pragma: no cover - compiled
        """Σ x·y in float32 runs of RUN, vectorized (reassociated), summed in float64: diagnostics only."""
        total = 0.0
        for run in range(0, x.shape[0], RUN):
            part = np.float32(0.0)
            xs, ys = x[run : run + RUN], y[run : run + RUN]  # (a loop over slices vectorizes, range(run, …) not)
            for i in range(xs.shape[0]):
                part += xs[i] * ys[i]
            total += part
        return total

    @jit(boundscheck=False)
    def _add_gram(gram, taus, length):  # pragma: no cover - compiled
        """gram[x, y] += Σ τ_x·τ_y over the first `length` entries of a run's scratch, one of `_dot`'s
        float32 runs: summed run by run as the passes go, the gram is the whole block's `_dot`."""
        count = taus.shape[0]
        for x in range(count):
            for y in range(x, count):
                gram[x, y] += _dot(taus[x, :length], taus[y, :length])

    @jit(boundscheck=False)
    def _mirror(gram):  # pragma: no cover - compiled
        """The lower triangle from the upper one, which `_add_gram` fills."""
        for x in range(gram.shape[0]):
            for y in range(x + 1, gram.shape[0]):
                gram[y, x] = gram[x, y]

    @jit(parallel=True, boundscheck=False)
    def _first_pass(rows, n, lo, hi, above, inside, gram, base_sq, scratch, order):  # pragma: no cover - compiled
        """Per block and fine-tune, while the block is in cache: |τ| > hi counted, lo ≤ |τ| ≤ hi
        counted and copied in position order into the block's `scratch` row (as far as it holds);
        the block's gram and Σ θ₀². The rows are only read: τ = θ_t − θ₀ goes to a scratch of one
        gram run (RUN entries per fine-tune), where the gram reads it from L1; τ, both counts and
        the band's copy come from one `simd.scan_band` per 16 entries. Fine-tunes are visited in
        `order`: ascending addresses (`address_order`)."""
        count = len(rows) - 1
        capacity = scratch.shape[2] - WIDTH
        blocks = (n + BLOCK - 1) // BLOCK
        for b in prange(blocks):
            start = b * BLOCK
            end = min(n, start + BLOCK)
            width = end - start
            base = rows[0][start:end]
            base_sq[b] = _dot(base, base)
            taus = np.empty((count, RUN), np.float32)
            at = np.zeros(count, np.int64)
            for s0 in range(0, width, SUB):
                s1 = min(width, s0 + SUB)
                span = s1 - s0
                part = base[s0:s1]
                for visit in range(count):
                    t = order[visit]
                    row, tau, kept = rows[t + 1], taus[t], scratch[b, t]
                    low, high = lo[t], hi[t]
                    up = 0
                    cursor = at[t]  # past `capacity` the block overflowed: its band is gathered again
                    whole = span // WIDTH * WIDTH
                    for i in range(0, whole, WIDTH):  # 16 at a time (methods/simd.py)
                        found = scan_band(row, start + s0 + i, part, i, tau, s0 % RUN + i, low, high, kept,
                                          min(cursor, capacity))  # (a store reaches 15 past it: the row's spare)
                        up += found >> 32
                        cursor += found & 0xFFFFFFFF
                    for i in range(whole, span):  # every value is written; the next overwrites it unless inside
                        value = row[start + s0 + i] - part[i]
                        tau[s0 % RUN + i] = value
                        magnitude = abs(value)
                        up += magnitude > high
                        kept[min(cursor, capacity)] = magnitude
                        cursor += (magnitude >= low) & (magnitude <= high)
                    above[b, t] += up
                    at[t] = cursor
                if s1 % RUN == 0 or s1 == width:  # a run of the gram's sums is complete: add it while in L1
                    _add_gram(gram[b], taus, s1 - s0 // RUN * RUN)
            inside[b] = at
            _mirror(gram[b])

    @jit(parallel=True, boundscheck=False)
    def _sample(rows, positions, out):  # pragma: no cover - compiled
        """out[t, j] = |θ_t − θ₀| at positions[j] (increasing): the brackets' sample, gathered on every core."""
        count = len(rows) - 1
        size = positions.shape[0]
        parts = (size + 1023) // 1024
        base = rows[0]
        for part in prange(parts * count):
            t = part // parts
            row = rows[t + 1]
            for j in range((part % parts) * 1024, min(size, (part % parts + 1) * 1024)):
                position = positions[j]
                out[t, j] = abs(row[position] - base[position])

    @jit(parallel=True, boundscheck=False)
    def _gather_band(rows, n, lo, hi, offsets, band):  # pragma: no cover - compiled
        """Writes each block's lo ≤ |τ| ≤ hi, in position order, at its offset in `band`."""
        count = len(rows) - 1
        blocks = (n + BLOCK - 1) // BLOCK
        for b in prange(blocks):
            start = b * BLOCK
            end = min(n, start + BLOCK)
            base = rows[0][start:end]
            for t in range(count):
                row = rows[t + 1][start:end]
                low, high = lo[t], hi[t]
                at = offsets[b, t]
                for i in range(end - start):
                    magnitude = abs(row[i] - base[i])
                    if (magnitude >= low) & (magnitude <= high):  # one branch, rarely taken
                        band[at] = magnitude
                        at += 1

    def _merging_kernel(counting):
        """The second pass with or without the count of what each fine-tune keeps: the remembered
        trims check themselves with it, a cold merge does not need it, and its sum in the loop
        cost 11 % of the pass compiled for AVX-512 and 15 % for AVX2 (1.57 M entries, in cache)."""

        @jit(parallel=True, boundscheck=False)
        def _second_pass(rows, n, floors, cuts, weights, scale, normalize, out, kept_count, diagnostics, gram,
                         base_sq):  # pragma: no cover - compiled
            """Trim (keep |τ| > floor, except ties with the threshold from position `cut` on), elect
            (sign of Σ w τ, 0 elects +), disjoint sum or mean, ·scale, + θ₀. Counts what each
            fine-tune keeps per block (when `counting`); with `diagnostics` (no first pass ran), also
            the gram and Σ θ₀².

            Every sum runs over the fine-tunes in order, with no fused multiply-add, as in
            `kernels.elect_and_combine`: the same floats, the same signed zeros.
            """
            count = len(rows) - 1
            blocks = (n + BLOCK - 1) // BLOCK
            zero, unordered = np.float32(0.0), np.float32(np.nan)
            for b in prange(blocks):
                start = b * BLOCK
                end = min(n, start + BLOCK)
                width = end - start
                base = rows[0][start:end]
                vote = np.empty(SUB, np.float32)
                total = np.empty(SUB, np.float32)
                mass = np.empty(SUB, np.float32)
                kept = np.empty((count, SUB), np.float32)  # trimmed τ of a sub-block: made once, read twice, in L1
                numbers = np.zeros(count, np.int64)
                raw = np.empty((count, RUN if diagnostics else 0), np.float32)  # one gram run of raw τ
                for s0 in range(0, width, SUB):
                    s1 = min(width, s0 + SUB)
                    span = s1 - s0
                    for t in range(count):
                        row = rows[t + 1][start + s0:start + s1]
                        bs = base[s0:s1]
                        floor, cut, weight = floors[t], cuts[t] - start - s0, weights[t]
                        threshold = np.nextafter(floor, np.float32(np.inf))
                        number = 0
                        # before the cut, ties with the threshold are kept (|τ| ≠ NaN always holds): two
                        # loops, not an int64 compare with the cut per entry, which cost AVX2 a third
                        cut = min(max(cut, 0), span)
                        for first, last, tie in ((0, cut, unordered), (cut, span, threshold)):
                            row_part, base_part = row[first:last], bs[first:last]
                            kept_part, vote_part = kept[t, first:last], vote[first:last]
                            for i in range(last - first):
                                tau = row_part[i] - base_part[i]
                                magnitude = abs(tau)
                                keep = (magnitude > floor) & (magnitude != tie)
                                if counting:  # (a constant of the closure: compiled in or out)
                                    number += keep
                                tau = tau if keep else zero
                                kept_part[i] = tau
                                vote_part[i] = weight * tau if t == 0 else vote_part[i] + weight * tau
                        numbers[t] += number
                    for t in range(count):
                        weight = weights[t]
                        for i in range(span):
                            tau = kept[t, i]
                            agrees = tau > zero if vote[i] >= zero else tau < zero
                            share = weight if agrees else zero
                            if t == 0:  # from +0, as torch sums: an all-zero total is +0
                                total[i] = zero + tau * share
                                mass[i] = zero + share
                            else:
                                total[i] = total[i] + tau * share
                                mass[i] = mass[i] + share
                    target = out[start + s0:start + s1]
                    bs = base[s0:s1]
                    for i in range(span):
                        delta = total[i]
                        if normalize:
                            delta = delta / (mass[i] if mass[i] != zero else np.float32(1.0))
                        delta = delta * scale
                        target[i] = delta + bs[i]
                    if diagnostics:  # the raw τ of the sub-block, still in L1, for the gram's runs
                        for t in range(count):
                            row, tau = rows[t + 1][start + s0:start + s1], raw[t, s0 % RUN : s0 % RUN + span]
                            for i in range(span):
                                tau[i] = row[i] - bs[i]
                        if s1 % RUN == 0 or s1 == width:
                            _add_gram(gram[b], raw, s1 - s0 // RUN * RUN)
                for t in range(count):
                    kept_count[b, t] = numbers[t]
                if diagnostics:
                    base_sq[b] = _dot(base, base)
                    _mirror(gram[b])

        return _second_pass

    _second_pass = _merging_kernel(True)
    _uncounted_second_pass = _merging_kernel(False)


def address_order(arrays: tuple[np.ndarray, ...]) -> np.ndarray:
    """The fine-tunes (rows 1..T) by ascending address: the order `_first_pass` visits them in.

    On the AMD EPYC VM of the benchmarks, visiting them at descending addresses (how checkpoints
    mapped one after the other lie) made that pass twice as slow: 37.6 against 18.6 ms for a
    24.6 M-entry embedding, the same rows in one buffer either way round. The second pass and
    the linear pass do not care (12.6 / 12.7 and 14.6 / 15.0 ms).
    """
    return np.argsort(np.array([array.ctypes.data for array in arrays[1:]], dtype=np.uint64), kind="stable")


def sample(rows: list[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """[T, m] |τ| of every fine-tune at `positions` (the brackets' sample), gathered on every core."""
    out = np.empty((len(rows) - 1, positions.numel()), np.float32)
    with LAUNCH:
        launch_threads()
        _sample(as_arrays(rows), positions.numpy(), out)
    return torch.from_numpy(out)


def second_pass(rows: list[torch.Tensor], floors: torch.Tensor, cuts: torch.Tensor, weights: torch.Tensor,
                scale: float, normalize: bool, out: torch.Tensor, diagnostics: bool = False, counting: bool = True
                ) -> tuple[list[int], torch.Tensor | None, float]:
    """out = θ₀ + scale · TIES(trimmed τ): keep |τ| > floor except the ties from `cut` on, elect,
    combine (see `_second_pass`). Returns how many entries each fine-tune kept (zeros unless
    `counting`) and, with `diagnostics`, the gram (float64) and ‖θ₀‖² that the first pass makes otherwise."""
    count, n = len(rows) - 1, rows[0].numel()
    blocks = (n + BLOCK - 1) // BLOCK
    kept = np.zeros((blocks, count), np.int64)
    gram = np.zeros((blocks, count, count))
    base_sq = np.zeros(blocks)
    kernel = _second_pass if counting else _uncounted_second_pass
    with LAUNCH:
        launch_threads(blocks)
        kernel(as_arrays(rows), n, floors.reshape(-1).numpy(), cuts.numpy(), weights.to(torch.float32).reshape(-1).numpy(),
               np.float32(scale), normalize, out.numpy(), kept, diagnostics, gram, base_sq)
    return kept.sum(axis=0).tolist(), torch.from_numpy(gram.sum(axis=0)) if diagnostics else None, float(base_sq.sum())
