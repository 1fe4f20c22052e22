"""‖τ‖² that every machine computes to the very same float, whatever its cores or vector width.

MetaGPT's λ_t = ‖τ_t‖² / Σ_k ‖τ_k‖² is the only place where a sum over a whole model decides
merged bytes. A BLAS dot (or torch's inner-dimension sum) splits its sum by thread count and
by SIMD width, so the same recipe gave λ differing in the last bits between a 2-core and a
16-core worker, or between an AVX2 and an AVX-512 machine, and with it a different merge.

Here each float32 entry is squared exactly in float64 (24-bit mantissas: the square needs
48 of float64's 53 bits), the squares are summed column-wise over a [rows, 256] view (every
column accumulates its rows in the same order: SIMD lanes are columns, so lane width changes
nothing, and torch splits such a sum between threads by columns, never within one, so the
thread count changes nothing either: tested with 1–4 threads under three vector widths), and
the 256 column sums meet in `math.fsum` (correctly rounded).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from metamerge.methods.kernels import sparsify_
from metamerge.methods.plan import MergePlan

BLOCK = 1 << 16  # entries per step: the float64 copy stays in cache
COLUMNS = 256


class _SquareSums:
    """Σ x² of float32 blocks of T rows into [T, 256] float64 column sums, one op per step for all rows.

    A [T, rows, 256] view's sum over rows gives each row's column sums bit for bit as a
    [rows, 256] view of that row alone (checked under default, AVX2 and native kernels), so
    one fine-tune or several give the same floats.
    """

    def __init__(self, count: int, width: int, device: torch.device):
        self.columns = torch.zeros((count, COLUMNS), dtype=torch.float64, device=device)
        self.wide = torch.empty((count, -(-width // COLUMNS) * COLUMNS), dtype=torch.float64, device=device)

    def add(self, block: torch.Tensor) -> None:
        """`block`: [T, count] float32, count ≤ width; zero-padded to whole rows of 256."""
        count = block.shape[1]
        wide = self.wide[:, : -(-count // COLUMNS) * COLUMNS]
        wide[:, :count].copy_(block)
        wide[:, count:].zero_()
        wide.mul_(wide)
        self.columns.add_(wide.view(wide.shape[0], -1, COLUMNS).sum(dim=1))

    def totals(self) -> list[float]:
        return [math.fsum(row.tolist()) for row in self.columns]


def sq_norm(tau: torch.Tensor) -> float:
    """‖τ‖², the same float on any machine (see the module note)."""
    flat = tau.reshape(-1)
    sums = _SquareSums(1, min(BLOCK, flat.numel()), flat.device)
    for start in range(0, flat.numel(), BLOCK):
        sums.add(flat[start : start + BLOCK].unsqueeze(0))
    return sums.totals()[0]


def sq_norm_of_difference(theta: torch.Tensor, theta0: torch.Tensor) -> float:
    """`sq_norm(theta − theta0)`, the same float, without writing the difference to memory first."""
    return sq_norms_of_differences([theta], theta0)[0]


def sq_norms_of_differences(thetas: list[torch.Tensor], theta0: torch.Tensor) -> list[float]:
    """[`sq_norm_of_difference(θ, theta0)` for θ in thetas], each the same float, reading theta0 once.

    Block by block across all fine-tunes: a base block is fetched from memory once and stays
    in cache while every fine-tune's difference is formed against it; the squares and column
    sums of all of them are then one op each (4 + T torch calls per block instead of 5·T).
    """
    b = theta0.reshape(-1)
    flats = [theta.reshape(-1) for theta in thetas]
    width = min(BLOCK, b.numel())
    narrow = torch.empty((len(flats), width), dtype=b.dtype, device=b.device)
    sums = _SquareSums(len(flats), width, b.device)
    for start in range(0, b.numel(), BLOCK):
        count = min(BLOCK, b.numel() - start)
        base_block = b[start : start + count]
        for row, a in zip(narrow, flats, strict=True):
            torch.sub(a[start : start + count], base_block, out=row[:count])
        sums.add(narrow[:, :count])
    return sums.totals()


def sq_norm_after_sparsify(tau: torch.Tensor, plan: MergePlan, label: str, tensor_name: str, part: int = 0,
                           row_length: int | None = None) -> float:
    """‖sparsify(τ)‖², which is what MetaGPT weighs when combined with TIES or DARE."""
    if plan.sparsify == "none":
        return sq_norm(tau)
    return sq_norm(sparsify_(tau.unsqueeze(0), plan, [label], tensor_name, part, row_length)[0])


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one intra-op thread, leaving the other cores to a reader thread that copies."""
    previous = torch.get_num_threads()
    if previous != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if previous != 1:
            torch.set_num_threads(previous)
