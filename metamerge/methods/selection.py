"""Exact top-k selection by magnitude: TIES' trim and Breadcrumbs' outlier drop.

Kept apart from the other kernels because it is the one place where speed and exactness pull
apart: a full sort or kthvalue of a 100 M-entry tensor is slow, so the k-th largest is found
from a sampled bracket, and every shortcut here must give the very entries a full sort would
(ties go to the lower index), or merged bytes would change.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

SELECT_MIN = 1 << 16  # from this many entries on, a sampled bracket beats a full kthvalue
# Sampled |τ| per bracket. Each sampled position in a big tensor is a TLB and cache miss (about
# 0.1 µs), so the sample's size is the bracket's cost; a smaller one only widens the band
# (±2.5 % of the ranks at density 0.2), which the compaction copies at no extra cost per entry.
SAMPLE = 1 << 12


def bracket(sample: torch.Tensor, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values around the k-th largest of n, from a sample: ±4 standard errors of its rank (at least ±1 %).

    Any bracket gives the exact answer (a missed one falls back), so this only decides the speed.
    """
    m = sample.numel()
    quantile = 1.0 - k / n
    width = max(0.01, 4.0 * math.sqrt(quantile * (1.0 - quantile) / m))
    lo_rank = min(m, max(1, int((quantile - width) * m)))
    hi_rank = min(m, max(1, int((quantile + width) * m) + 1))
    if sample.device.type != "cpu" or sample.dtype == torch.bfloat16:
        return kth_smallest(sample, lo_rank), kth_smallest(sample, hi_rank)
    both = np.partition(sample.detach().reshape(-1).numpy(), [lo_rank - 1, hi_rank - 1])  # one partition, two ranks
    return torch.tensor(both[lo_rank - 1], dtype=sample.dtype), torch.tensor(both[hi_rank - 1], dtype=sample.dtype)


def kth_smallest(values: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-th smallest (1-based) of a flat tensor, as a 0-d tensor: `torch.kthvalue(values, rank).values`.

    On the CPU numpy's introselect finds the same value about ten times faster than torch's
    kthvalue (1 against 10 ns per entry); the value, not its position, is the answer, so
    both give the same float.
    """
    if values.device.type != "cpu" or values.dtype == torch.bfloat16:  # numpy has no bfloat16
        return torch.kthvalue(values, rank).values
    array = values.detach().reshape(-1).numpy()
    return torch.tensor(np.partition(array, rank - 1)[rank - 1], dtype=values.dtype)


def sample_positions(n: int, device: torch.device) -> torch.Tensor:
    """The fixed-seed positions a bracket is sampled at: the same for every tensor of n entries.

    In increasing order (a sample is a set; an ordered gather reads memory forwards), and
    computed once per size: every layer's projections share a size.
    """
    return _positions(n).to(device)


@functools.lru_cache(maxsize=64)
def _positions(n: int) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(0)
    return torch.sort(torch.randint(n, (SAMPLE,), generator=gen)).values


def _sample(values: torch.Tensor) -> torch.Tensor:
    return values[sample_positions(values.numel(), values.device)]


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-th largest of a flat tensor, much faster than a full kthvalue on big tensors.

    A fixed-seed sample brackets the answer, one pass counts what lies above the bracket and
    keeps what lies inside it, and kthvalue runs on that small band only. Falls back to a
    full kthvalue whenever the bracket misses, so the result is always exact.
    """
    n = values.numel()
    if n <= SELECT_MIN:
        return kth_smallest(values, n - k + 1)
    lo, hi = bracket(_sample(values), k, n)
    above = int(torch.count_nonzero(values > hi))
    if above < k:
        band = values[(values >= lo) & (values <= hi)]
        need = k - above
        if band.numel() >= need:
            return kth_smallest(band, band.numel() - need + 1)
    return kth_smallest(values, n - k + 1)


def magnitude_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keeps the int(density·n) largest |τ| entries (at least one); ties go to the lower index.

    Deterministic tie-breaking matters with bf16 inputs, where many |τ| are exactly equal:
    the same inputs must give the same merge on every device and every run.
    """
    return ~_magnitude_drop(tau.reshape(-1).abs(), density).reshape(tau.shape)


def _magnitude_drop(magnitudes: torch.Tensor, density: float) -> torch.Tensor:
    """Flat bool mask of the entries TIES' trim removes."""
    return _drop_all_but_top(magnitudes, max(1, int(density * magnitudes.numel())))


def _drop_all_but_top(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Flat bool mask of every entry outside the k largest; ties at the threshold keep the lower index."""
    n = magnitudes.numel()
    if k >= n:
        return torch.zeros(n, dtype=torch.bool, device=magnitudes.device)
    if k <= 0:
        return torch.ones(n, dtype=torch.bool, device=magnitudes.device)
    threshold = kth_largest(magnitudes, k)
    drop = magnitudes < threshold
    kept = n - int(torch.count_nonzero(drop))
    if kept > k:  # exact ties at the threshold: keep the lowest-index ones only
        tied = torch.nonzero(magnitudes == threshold).flatten()
        drop[tied[tied.numel() - (kept - k) :]] = True
    return drop


TRIM_BLOCK = 1 << 18  # elements (1 MB of float32): |τ| and masks of one block stay in cache


def trim_(flat: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim in place on a flat τ: zeroes exactly the entries `_magnitude_drop` drops.

    On the CPU a large tensor is trimmed in cache-sized blocks and two reads of τ: one finds the
    threshold (the k-th largest |τ|, bracketed by a sample), one zeroes what lies below it. The
    plain version makes whole-tensor |τ|, masks and copies, each a fresh allocation (page faults)
    and a memory pass.
    """
    n = flat.numel()
    k = max(1, int(density * n))
    if k >= n:
        return flat
    if n <= SELECT_MIN or flat.device.type != "cpu":
        return flat.masked_fill_(_magnitude_drop(flat.abs(), density), 0.0)
    threshold, kept = _kth_largest_abs(flat, k)
    ties: list[torch.Tensor] = []
    for start in range(0, n, TRIM_BLOCK):
        block = flat[start : start + TRIM_BLOCK]
        magnitudes = block.abs()
        if kept > k:
            ties.append(torch.nonzero(magnitudes == threshold).flatten() + start)
        block.masked_fill_(magnitudes < threshold, 0.0)
    if kept > k:  # exact ties at the threshold: keep the lowest-index ones only, as `_drop_all_but_top`
        tied = torch.cat(ties)
        flat[tied[tied.numel() - (kept - k) :]] = 0.0
    return flat


def _kth_largest_abs(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """`kth_largest(flat.abs(), k)` (the same exact value) with |τ| made per block, and how many |τ| are ≥ it."""
    n = flat.numel()
    lo, hi = bracket(_sample(flat).abs(), k, n)
    above, bands = 0, []
    for start in range(0, n, TRIM_BLOCK):
        magnitudes = flat[start : start + TRIM_BLOCK].abs()
        above += int(torch.count_nonzero(magnitudes > hi))
        bands.append(magnitudes[(magnitudes >= lo) & (magnitudes <= hi)])
    band = torch.cat(bands)
    need = k - above
    if 0 < need <= band.numel():
        threshold = kth_smallest(band, band.numel() - need + 1)
        return threshold, above + int(torch.count_nonzero(band >= threshold))
    return threshold_by_full_scan(flat, k)


def threshold_by_full_scan(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """The k-th largest |τ| by a full kthvalue (the bracket missed), and how many |τ| are ≥ it."""
    magnitudes = flat.abs()
    threshold = kth_smallest(magnitudes, flat.numel() - k + 1)
    return threshold, int(torch.count_nonzero(magnitudes >= threshold))


def outlier_drop(magnitudes: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: keep int(density·n) entries, the largest ones after the int(γ·n) largest (outliers).

    mergekit's `magnitude_outliers` counts the same way (a γ above 1 − density removes fewer
    outliers so that the density is met) but keeps nothing when γ·n < 1; here that keeps the top.
    """
    n = magnitudes.numel()
    keep = max(1, int(density * n))
    outliers = min(int(gamma * n), n - keep)
    return _drop_all_but_top(magnitudes, keep + outliers) | ~_drop_all_but_top(magnitudes, outliers)
