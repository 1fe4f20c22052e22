"""‖τ‖² that every machine computes to the very same float, whatever its cores or vector width.

MetaGPT's λ_t = ‖τ_t‖² / Σ_k ‖τ_k‖² is the only place where a sum over a whole model decides
merged bytes. A BLAS dot (or torch's own sum, which splits a reduction by thread count, SIMD
width and a cascade of partial sums) gave λ differing in the last bits between a 2-core and a
16-core worker, or between an AVX2 and an AVX-512 machine, and with it a different merge.

So the order of the sum is part of the definition. Each float32 entry is squared exactly in
float64 (24-bit mantissas: the square needs 48 of float64's 53 bits). The entries are taken in
blocks of 65 536 and each block as 256 rows of 256 columns; each column sums its rows in order,
from zero (a sequential sum: the block's column sums); the block's column sums are added to the
running ones in block order; the 256 running sums meet in `math.fsum` (correctly rounded).
`norm_kernels` computes this in compiled loops; without numba (METAMERGE_COMPILED=0) or for other
dtypes torch does, with `cumsum`, which is sequential. Both give the same floats on any CPU (tested).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from metamerge.methods.kernels import sparsify_
from metamerge.methods.native import norm_kernels, use_compiled
from metamerge.methods.plan import MergePlan

BLOCK = 1 << 16  # entries whose column sums start from zero: part of the definition (norm_kernels.BLOCK)
COLUMNS = 256


def _torch_column_square_sums(rows: list[torch.Tensor]) -> np.ndarray:
    """`norm_kernels.column_square_sums` in torch ops, the same floats: the fallback and the reference."""
    flats = [row.reshape(-1) for row in rows]
    n = flats[0].numel()
    width = min(BLOCK, n)
    wide = torch.zeros((len(flats), -(-width // COLUMNS) * COLUMNS), dtype=torch.float64, device=flats[0].device)
    columns = torch.zeros((len(flats), COLUMNS), dtype=torch.float64, device=flats[0].device)
    for start in range(0, n, BLOCK):
        count = min(BLOCK, n - start)
        base = flats[0][start : start + count]
        wide[0, :count].copy_(base)
        for row, flat in zip(wide[1:], flats[1:], strict=True):
            row[:count].copy_(flat[start : start + count] - base)  # the difference is made in float32
        block = wide[:, : -(-count // COLUMNS) * COLUMNS]
        block[:, count:].zero_()  # a zero adds nothing to a sum of squares
        block.mul_(block)
        columns.add_(block.view(len(flats), -1, COLUMNS).cumsum(dim=1)[:, -1])
    return columns.cpu().numpy()


def _square_sums(rows: list[torch.Tensor]) -> list[float]:
    """[Σ rows[0]², Σ (rows[1] − rows[0])², …], each the same float on any machine."""
    flats = [row.reshape(-1).contiguous() for row in rows]
    if flats[0].numel() == 0:
        return [0.0] * len(flats)
    compiled = use_compiled() and all(flat.dtype == torch.float32 and flat.device.type == "cpu" for flat in flats)
    columns = norm_kernels().column_square_sums(flats) if compiled else _torch_column_square_sums(flats)
    return [math.fsum(row) for row in columns.tolist()]


def sq_norm(tau: torch.Tensor) -> float:
    """‖τ‖², the same float on any machine (see the module note)."""
    return _square_sums([tau])[0]


def sq_norm_of_difference(theta: torch.Tensor, theta0: torch.Tensor) -> float:
    """`sq_norm(theta − theta0)`, the same float, without writing the difference to memory first."""
    return sq_norms_of_differences([theta], theta0)[0]


def sq_norms_of_differences(thetas: list[torch.Tensor], theta0: torch.Tensor) -> list[float]:
    """[`sq_norm_of_difference(θ, theta0)` for θ in thetas], each the same float, reading theta0 once."""
    return base_and_difference_sq_norms(thetas, theta0)[1]


def base_and_difference_sq_norms(thetas: list[torch.Tensor], theta0: torch.Tensor) -> tuple[float, list[float]]:
    """(`sq_norm(theta0)`, `sq_norms_of_differences(thetas, theta0)`) in one read of every input.

    Block by block: a base block is summed and then stays in cache while every fine-tune's
    difference with it is formed and summed, so ‖θ₀‖² costs no read of its own.
    """
    base, *differences = _square_sums([theta0, *thetas])
    return base, differences


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
