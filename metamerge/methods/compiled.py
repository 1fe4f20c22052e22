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

`AVAILABLE` is False when numba cannot be imported: TIES then runs on the torch passes, which
give the same floats. Like torch's own OpenMP threads, numba's do not survive fork(): a
process that computed must not fork a child that computes (Dask's worker processes are
spawned, and nothing here forks).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

try:  # pragma: no branch - the import decides which TIES implementation runs, both are tested
    import numba
    from numba import njit, prange

    from metamerge.methods.simd import WIDTH, compress_band
    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised by tests that hide numba
    AVAILABLE = False

BLOCK = 1 << 16  # entries per block: a block's rows stay in cache between the steps of a pass
BAND_CAPACITY = BLOCK // 8  # in-bracket |τ| a block keeps from its first pass (the bracket holds ~2.5 %)

# numba's fallback threading layer ("workqueue", where libgomp is missing) aborts the process when
# two threads launch parallel loops at once; merges in one process (Prefect's thread pool) take turns.
LAUNCH = threading.Lock()


def jit(**options):
    """njit, cached on disk where numba finds a writable place (else compiled once per process)."""
    def wrap(function):
        try:
            return njit(cache=True, **options)(function)
        except RuntimeError:  # no writable cache location, e.g. a read-only install
            return njit(**options)(function)
    return wrap


if AVAILABLE:
    @jit(boundscheck=False, fastmath={"reassoc"})
    def _dot(x, y):  # pragma: no cover - compiled
        """Σ x·y in float32 runs of 1024, vectorized (reassociated), summed in float64: diagnostics only."""
        total = 0.0
        for run in range(0, x.shape[0], 1024):
            part = np.float32(0.0)
            xs, ys = x[run : run + 1024], y[run : run + 1024]  # (a loop over slices vectorizes, range(run, …) not)
            for i in range(xs.shape[0]):
                part += xs[i] * ys[i]
            total += part
        return total

    @jit(parallel=True, boundscheck=False)
    def _first_pass(rows, n, lo, hi, above, inside, gram, base_sq, scratch):  # pragma: no cover - compiled
        """Per block and fine-tune, while the block is in cache: |τ| > hi counted, lo ≤ |τ| ≤ hi
        counted and copied in position order into the block's `scratch` row (as far as it holds);
        the block's gram and Σ θ₀². The rows are only read: τ = θ_t − θ₀ goes to a block of its own."""
        count = len(rows) - 1
        capacity = scratch.shape[2] - 1
        blocks = (n + BLOCK - 1) // BLOCK
        for b in prange(blocks):
            start = b * BLOCK
            end = min(n, start + BLOCK)
            width = end - start
            base = rows[0][start:end]
            base_sq[b] = _dot(base, base)
            taus = np.empty((count, width), np.float32)
            for t in range(count):
                row, tau = rows[t + 1][start:end], taus[t]
                low, high = lo[t], hi[t]
                up = 0
                band = 0
                for i in range(width):  # no branch: vectorized
                    tau[i] = row[i] - base[i]
                    magnitude = abs(tau[i])
                    up += magnitude > high
                    band += (magnitude >= low) & (magnitude <= high)
                above[b, t] = up
                inside[b, t] = band
                if band <= capacity:
                    kept = scratch[b, t]
                    at = 0
                    whole = width // WIDTH * WIDTH
                    for i in range(0, whole, WIDTH):  # 16 at a time (methods/simd.py)
                        at += compress_band(tau, i, low, high, kept, at)
                    for i in range(whole, width):  # no branch: every value is written, the next overwrites
                        magnitude = abs(tau[i])  # it unless it was inside (one spare slot at the end)
                        kept[at] = magnitude
                        at += (magnitude >= low) & (magnitude <= high)
            for x in range(count):
                for y in range(x, count):
                    gram[b, x, y] = gram[b, y, x] = _dot(taus[x], taus[y])

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

    @jit(parallel=True, boundscheck=False)
    def _second_pass(rows, n, floors, cuts, weights, scale, normalize, out, kept_count, diagnostics, gram,
                     base_sq):  # pragma: no cover - compiled
        """Trim (keep |τ| > floor, except ties with the threshold from position `cut` on), elect
        (sign of Σ w τ, 0 elects +), disjoint sum or mean, ·scale, + θ₀. Counts what each
        fine-tune keeps per block; with `diagnostics` (no first pass ran), also the gram and Σ θ₀².

        Every sum runs over the fine-tunes in order, with no fused multiply-add, as in
        `kernels.elect_and_combine`: the same floats, the same signed zeros.
        """
        count = len(rows) - 1
        blocks = (n + BLOCK - 1) // BLOCK
        zero = np.float32(0.0)
        for b in prange(blocks):
            start = b * BLOCK
            end = min(n, start + BLOCK)
            width = end - start
            base = rows[0][start:end]
            vote = np.empty(width, np.float32)
            total = np.empty(width, np.float32)
            mass = np.empty(width, np.float32)
            kept = np.empty((count, width), np.float32)  # trimmed τ of the block: made once, read twice
            for t in range(count):
                row = rows[t + 1][start:end]
                floor, cut, weight = floors[t], cuts[t] - start, weights[t]
                threshold = np.nextafter(floor, np.float32(np.inf))
                number = 0
                for i in range(width):
                    tau = row[i] - base[i]
                    magnitude = abs(tau)
                    keep = (magnitude > floor) & ((magnitude != threshold) | (i < cut))
                    number += keep
                    tau = tau if keep else zero
                    kept[t, i] = tau
                    vote[i] = weight * tau if t == 0 else vote[i] + weight * tau
                kept_count[b, t] = number
            for t in range(count):
                weight = weights[t]
                for i in range(width):
                    tau = kept[t, i]
                    agrees = tau > zero if vote[i] >= zero else tau < zero
                    share = weight if agrees else zero
                    if t == 0:  # from +0, as torch sums: an all-zero total is +0
                        total[i] = zero + tau * share
                        mass[i] = zero + share
                    else:
                        total[i] = total[i] + tau * share
                        mass[i] = mass[i] + share
            target = out[start:end]
            for i in range(width):
                delta = total[i]
                if normalize:
                    delta = delta / (mass[i] if mass[i] != zero else np.float32(1.0))
                delta = delta * scale
                target[i] = delta + base[i]
            if diagnostics:  # the raw τ, in the trimmed τ's scratch (no longer needed)
                base_sq[b] = _dot(base, base)
                for t in range(count):
                    row, tau = rows[t + 1][start:end], kept[t]
                    for i in range(width):
                        tau[i] = row[i] - base[i]
                for x in range(count):
                    for y in range(x, count):
                        gram[b, x, y] = gram[b, y, x] = _dot(kept[x], kept[y])


def launch_threads() -> None:
    """Before a kernel: as many threads as torch uses (the merge's choice)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


class Bands:
    """Each fine-tune's in-bracket |τ| in position order, and where each block's part ends."""

    def __init__(self, values: torch.Tensor, ends: np.ndarray):
        self.values, self.ends = values, ends

    def all(self) -> torch.Tensor:
        return self.values

    def block(self, index: int) -> torch.Tensor:
        return self.values[(int(self.ends[index - 1]) if index else 0) : int(self.ends[index])]


def first_pass(rows: list[torch.Tensor], lo: torch.Tensor, hi: torch.Tensor
               ) -> tuple[torch.Tensor, float, list[int], list[Bands]]:
    """The gram (float64), ‖θ₀‖², and per fine-tune: |τ| above hi, and the band lo ≤ |τ| ≤ hi."""
    count, n = len(rows) - 1, rows[0].numel()
    blocks = (n + BLOCK - 1) // BLOCK
    arrays = as_arrays(rows)
    low, high = lo.reshape(-1).numpy(), hi.reshape(-1).numpy()
    above = np.zeros((blocks, count), np.int64)
    inside = np.zeros((blocks, count), np.int64)
    gram = np.zeros((blocks, count, count))
    base_sq = np.zeros(blocks)
    scratch = np.empty((blocks, count, BAND_CAPACITY + 1), np.float32)
    with LAUNCH:
        launch_threads()
        _first_pass(arrays, n, low, high, above, inside, gram, base_sq, scratch)
        ends = np.cumsum(inside, axis=0)  # per fine-tune, where each block's band ends
        overflowed = [t for t in range(count) if bool((inside[:, t] > BAND_CAPACITY).any())]
        if overflowed:  # a block had more in its bracket than its scratch holds: gather those again
            starts = np.concatenate([[0], np.cumsum(ends[-1])[:-1]])
            band = np.empty(int(ends[-1].sum()), np.float32)
            _gather_band(arrays, n, low, high, (ends - inside) + starts, band)
    values = []
    for t in range(count):
        if t in overflowed:
            values.append(torch.from_numpy(band[starts[t] : starts[t] + ends[-1, t]]))
        else:
            values.append(torch.from_numpy(np.concatenate([scratch[b, t, : inside[b, t]] for b in range(blocks)])))
    bands = [Bands(values[t], ends[:, t]) for t in range(count)]
    return torch.from_numpy(gram.sum(axis=0)), float(base_sq.sum()), above.sum(axis=0).tolist(), bands


def sample(rows: list[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """[T, m] |τ| of every fine-tune at `positions` (the brackets' sample)."""
    out = np.empty((len(rows) - 1, positions.numel()), np.float32)
    with LAUNCH:
        launch_threads()
        _sample(as_arrays(rows), positions.numpy(), out)
    return torch.from_numpy(out)


def second_pass(rows: list[torch.Tensor], floors: torch.Tensor, cuts: torch.Tensor, weights: torch.Tensor,
                scale: float, normalize: bool, out: torch.Tensor, diagnostics: bool = False
                ) -> tuple[list[int], torch.Tensor | None, float]:
    """out = θ₀ + scale · TIES(trimmed τ): keep |τ| > floor except the ties from `cut` on, elect,
    combine (see `_second_pass`). Returns how many entries each fine-tune kept and, with
    `diagnostics`, the gram (float64) and ‖θ₀‖² that the first pass makes otherwise."""
    count, n = len(rows) - 1, rows[0].numel()
    blocks = (n + BLOCK - 1) // BLOCK
    kept = np.zeros((blocks, count), np.int64)
    gram = np.zeros((blocks, count, count))
    base_sq = np.zeros(blocks)
    with LAUNCH:
        launch_threads()
        _second_pass(as_arrays(rows), n, floors.reshape(-1).numpy(), cuts.numpy(),
                     weights.to(torch.float32).reshape(-1).numpy(), np.float32(scale), normalize, out.numpy(),
                     kept, diagnostics, gram, base_sq)
    return kept.sum(axis=0).tolist(), torch.from_numpy(gram.sum(axis=0)) if diagnostics else None, float(base_sq.sum())


def as_arrays(rows: list[torch.Tensor]) -> tuple[np.ndarray, ...]:
    """The rows as a tuple of contiguous float32 arrays (numba compiles one kernel per row count)."""
    if any(row.dtype != torch.float32 or not row.is_contiguous() or row.device.type != "cpu" for row in rows):
        raise ValueError("the compiled kernels need contiguous float32 CPU rows")
    return tuple(row.numpy() for row in rows)
