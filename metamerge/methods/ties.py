"""TIES on one whole tensor in two passes of cache-sized blocks, on the CPU.

Trim, elect and combine each used to sweep the whole [T, n] task-vector matrix (about a dozen
passes through memory for a 100 M-entry embedding). Here the first pass makes τ, the gram,
‖θ₀‖² and, per fine-tune, what it needs for its exact top-k threshold (a count above a
sampled bracket and the values inside it); the second pass trims, elects and combines each
block while it is in cache. The merged floats are those of the unfused path (tested bit for
bit): the same thresholds, the same tie rule, the same election.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from metamerge.methods.kernels import combine, elect_and_combine
from metamerge.methods.plan import MergePlan
from metamerge.methods.selection import SELECT_MIN, bracket, sample_positions, threshold_by_full_scan, trim_

BLOCK = 1 << 16


SMALLEST_FLOOR = 2.0**-100  # below it, 1 ulp is subnormal: a flush-to-zero CPU could lose |τ| − floor > 0


def fused(plan: MergePlan, stacked: torch.Tensor) -> bool:
    """Whether `ties_piece` applies: TIES' trim and election on a large CPU tensor, no spectral step."""
    return (plan.sparsify == "magnitude" and plan.consensus == "ties" and plan.spectral == "none"
            and plan.density < 1.0 and stacked.device.type == "cpu" and stacked.shape[1] > SELECT_MIN)


def ties_piece(stacked: torch.Tensor, weights: torch.Tensor, plan: MergePlan, out: torch.Tensor | None,
               check: Callable[[torch.Tensor, float], None]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """θ₀ + TIES(τ) of `stacked` [T+1, n] (row 0 the base) into `out`; also the gram and ‖θ₀‖².

    Works in place: rows 1..T become the trimmed task vectors. `check(gram, base_sq)` runs
    after the first pass, before anything is trimmed (the NaN/Inf check of the inputs).
    """
    count, n = stacked.shape[0] - 1, stacked.shape[1]
    k = max(1, int(plan.density * n))
    gram, base_sq, above, bands = _first_pass(stacked, k)
    check(gram, base_sq)
    floors = torch.empty(count, 1)
    for t in range(count):
        threshold = _threshold(stacked[1 + t], k, int(above[t]), bands[t])
        # |τ| ≥ threshold ⟺ |τ| − (the float just below it) > 0: a keep-mask from arithmetic alone
        floors[t] = torch.nextafter(threshold, torch.tensor(-math.inf))
    if float(floors.min()) < SMALLEST_FLOOR:  # the unfused trim finds the same thresholds, with bool masks
        for t in range(count):
            trim_(stacked[1 + t], plan.density)
        return combine(stacked[1:], weights, plan, out=out).add_(stacked[0]), gram, base_sq
    out = torch.empty(n) if out is None else out
    magnitudes = torch.empty(count, BLOCK)
    for start in range(0, n, BLOCK):
        block = stacked[:, start : start + BLOCK]
        taus, width = block[1:], block.shape[1]
        keep = torch.abs(taus, out=magnitudes[:, :width]).sub_(floors).sign_().clamp_min_(0.0)
        taus.mul_(keep)  # trimmed entries become ±0, which no later step tells from +0
        target = out[start : start + width]
        elect_and_combine(taus, weights, plan, target)
        if plan.scale != 1.0:
            target.mul_(plan.scale)
        target.add_(block[0])
    return out[:n], gram, base_sq


def _first_pass(stacked: torch.Tensor, k: int) -> tuple[torch.Tensor, float, torch.Tensor, list[_Band]]:
    """τ in place, the gram (float64), ‖θ₀‖², and per fine-tune: entries above its bracket, and per
    block the |τ| inside it.

    The bracket test is on c = fl(|τ| − mid): rounding is monotone, so "c > half" (above) and
    "|c| ≤ half" (inside) split the values into three ordered intervals, which is all an exact
    selection needs; it saves two of the four comparisons into bool tensors per entry.
    """
    count, n = stacked.shape[0] - 1, stacked.shape[1]
    sampled = stacked[:, sample_positions(n, stacked.device)]  # one gather for every row
    taus_sample = sampled[1:].sub_(sampled[0]).abs_()
    brackets = [bracket(taus_sample[t], k, n) for t in range(count)]
    lo = torch.stack([b[0] for b in brackets]).reshape(count, 1)
    hi = torch.stack([b[1] for b in brackets]).reshape(count, 1)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    gram = torch.zeros((count, count), dtype=torch.float64)
    base_sq, above = 0.0, torch.zeros(count, dtype=torch.float64)
    # counting by sign(c − half) is exact while no difference can be subnormal (flush-to-zero CPUs)
    arithmetic_count = float(hi.min()) >= SMALLEST_FLOOR * 2.0**10
    bands = [_Band() for _ in range(count)]
    magnitudes, centred, scratch = (torch.empty(count, BLOCK) for _ in range(3))
    for start in range(0, n, BLOCK):
        block = stacked[:, start : start + BLOCK]
        taus, width = block[1:], block.shape[1]
        base_sq += float(torch.dot(block[0], block[0]))
        taus.sub_(block[0])
        gram += (taus @ taus.T).double()
        m = torch.abs(taus, out=magnitudes[:, :width])
        c = torch.sub(m, mid, out=centred[:, :width])
        if arithmetic_count:  # 0/1 floats: a block's count is exact in float32, the total in float64
            above += torch.sub(c, half, out=scratch[:, :width]).sign_().clamp_min_(0.0).sum(dim=1)
        else:
            above += torch.count_nonzero(c > half, dim=1)
        inside = c.abs_() <= half
        for t in range(count):
            bands[t].append(m[t][inside[t]])
    return gram, base_sq, above, bands


class _Band:
    """One fine-tune's in-bracket |τ|, block after block, in one growing buffer.

    Not a list of per-block tensors: thousands of small live tensors pin the allocator's
    heap between each block's temporaries, which had cost 470 MB of RSS on one 24.6 M-entry tensor.
    """

    def __init__(self) -> None:
        self.values = torch.empty(1 << 16)
        self.ends: list[int] = []

    def append(self, values: torch.Tensor) -> None:
        start = self.ends[-1] if self.ends else 0
        if start + values.numel() > self.values.numel():
            grown = torch.empty(max(2 * self.values.numel(), start + values.numel()))
            grown[:start] = self.values[:start]
            self.values = grown
        self.values[start : start + values.numel()] = values
        self.ends.append(start + values.numel())

    def all(self) -> torch.Tensor:
        return self.values[: self.ends[-1] if self.ends else 0]

    def block(self, index: int) -> torch.Tensor:
        return self.values[(self.ends[index - 1] if index else 0) : self.ends[index]]


def _threshold(tau: torch.Tensor, k: int, above: int, bands: _Band) -> torch.Tensor:
    """The k-th largest |τ| (exact); zeroes the highest-index entries tied with it beyond the k kept.

    The same threshold and tie rule as `selection.trim_`. Ties are common in a big float32
    tensor (24 M values share a few million floats), so they are looked for only in the blocks
    whose band holds the threshold, last block first.
    """
    band = bands.all()
    need = k - above
    if not 0 < need <= band.numel():
        return _threshold_by_full_scan(tau, k)
    threshold = torch.kthvalue(band, band.numel() - need + 1).values
    excess = above + int(torch.count_nonzero(band >= threshold)) - k
    for index in range(len(bands.ends) - 1, -1, -1):
        if excess <= 0:
            break
        if bool((bands.block(index) == threshold).any()):
            block = tau[index * BLOCK : (index + 1) * BLOCK]
            tied = torch.nonzero(block.abs() == threshold).flatten()
            block[tied[max(0, tied.numel() - excess) :]] = 0.0
            excess -= tied.numel()
    return threshold


def _threshold_by_full_scan(tau: torch.Tensor, k: int) -> torch.Tensor:
    """The bracket missed: a full kthvalue, and the tie rule over the whole row."""
    threshold, kept = threshold_by_full_scan(tau, k)
    if kept > k:
        tied = torch.nonzero(tau.abs() == threshold).flatten()
        tau[tied[tied.numel() - (kept - k) :]] = 0.0
    return threshold
