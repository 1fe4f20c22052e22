"""TIES' two passes as torch block operations: the fallback where numba is missing.

They are the reference the compiled passes (`methods/compiled.py`) are tested against, bit for
bit, and they work on a writable [T+1, n] tensor whose rows 1..T they make the task vectors.
"""

from __future__ import annotations

import torch

from metamerge.methods.kernels import elect_and_combine
from metamerge.methods.plan import MergePlan

BLOCK = 1 << 16  # the tie search finds a band's block by this size: compiled.BLOCK too (tested)
SMALLEST_FLOOR = 2.0**-100  # below it, 1 ulp is subnormal: a flush-to-zero CPU could lose |τ| − floor > 0


def second_pass(stacked: torch.Tensor, floors: torch.Tensor, weights: torch.Tensor, plan: MergePlan,
                 out: torch.Tensor) -> None:
    """Trim, elect and combine each block while it is in cache, then add θ₀."""
    count, n = stacked.shape[0] - 1, stacked.shape[1]
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


def first_pass(stacked: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
               ) -> tuple[torch.Tensor, float, torch.Tensor, list[Band]]:
    """τ in place, the gram (float64), ‖θ₀‖², and per fine-tune: entries above its bracket, and per
    block the |τ| inside it.

    The bracket test is on c = fl(|τ| − mid): rounding is monotone, so "c > half" (above) and
    "|c| ≤ half" (inside) split the values into three ordered intervals, which is all an exact
    selection needs; it saves two of the four comparisons into bool tensors per entry.
    """
    count, n = stacked.shape[0] - 1, stacked.shape[1]
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    gram = torch.zeros((count, count), dtype=torch.float64)
    base_sq, above = 0.0, torch.zeros(count, dtype=torch.float64)
    # counting by sign(c − half) is exact while no difference can be subnormal (flush-to-zero CPUs)
    arithmetic_count = float(hi.min()) >= SMALLEST_FLOOR * 2.0**10
    bands = [Band() for _ in range(count)]
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


class Band:
    """One fine-tune's in-bracket |τ|, block after block, in one growing buffer.

    Not a list of per-block tensors: thousands of small live tensors pin the allocator's
    heap between each block's temporaries, which had cost 470 MB of RSS on one 24.6 M-entry tensor.
    """

    def __init__(self) -> None:
        self.values = torch.empty(1 << 16)
        self.ends: list[int] = []

    @classmethod
    def of(cls, values: torch.Tensor, ends: list[int]) -> Band:
        """A band already packed (the compiled first pass's, for the Python fallback of `ties`)."""
        band = cls.__new__(cls)
        band.values, band.ends = values, ends
        return band

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
