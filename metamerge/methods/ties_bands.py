"""TIES' first pass and the exact trims from its bands, with no Python per block or per tie.

The first pass (`compiled._first_pass`) leaves, per block and fine-tune, the |τ| that fall
inside the sampled bracket in a scratch row. A trim is the k-th largest |τ| and, when more
entries share it than k allows, the position from which those ties are dropped. Done with torch
ops per fine-tune and per block (concatenate 24 blocks' parts, count, look for ties block by
block), that cost 0.35 + 0.32 ms per 1.57 M-entry projection of the benchmark family, where
the first pass's kernel takes 0.96 ms and task arithmetic's whole pass 1.0 ms: most of a third
pass in Python, 84 times per merge, on the merging thread while the second core waits.

Here: the scratch is one buffer kept from tensor to tensor (a fresh one faulted in its pages on
every tensor: +23 ms per 24.6 M-entry embedding, median); a compiled copy packs the blocks'
parts; numpy's partition (a SIMD quickselect, measured 17× numba's `np.partition`) finds each
threshold; and one compiled call counts what lies at or above each threshold and finds every
fine-tune's cut. The trims are the ones `ties._threshold` finds (tested). Now 0.07 + 0.26 ms.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from metamerge.methods import compiled
from metamerge.methods.compiled import BLOCK
from metamerge.methods.numba_runtime import AVAILABLE, LAUNCH, as_arrays, jit, launch_threads
from metamerge.methods.simd import WIDTH
from metamerge.methods.ties_torch import Band

if AVAILABLE:
    @jit(boundscheck=False)
    def _collect(values, starts, lengths, offsets, out):  # pragma: no cover - compiled
        """Each fine-tune's band, its blocks' parts in order, copied to its offset in `out`."""
        for t in range(starts.shape[1]):
            at = offsets[t]
            for b in range(starts.shape[0]):
                out[at : at + lengths[b, t]] = values[starts[b, t] : starts[b, t] + lengths[b, t]]
                at += lengths[b, t]

    @jit(boundscheck=False)
    def _cuts(rows, n, k, above, thresholds, active, values, starts, lengths, cuts):  # pragma: no cover - compiled
        """cuts[t]: the position from which fine-tune t's ties with its threshold are dropped (n when
        none are), for each active t; -1 where the rows do not hold the ties its band does.

        Of the entries with |τ| ≥ threshold, the k with the lowest positions among the ties are kept
        (`selection.trim_`'s rule): the excess are the last ties, found from the last block back.
        A block's ties are counted in its band, which holds every |τ| equal to the threshold (the
        threshold is in the bracket), so only the block where the excess runs out is read again."""
        base = rows[0]
        blocks = starts.shape[0]
        for t in range(len(rows) - 1):
            cuts[t] = n
            if not active[t]:
                continue
            threshold = thresholds[t]
            at_least = 0
            for b in range(blocks):
                part = values[starts[b, t] : starts[b, t] + lengths[b, t]]
                for i in range(part.shape[0]):
                    at_least += part[i] >= threshold
            excess = above[t] + at_least - k
            row = rows[t + 1]
            b = blocks - 1
            while excess > 0 and b >= 0:
                part = values[starts[b, t] : starts[b, t] + lengths[b, t]]
                equal = 0
                for i in range(part.shape[0]):
                    equal += part[i] == threshold
                if equal >= excess:  # the cut is in this block: its last `excess` ties are dropped
                    position, start = min(n, (b + 1) * BLOCK), b * BLOCK
                    while excess > 0 and position > start:
                        position -= 1
                        excess -= abs(row[position] - base[position]) == threshold
                    cuts[t] = position if excess == 0 else -1
                    excess = 0
                else:
                    excess -= equal
                b -= 1
            if excess > 0:
                cuts[t] = -1


class BandSet:
    """Every fine-tune's band of one tensor: block b's part of fine-tune t's is
    values[starts[b, t] : starts[b, t] + lengths[b, t]], in position order.

    `values` is the first pass's scratch (read before the next tensor's first pass on this thread)
    or, where a block's band outgrew it, the band gathered again."""

    def __init__(self, values: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
        self.values, self.starts, self.lengths = values, starts, lengths

    def __len__(self) -> int:
        return self.starts.shape[1]

    def sizes(self) -> np.ndarray:
        return self.lengths.sum(axis=0)

    def collect(self) -> tuple[np.ndarray, np.ndarray]:
        """Every fine-tune's band packed in one new array, and where each one's starts."""
        sizes = self.sizes()
        offsets = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
        out = np.empty(int(sizes.sum()), np.float32)
        _collect(self.values, self.starts, self.lengths, offsets, out)
        return out, offsets

    def __getitem__(self, t: int) -> Band:
        """One fine-tune's band as `ties._threshold` takes it (the torch passes' shape)."""
        packed, offsets = self.collect()
        size = int(self.sizes()[t])
        return Band.of(torch.from_numpy(packed[offsets[t] : offsets[t] + size].copy()),
                       np.cumsum(self.lengths[:, t]).tolist())


class Scratch(threading.local):
    """The first pass's scratch rows, kept from tensor to tensor of a merge (`release` ends that).

    One per thread: a tensor's bands are read from it after its first pass, so two merges in one
    process's threads must not share it."""

    def __init__(self) -> None:
        self.buffer = np.empty(0, np.float32)

    def take(self, blocks: int, count: int) -> np.ndarray:
        width = compiled.BAND_CAPACITY + WIDTH  # room for the last 16-wide store of a band (simd.scan_band)
        if self.buffer.size < blocks * count * width:
            self.buffer = np.empty(0, np.float32)  # the smaller one goes before the bigger one comes
            self.buffer = np.empty(blocks * count * width, np.float32)
        return self.buffer[: blocks * count * width].reshape(blocks, count, width)

    def release(self) -> None:
        self.buffer = np.empty(0, np.float32)


SCRATCH = Scratch()


def first_pass(rows: list[torch.Tensor], lo: torch.Tensor, hi: torch.Tensor
               ) -> tuple[torch.Tensor, float, list[int], BandSet]:
    """The gram (float64), ‖θ₀‖², and per fine-tune: |τ| above hi, and the band lo ≤ |τ| ≤ hi."""
    count, n = len(rows) - 1, rows[0].numel()
    blocks = (n + BLOCK - 1) // BLOCK
    arrays = as_arrays(rows)
    low, high = lo.reshape(-1).numpy(), hi.reshape(-1).numpy()
    above = np.zeros((blocks, count), np.int64)
    inside = np.zeros((blocks, count), np.int64)
    gram = np.zeros((blocks, count, count))
    base_sq = np.zeros(blocks)
    scratch = SCRATCH.take(blocks, count)
    with LAUNCH:
        launch_threads(blocks)
        compiled._first_pass(arrays, n, low, high, above, inside, gram, base_sq, scratch, compiled.address_order(arrays))
        if (inside > compiled.BAND_CAPACITY).any():  # a block's band outgrew its scratch row: gather again
            ends = np.cumsum(inside, axis=0)
            starts = ends - inside + np.concatenate(([0], np.cumsum(ends[-1])[:-1]))
            values = np.empty(int(ends[-1].sum()), np.float32)
            compiled._gather_band(arrays, n, low, high, starts, values)
            bands = BandSet(values, starts, inside)
        else:
            width = scratch.shape[2]
            starts = (np.arange(blocks * count, dtype=np.int64) * width).reshape(blocks, count)
            bands = BandSet(scratch.reshape(-1), starts, inside)
    return torch.from_numpy(gram.sum(axis=0)), float(base_sq.sum()), above.sum(axis=0).tolist(), bands


def trims(rows: list[torch.Tensor], k: int, above: list[int], bands: BandSet) -> list[tuple[float, int] | None]:
    """Each fine-tune's exact trim (its k-th largest |τ|, and the position from which its ties with
    it are dropped); None where its bracket missed the k-th largest (`ties` scans the whole row)."""
    count, n = len(rows) - 1, rows[0].numel()
    thresholds = np.zeros(count, np.float32)
    active = np.zeros(count, np.bool_)
    packed, offsets = bands.collect()
    for t, size in enumerate(bands.sizes().tolist()):
        need = k - above[t]
        if 0 < need <= size:  # the k-th largest is the (size − need + 1)-th smallest of the band
            band = packed[offsets[t] : offsets[t] + size]
            band.partition(size - need)  # in place: this copy of the band is not read again
            thresholds[t] = band[size - need]
            active[t] = True
    cuts = np.zeros(count, np.int64)
    _cuts(as_arrays(rows), n, k, np.asarray(above, np.int64), thresholds, active, bands.values, bands.starts,
          bands.lengths, cuts)
    return [(float(thresholds[t]), int(cuts[t])) if active[t] and cuts[t] >= 0 else None for t in range(count)]


def exact_trims(magnitudes: np.ndarray, k: int) -> list[tuple[float, int]]:
    """Each row's trim of [T, n] |τ| by a full selection (`ties.small_piece`): the tie rule of `trims`."""
    n, found = magnitudes.shape[1], []
    for row in magnitudes:
        threshold = np.partition(row, n - k)[n - k]
        excess = int(np.count_nonzero(row >= threshold)) - k
        tied = np.flatnonzero(row == threshold) if excess > 0 else None
        found.append((float(threshold), int(tied[tied.size - excess]) if tied is not None else n))
    return found
