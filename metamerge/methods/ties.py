"""TIES on one whole tensor in two passes of cache-sized blocks, on the CPU.

Trim, elect and combine each used to sweep the whole [T, n] task-vector matrix (about a dozen
passes through memory for a 100 M-entry embedding). Here the first pass makes the gram,
‖θ₀‖² and, per fine-tune, what it needs for its exact top-k threshold (a count above a
sampled bracket and the values inside it); the second pass trims, elects and combines each
block while it is in cache. The passes are compiled loops (`methods/compiled.py`, the trims
from the bands in `methods/ties_bands.py`) when numba is installed, torch block operations
otherwise (`methods/ties_torch.py`). The merged floats are
those of the unfused path either way (tested bit for bit): the same thresholds, the same tie
rule, the same election. With trims remembered from an earlier merge, one pass suffices.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from metamerge.methods.kernels import combine
from metamerge.methods.native import ties_bands, ties_kernels, use_compiled
from metamerge.methods.plan import MergePlan
from metamerge.methods.selection import (
    SELECT_MIN,
    bracket,
    kth_smallest,
    sample_positions,
    threshold_by_full_scan,
    trim_,
)
from metamerge.methods.ties_torch import BLOCK, SMALLEST_FLOOR, Band, first_pass, second_pass

if TYPE_CHECKING:
    from metamerge.methods.ties_bands import BandSet


def fused(plan: MergePlan, n: int, device: torch.device) -> bool:
    """Whether `ties_piece` applies: TIES' trim and election on a large CPU tensor, no spectral step."""
    return _trims_and_elects(plan, device) and n > SELECT_MIN


def small(plan: MergePlan, n: int, device: torch.device) -> bool:
    """Whether `small_piece` applies: the same on a tensor too small to bracket, with numba."""
    return _trims_and_elects(plan, device) and 0 < n <= SELECT_MIN and use_compiled()


def _trims_and_elects(plan: MergePlan, device: torch.device) -> bool:
    return (plan.sparsify == "magnitude" and plan.consensus == "ties" and plan.spectral == "none"
            and plan.density < 1.0 and device.type == "cpu")


Rows = list[torch.Tensor]  # T+1 flat float32 rows, the base first; read-only (they may be mapped files)
Trim = tuple[float, int]  # one fine-tune's exact trim of a tensor: the k-th largest |τ|, and where its dropped ties begin
Brackets = tuple[torch.Tensor, torch.Tensor]  # per fine-tune [T, 1] values around its k-th largest |τ|


def brackets_ahead(inputs: torch.Tensor | Rows, plan: MergePlan, known: list[Trim | None] | None) -> Brackets | None:
    """The brackets `ties_piece` will select in, made where the piece is loaded (the read-ahead
    thread, while the previous piece merges); None where it will not select (another path, or
    every trim remembered).

    The sample is 4096 scattered reads per fine-tune and its brackets a few small partitions: on
    the merging thread that was 0.05–0.2 s of a 1.1 s TIES merge of the benchmark family, most of
    it waiting on memory, while the loading thread mostly waits between its reads. The gather
    here is torch's, serial, so it never takes the kernels' launch lock; it gives the compiled
    gather's floats (one float32 subtraction and |·| per entry). A serial compiled gather here,
    twice as fast alone, made the merge wait for its loads twice as long (0.08 → 0.14 s per
    merge of the benchmark family). The caller decides which pieces
    (`engine/streaming.py`: those mapped ahead anyway, as sampling a whole tensor faults most of
    it in).
    """
    if not isinstance(inputs, list) or not use_compiled():
        return None
    count, n = len(inputs) - 1, inputs[0].numel()
    if not fused(plan, n, inputs[0].device):
        return None
    if known is not None and len(known) == count and all(trim is not None for trim in known):
        return None
    return _brackets(inputs, max(1, int(plan.density * n)), fast=False)


def release_buffers() -> None:
    """Lets this thread's first-pass scratch go (`ties_bands.Scratch`): kept from tensor to tensor of
    a merge, not beyond it. Imports nothing: a merge that never ran the compiled passes has none."""
    module = sys.modules.get("metamerge.methods.ties_bands")
    if module is not None:
        module.SCRATCH.release()


def ties_piece(inputs: torch.Tensor | Rows, weights: torch.Tensor, plan: MergePlan, out: torch.Tensor | None,
               check: Callable[[torch.Tensor, float], None], known: list[Trim | None] | None = None,
               learn: Callable[[list[Trim]], None] | None = None,
               ahead: Brackets | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """θ₀ + TIES(τ) of `inputs` (row 0 the base) into `out`; also the gram and ‖θ₀‖².

    `inputs` is a writable [T+1, n] tensor or a list of read-only rows. The compiled passes
    (numba) only read them; the torch passes need the tensor and make its rows 1..T the task
    vectors. `check(gram, base_sq)` runs before the merge is returned (the NaN/Inf check of the
    inputs); on the first pass's numbers, before anything is trimmed, when there is one.

    `known`: each fine-tune's trim of this tensor from an earlier merge (`engine/thresholds.py`,
    None where unknown: those fine-tunes alone are selected). The merge is then one pass over
    all inputs, and is kept only if every fine-tune kept exactly k entries: a
    trim keeps a prefix of the entries ordered by |τ| (then position), and two prefixes of one
    order with k entries are the same set, so a wrong or stale trim is caught there and the
    tensor is merged again from its own thresholds. `learn` receives the trims found here.
    `ahead`: the brackets, when `brackets_ahead` made them already.
    """
    rows = list(inputs)
    count, n = len(rows) - 1, rows[0].numel()
    k = max(1, int(plan.density * n))
    fast = use_compiled()
    if fast and known is not None and any(trim is not None for trim in known):
        merged = _merge_known(rows, weights, plan, out, check, known, k, learn, ahead)
        if merged is not None:
            return merged
    lo, hi = ahead if ahead is not None else _brackets(rows, k, fast)
    if fast:
        gram, base_sq, above, bands = ties_bands().first_pass(rows, lo, hi)
        check(gram, base_sq)
        trims = _compiled_trims(rows, k, above, bands)
    else:
        stacked = inputs if isinstance(inputs, torch.Tensor) else torch.stack(rows)
        gram, base_sq, above, torch_bands = first_pass(stacked, lo, hi)
        check(gram, base_sq)
        trims, drops = _trims(lambda t, begin, end: stacked[t + 1, begin:end].abs(), n, k, above, torch_bands)
        for t in range(count):
            stacked[1 + t, drops[t]] = 0.0  # the torch passes zero the ties beyond k; the compiled ones skip them
    if learn is not None:
        learn(trims)
    floors, cuts = _floors_and_cuts(trims)
    if float(floors.min()) < SMALLEST_FLOOR:  # the unfused trim finds the same thresholds, with bool masks
        taus = torch.stack(rows[1:]).sub_(rows[0]) if fast else stacked[1:]
        for t in range(count):
            trim_(taus[t], plan.density)
        return combine(taus, weights, plan, out=out).add_(rows[0]), gram, base_sq
    target = torch.empty(n) if out is None else out[:n]
    if fast:
        ties_kernels().second_pass(rows, floors, cuts, weights, plan.scale, plan.normalize, target, counting=False)
    else:
        second_pass(stacked, floors, weights, plan, target)
    return target, gram, base_sq


def small_piece(stacked: torch.Tensor, weights: torch.Tensor, plan: MergePlan, out: torch.Tensor | None,
                check: Callable[[torch.Tensor, float], None]) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """`ties_piece` for at most SELECT_MIN entries (a norm's weight), `stacked` only read: exact trims
    by a full selection in numpy, then the compiled merging pass (it makes the gram and ‖θ₀‖² too);
    None where it does not apply (the caller runs the unfused path). That path took 1.6–1.9 ms per
    768-entry norm weight inside a merge (0.04 s of a 0.66 s TIES merge of the benchmark family),
    1.3 ms of it the gram's [3, 768] matmul: BLAS' threads woke beside numba's on two busy cores."""
    rows = list(stacked)
    if any(row.dtype != torch.float32 or not row.is_contiguous() for row in rows):
        return None
    magnitudes = np.abs(stacked[1:].numpy() - stacked[0].numpy())
    trims = ties_bands().exact_trims(magnitudes, max(1, int(plan.density * stacked.shape[1])))
    merged = _merging_pass(rows, trims, weights, plan, out, check)  # (None on NaN too: the unfused path names it)
    return None if merged is None else (merged[0], merged[2], merged[3])


def _merging_pass(rows: Rows, trims: list[Trim], weights: torch.Tensor, plan: MergePlan, out: torch.Tensor | None,
                  check: Callable[[torch.Tensor, float], None]
                  ) -> tuple[torch.Tensor, list[int], torch.Tensor, float] | None:
    """The compiled merging pass alone, with the trims given: (merged, entries each fine-tune kept,
    gram, ‖θ₀‖²), `check` passed; None where a threshold lies below the pass's range (or is NaN)."""
    floors, cuts = _floors_and_cuts(trims)
    if not float(floors.min()) >= SMALLEST_FLOOR:
        return None
    n = rows[0].numel()
    target = torch.empty(n) if out is None else out[:n]
    kept, gram, base_sq = ties_kernels().second_pass(rows, floors, cuts, weights, plan.scale, plan.normalize, target,
                                                  diagnostics=True)
    assert gram is not None
    check(gram, base_sq)
    return target, kept, gram, base_sq


def _merge_known(rows: Rows, weights: torch.Tensor, plan: MergePlan, out: torch.Tensor | None,
                 check: Callable[[torch.Tensor, float], None], known: list[Trim | None], k: int,
                 learn: Callable[[list[Trim]], None] | None, ahead: Brackets | None
                 ) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """The merge in one pass with remembered trims (a fine-tune without one is selected alone first:
    its first pass reads the base and that fine-tune only); None where they do not keep exactly k
    entries each."""
    count, n = len(rows) - 1, rows[0].numel()
    if len(known) != count:
        return None
    missing = [t for t, trim in enumerate(known) if trim is None]
    full = list(known)
    if missing:
        alone = [rows[0]] + [rows[t + 1] for t in missing]
        # a fine-tune's bracket depends on its own sample only: the one made ahead for all serves
        lo, hi = (ahead[0][missing], ahead[1][missing]) if ahead is not None else _brackets(alone, k, True)
        _, _, above, bands = ties_bands().first_pass(alone, lo, hi)
        for t, trim in zip(missing, _compiled_trims(alone, k, above, bands), strict=True):
            full[t] = trim
    trims: list[Trim] = [trim for trim in full if trim is not None]
    if not all(0 <= cut <= n for _, cut in trims):
        return None
    merged = _merging_pass(rows, trims, weights, plan, out, check)  # None: the unfused trim's range, no shortcut
    if merged is None:
        return None
    target, kept, gram, base_sq = merged
    if any(number != k for number in kept):
        return None
    if missing and learn is not None:
        learn(trims)
    return target, gram, base_sq


def _floors_and_cuts(trims: list[Trim]) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, 1] floors and [T] cuts of the passes. |τ| ≥ threshold ⟺ |τ| − (the float just below it)
    > 0: a keep-mask from arithmetic alone."""
    floors = np.nextafter(np.array([threshold for threshold, _ in trims], np.float32), np.float32(-np.inf))
    return torch.from_numpy(floors.reshape(len(trims), 1)), torch.tensor([cut for _, cut in trims], dtype=torch.int64)


def _magnitudes_of(rows: Rows) -> Callable[[int, int, int], torch.Tensor]:
    """|τ_t| of positions begin..end, made from read-only rows."""
    return lambda t, begin, end: torch.sub(rows[t + 1][begin:end], rows[0][begin:end]).abs_()


def _compiled_trims(rows: Rows, k: int, above: list[int], bands: BandSet) -> list[Trim]:
    """Each fine-tune's exact trim from the compiled first pass (`ties_bands.trims`); where its bracket
    missed, from a scan of its whole row."""
    magnitudes, n = _magnitudes_of(rows), rows[0].numel()
    return [trim if trim is not None else _trim(lambda begin, end, t=t: magnitudes(t, begin, end), n, k, above[t],
                                                bands[t])[0]
            for t, trim in enumerate(ties_bands().trims(rows, k, above, bands))]


def _trims(magnitudes: Callable[[int, int, int], torch.Tensor], n: int, k: int, above: list[int] | torch.Tensor,
           bands: list) -> tuple[list[Trim], list[torch.Tensor]]:
    """Each fine-tune's exact trim from the torch first pass's counts, and the positions of its dropped ties."""
    found = [_trim(lambda begin, end, t=t: magnitudes(t, begin, end), n, k, int(above[t]), bands[t])
             for t in range(len(bands))]
    return [trim for trim, _ in found], [dropped for _, dropped in found]


def _trim(magnitudes: Callable[[int, int], torch.Tensor], n: int, k: int, above: int, bands: Band
          ) -> tuple[Trim, torch.Tensor]:
    """One fine-tune's trim in Python (the torch passes, and a compiled bracket that missed)."""
    threshold, dropped = _threshold(magnitudes, n, k, above, bands)
    return (float(threshold), int(dropped[0]) if dropped.numel() else n), dropped


def _brackets(rows: Rows, k: int, fast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per fine-tune, [T, 1] values around its k-th largest |τ|, from one set of sampled positions."""
    count, n = len(rows) - 1, rows[0].numel()
    positions = sample_positions(n, rows[0].device)
    if fast:  # the compiled gather: the sampled pages of mapped rows fault in on every core
        samples = ties_kernels().sample(rows, positions)
    else:
        samples = torch.stack([row[positions] for row in rows[1:]]).sub_(rows[0][positions]).abs_()
    brackets = [bracket(samples[t], k, n) for t in range(count)]
    lo = torch.stack([b[0] for b in brackets]).reshape(count, 1)
    hi = torch.stack([b[1] for b in brackets]).reshape(count, 1)
    return lo, hi


def _threshold(magnitudes: Callable[[int, int], torch.Tensor], n: int, k: int, above: int,
               bands: Band) -> tuple[torch.Tensor, torch.Tensor]:
    """The k-th largest |τ| (exact), and the positions of the entries tied with it beyond the k
    kept (the highest-index ones, as `selection.trim_`), in increasing order.

    `magnitudes(begin, end)` gives |τ| of those positions. Ties are common in a big float32
    tensor (24 M values share a few million floats), so they are looked for only in the blocks
    whose band holds the threshold, last block first.
    """
    band = bands.all()
    need = k - above
    if not 0 < need <= band.numel():
        return _threshold_by_full_scan(magnitudes(0, n), k)
    threshold = kth_smallest(band, band.numel() - need + 1)
    excess = above + int(torch.count_nonzero(band >= threshold)) - k
    drops = []
    for index in range(len(bands.ends) - 1, -1, -1):
        if excess <= 0:
            break
        if bool((bands.block(index) == threshold).any()):
            begin = index * BLOCK
            tied = torch.nonzero(magnitudes(begin, min(n, begin + BLOCK)) == threshold).flatten() + begin
            drops.insert(0, tied[max(0, tied.numel() - excess) :])
            excess -= tied.numel()
    return threshold, torch.cat(drops) if drops else torch.empty(0, dtype=torch.int64)


def _threshold_by_full_scan(magnitudes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bracket missed: a full selection, and the tie rule over the whole row."""
    threshold, kept = threshold_by_full_scan(magnitudes, k)
    if kept <= k:
        return threshold, torch.empty(0, dtype=torch.int64)
    tied = torch.nonzero(magnitudes == threshold).flatten()
    return threshold, tied[tied.numel() - (kept - k) :]
