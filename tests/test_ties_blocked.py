"""The blocked TIES passes (methods/ties.py), compiled and torch, against the unfused kernels and the
formulas, bit for bit."""

from __future__ import annotations

import pytest
import torch

from metamerge.methods import compiled, selection, ties, ties_bands
from metamerge.methods.kernels import combine, elect_and_combine, sparsify_
from metamerge.methods.plan import MergePlan
from tests.numba_targets import runs_here, target_env

N = 3 * ties.BLOCK + 12_345  # several blocks and a ragged last one, above SELECT_MIN


@pytest.fixture(autouse=True, params=["compiled", "torch"])
def passes(request, monkeypatch):
    """Every test runs on both implementations of the passes."""
    if request.param == "compiled" and not compiled.AVAILABLE:
        pytest.skip("numba is not installed")
    monkeypatch.setenv("METAMERGE_COMPILED", "1" if request.param == "compiled" else "0")
    assert ties.use_compiled() == (request.param == "compiled")
    return request.param


def _plan(**overrides) -> MergePlan:
    fields = dict(sparsify="magnitude", density=0.2, consensus="ties", weighting="constant", scale=1.0,
                  normalize=True)
    fields.update(overrides)
    return MergePlan(**fields)


def _stacked(kind: str, count: int = 3, n: int = N) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(n, generator=gen) * 0.02
    rows = [base]
    for _ in range(count):
        theta = base + torch.randn(n, generator=gen) * 0.002
        if kind == "bf16":  # bf16 checkpoints: few distinct |τ|, ties at every threshold
            theta = theta.to(torch.bfloat16).to(torch.float32)
            rows[0] = base.to(torch.bfloat16).to(torch.float32)
        rows.append(theta)
    stacked = torch.stack(rows)
    if kind == "tiny":  # thresholds so small that 1 ulp below them is subnormal: the unfused fallback
        stacked[1:] = stacked[0] + (stacked[1:] - stacked[0]) * 1e-33
    if kind == "ties":  # |τ| = PLANTED exactly at 1 % of positions, both signs, where the threshold falls
        stacked[0, ::97] = 0.0
        stacked[1:, ::97] = torch.tensor([[PLANTED], [-PLANTED], [PLANTED]])
    return stacked


PLANTED = 0.0026  # ≈ the 80th percentile of |N(0, 0.002)|: with 1 % planted, the top 20 % ends inside them


def test_the_planted_ties_sit_at_the_threshold():
    """Guards the "ties" case: its threshold must be the planted value, shared by far more entries than kept."""
    taus = _stacked("ties")[1:] - _stacked("ties")[0]
    k = int(0.2 * N)
    for t in range(3):
        magnitudes = taus[t].abs()
        threshold = torch.sort(magnitudes, descending=True).values[k - 1]
        assert threshold == torch.tensor(PLANTED)
        assert int((magnitudes >= threshold).sum()) - k > 100  # more than a hundred ties to break


def _unfused(stacked: torch.Tensor, weights: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    base, taus = stacked[0], stacked[1:] - stacked[0]
    sparsify_(taus, plan, ["a", "b", "c"][: taus.shape[0]], "w")
    return combine(taus, weights, plan).add_(base)


def _blocked(stacked: torch.Tensor, weights: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    checked = []
    inputs = stacked.clone()
    merged, gram, base_sq = ties.ties_piece(inputs, weights, plan, None, lambda g, b: checked.append((g.clone(), b)))
    if ties.use_compiled():  # the compiled passes only read their inputs (they may be mapped files)
        assert torch.equal(inputs, stacked)
    taus = (stacked[1:] - stacked[0]).double()
    assert len(checked) == 1
    assert torch.allclose(gram, taus @ taus.T, rtol=1e-5)  # the raw τ's gram, before trimming
    assert base_sq == pytest.approx(float(stacked[0].double().square().sum()), rel=1e-5)
    return merged


@pytest.mark.parametrize("kind", ["random", "bf16", "ties", "tiny"])
@pytest.mark.parametrize("variant", [{}, {"normalize": False}, {"scale": 0.7}, {"density": 0.05}])
def test_blocked_ties_is_the_unfused_merge_bit_for_bit(kind, variant):
    plan = _plan(**variant)
    stacked = _stacked(kind)
    weights = torch.tensor([0.5, 0.3, 0.2])
    assert ties.fused(plan, stacked.shape[1], stacked.device)
    blocked, unfused = _blocked(stacked, weights, plan), _unfused(stacked, weights, plan)
    assert torch.equal(blocked.view(torch.int32), unfused.view(torch.int32))


def test_blocked_ties_matches_the_formulas():
    """Independent of both kernels: argsort top-k (ties to the lower index), majority sign, disjoint mean."""
    plan, stacked = _plan(), _stacked("bf16")
    weights = torch.ones(3)
    taus = (stacked[1:] - stacked[0]).clone()
    k = int(plan.density * N)
    for t in range(3):
        order = torch.sort(taus[t].abs(), descending=True, stable=True).indices  # stable: lower index first
        keep = torch.zeros(N, dtype=torch.bool)
        keep[order[:k]] = True
        taus[t][~keep] = 0.0
    majority = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(taus) == majority) & (taus != 0)
    expected = stacked[0] + (taus * agree).sum(0) / agree.sum(0).clamp_min(1)
    assert torch.equal(_blocked(stacked, weights, plan), expected)


def test_a_missed_bracket_falls_back_to_the_full_scan(monkeypatch):
    """Fault injection: a bracket that holds nothing must still give the exact merge."""
    plan, stacked, weights = _plan(), _stacked("ties"), torch.ones(3)
    expected = _unfused(stacked, weights, plan)
    monkeypatch.setattr(ties, "bracket", lambda sample, k, n: (torch.tensor(9.0), torch.tensor(10.0)))
    assert torch.equal(_blocked(stacked, weights, plan), expected)


def test_nan_in_a_fine_tune_is_reported_before_anything_is_trimmed():
    stacked = _stacked("random")
    stacked[2, 70_000] = float("nan")
    seen = []
    with pytest.raises(ValueError, match="NaN"):
        ties.ties_piece(stacked, torch.ones(3), _plan(), None, lambda g, b: seen.append(g) or _raise(g))
    assert seen and not bool(torch.isfinite(seen[0].diagonal()).all())


def _raise(gram: torch.Tensor) -> None:
    if not bool(torch.isfinite(gram.diagonal()).all()):
        raise ValueError("NaN in a task vector")


def _elect_with_bool_masks(taus, weights, plan):
    """The election as it was written before (sign compare, bool masks): the reference."""
    w = weights.reshape(-1, 1)
    majority = torch.where(torch.matmul(weights, taus) >= 0, 1.0, -1.0)
    mask = (taus * majority > 0).to(taus.dtype)
    weighted = mask * w
    out = torch.sum(taus * weighted, dim=0)
    if plan.normalize:
        divisor = weighted.sum(dim=0)
        out = out / divisor.masked_fill(divisor == 0, 1.0)
    return out


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, -0.25, 2.0], [1.0, -1.0, 0.0]])
@pytest.mark.parametrize("normalize", [True, False])
def test_the_arithmetic_election_is_the_boolean_one(weights, normalize):
    """Zeros of both signs, exact cancellations, negative and zero weights: the same floats."""
    gen = torch.Generator().manual_seed(3)
    taus = torch.randn(3, 50_000, generator=gen)
    taus[:, ::5] = 0.0
    taus[1, ::7] = -0.0
    taus[2, ::11] = -taus[0, ::11]
    plan = _plan(normalize=normalize)
    w = torch.tensor(weights)
    out = torch.empty(50_000)
    elect_and_combine(taus.clone(), w, plan, out)
    assert torch.equal(out.view(torch.int32), _elect_with_bool_masks(taus, w, plan).view(torch.int32))


def test_both_passes_cut_blocks_alike():
    assert ties.BLOCK == compiled.BLOCK  # the tie search finds a band's block by this size


def test_small_tensors_keep_the_unfused_path():
    cpu = torch.device("cpu")
    assert not ties.fused(_plan(), selection.SELECT_MIN, cpu)
    assert not ties.fused(_plan(sparsify="random"), N, cpu)
    assert not ties.fused(_plan(spectral="iso"), N, cpu)
    assert ties.fused(_plan(), N, cpu)


@pytest.mark.parametrize("kind", ["random", "ties"])
def test_read_only_rows_give_the_same_merge(kind, passes):
    """The engine hands the passes a list of rows (mapped files, never written) instead of one tensor."""
    plan, stacked, weights = _plan(), _stacked(kind), torch.tensor([0.5, 0.3, 0.2])
    rows = [row.clone() for row in stacked]
    merged, _, _ = ties.ties_piece(rows, weights, plan, None, lambda g, b: None)
    assert torch.equal(merged.view(torch.int32), _unfused(stacked, weights, plan).view(torch.int32))
    assert all(torch.equal(row, original) for row, original in zip(rows, stacked, strict=True))


def test_a_band_larger_than_a_blocks_scratch_is_gathered_again(monkeypatch, passes):
    """Fault injection: in-bracket values beyond a block's scratch (skewed data) take the second gather."""
    if passes != "compiled":
        pytest.skip("the scratch is the compiled first pass's")
    monkeypatch.setattr(compiled, "BAND_CAPACITY", 64)
    for kind in ("random", "ties"):
        plan, stacked, weights = _plan(), _stacked(kind), torch.ones(3)
        assert torch.equal(_blocked(stacked, weights, plan), _unfused(stacked, weights, plan))




def test_a_scratch_row_that_overflows_leaves_its_neighbours_intact(monkeypatch, passes):
    """The first pass compacts SUB entries at a time and stops a row at its capacity: the rows after
    it in memory (the next fine-tune's, the next block's) must hold exactly their own band."""
    if passes != "compiled":
        pytest.skip("the scratch is the compiled first pass's")
    monkeypatch.setattr(compiled, "BAND_CAPACITY", 64)
    gen = torch.Generator().manual_seed(3)
    n = 3 * ties.BLOCK
    rows = [torch.zeros(n)] + [torch.full((n,), 5.0) for _ in range(3)]  # |τ| = 5: above the bracket
    lo, hi = torch.tensor([[1.0]] * 3), torch.tensor([[2.0]] * 3)
    for t in range(3):
        for block in range(3):
            overflows = (t + block) % 2 == 0  # neighbours in memory alternate: full, within capacity
            count = 500 if overflows else 60
            if overflows:  # one run: a single sub-block passes the capacity by hundreds
                at = block * ties.BLOCK + 1000 * (t + 1) + torch.arange(count)
            else:
                at = block * ties.BLOCK + torch.randperm(ties.BLOCK, generator=gen)[:count]
            rows[t + 1][at] = 1.0 + torch.rand(count, generator=gen)  # distinct values inside [1, 2)
    _, _, above, bands = ties_bands.first_pass(rows, lo, hi)
    for t in range(3):
        magnitudes = (rows[t + 1] - rows[0]).abs()
        inside = (magnitudes >= 1.0) & (magnitudes <= 2.0)
        assert torch.equal(bands[t].all(), magnitudes[inside])  # in position order
        assert int(above[t]) == int((magnitudes > 2.0).sum())
        for block in range(3):
            assert torch.equal(bands[t].block(block), magnitudes[block * ties.BLOCK:(block + 1) * ties.BLOCK][
                inside[block * ties.BLOCK:(block + 1) * ties.BLOCK]])


def test_the_gram_summed_run_by_run_is_the_whole_blocks_dot(passes):
    """Both passes add the gram one float32 run at a time while the run is in L1; it must be the
    float of `_dot` over the whole block (one block here, so no cross-block sum), in either pass."""
    if passes != "compiled":
        pytest.skip("about the compiled passes")
    stacked = _stacked("random", n=ties.BLOCK - 100)  # a ragged last run
    rows = list(stacked)
    taus = [(row - rows[0]).numpy() for row in rows[1:]]
    want = torch.tensor([[compiled._dot(x, y) for y in taus] for x in taus], dtype=torch.float64)
    lo, hi = torch.full((3, 1), 1e-3), torch.full((3, 1), 2e-3)
    gram, base_sq, _, _ = ties_bands.first_pass(rows, lo, hi)
    assert torch.equal(gram, want) and base_sq == compiled._dot(rows[0].numpy(), rows[0].numpy())
    floors, cuts = torch.full((3, 1), 1e-3), torch.full((3,), ties.BLOCK, dtype=torch.int64)
    _, again, base_again = compiled.second_pass(rows, floors, cuts, torch.ones(3), 1.0, True,
                                                torch.empty(ties.BLOCK - 100), diagnostics=True)
    assert torch.equal(again, want) and base_again == base_sq

def test_the_compiled_sample_and_brackets_are_the_torch_ones(passes):
    """The brackets decide only the speed, but the compiled gather must still read the very |τ|."""
    if passes != "compiled":
        pytest.skip("about the compiled gather")
    stacked = _stacked("bf16")
    rows = list(stacked)
    positions = selection.sample_positions(N, stacked.device)
    want = torch.stack([row[positions] for row in rows[1:]]) - rows[0][positions]
    assert torch.equal(compiled.sample(rows, positions), want.abs())
    k = int(0.2 * N)
    pairs = zip(ties._brackets(rows, k, fast=True), ties._brackets(rows, k, fast=False), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


_CPU_SCRIPT = """
import hashlib, sys, torch
from metamerge.methods import ties
from metamerge.methods.plan import MergePlan
from tests.test_ties_blocked import _stacked
assert ties.use_compiled()
digest = hashlib.sha256()
for kind in ("random", "bf16", "ties"):
    for normalize, scale in ((True, 1.0), (False, 0.7)):
        plan = MergePlan(sparsify="magnitude", density=0.2, consensus="ties", weighting="constant", scale=scale,
                         normalize=normalize)
        merged, _, _ = ties.ties_piece(list(_stacked(kind)), torch.tensor([0.5, 0.3, 0.2]), plan, None,
                                       lambda g, b: None)
        digest.update(merged.numpy().tobytes())
print(digest.hexdigest())
"""


@pytest.mark.slow
def test_the_compiled_passes_give_the_same_floats_for_any_target_cpu(passes):
    """numba compiles for the CPU it runs on (vector width, FMA): strict IEEE code must not care.

    Each target compiles in its own process (`numba_targets`: name and features); the merged
    floats must be bit-equal.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    if passes != "compiled":
        pytest.skip("about the compiled passes")
    root = Path(__file__).resolve().parents[1]
    prints = set()
    for cpu in [cpu for cpu in ("x86-64", "haswell", None) if runs_here(cpu)]:  # SSE2, AVX2 + FMA, this machine's
        env = target_env(dict(os.environ), cpu)
        env["PYTHONPATH"] = str(root)
        done = subprocess.run([sys.executable, "-c", _CPU_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=600, cwd=root)
        assert done.returncode == 0, done.stderr
        prints.add(done.stdout.strip())
    assert len(prints) == 1, prints


@pytest.mark.parametrize("kind", ["random", "bf16", "ties"])
def test_remembered_trims_give_the_same_merge_in_one_pass(kind, passes, monkeypatch):
    """A second merge with the trims the first one learned: one pass (no bracket, no first pass),
    the same floats, the same gram."""
    plan, stacked, weights = _plan(), _stacked(kind), torch.tensor([0.5, 0.3, 0.2])
    learned: list = []
    first, gram, base_sq = ties.ties_piece(list(stacked), weights, plan, None, lambda g, b: None, learn=learned.append)
    assert len(learned) == 1 and len(learned[0]) == 3
    k = int(plan.density * N)
    for t, (threshold, cut) in enumerate(learned[0]):  # against a stable sort: the k-th |τ|, and where its ties drop
        magnitudes = (stacked[t + 1] - stacked[0]).abs()
        order = torch.sort(magnitudes, descending=True, stable=True).indices
        assert threshold == float(magnitudes[order[k - 1]])
        tied_dropped = order[k:][magnitudes[order[k:]] == threshold]
        assert cut == (int(tied_dropped.min()) if tied_dropped.numel() else N)
    if passes != "compiled":
        return  # the torch passes learn trims but always select (they are the fallback)
    monkeypatch.setattr(ties, "_brackets", lambda *a: pytest.fail("remembered trims need no bracket"))
    checked = []
    again, gram2, base_sq2 = ties.ties_piece(list(stacked), weights, plan, None, lambda g, b: checked.append(g),
                                             known=learned[0])
    assert checked and torch.equal(again.view(torch.int32), first.view(torch.int32))
    assert torch.allclose(gram2, gram, rtol=1e-6) and base_sq2 == pytest.approx(base_sq, rel=1e-6)


@pytest.mark.parametrize("damage", ["threshold up", "threshold down", "cut", "nan", "negative", "count"])
def test_a_wrong_remembered_trim_is_caught_and_the_tensor_selected_again(damage, passes):
    """A trim from a stale or tampered cache must never reach the merged bytes: the one pass counts
    what each fine-tune kept, and anything but k sends the tensor through the full selection."""
    if passes != "compiled":
        pytest.skip("remembered trims are used by the compiled passes")
    plan, stacked, weights = _plan(), _stacked("ties"), torch.ones(3)
    learned: list = []
    expected, _, _ = ties.ties_piece(list(stacked), weights, plan, None, lambda g, b: None, learn=learned.append)
    trims = list(learned[0])
    threshold, cut = trims[1]
    trims[1] = {"threshold up": (float(torch.nextafter(torch.tensor(threshold), torch.tensor(1.0))), cut),
                "threshold down": (float(torch.nextafter(torch.tensor(threshold), torch.tensor(0.0))), cut),
                "cut": (threshold, cut + 1 if cut < N else 0), "nan": (float("nan"), cut),
                "negative": (-threshold, cut), "count": trims[1]}[damage]
    if damage == "count":
        trims = trims[:2]
    relearned: list = []
    merged, _, _ = ties.ties_piece(list(stacked), weights, plan, None, lambda g, b: None, known=trims,
                                   learn=relearned.append)
    assert torch.equal(merged.view(torch.int32), expected.view(torch.int32))
    assert relearned == learned  # selected again, and the right trims learned for next time


_SCAN_SCRIPT = """
import numpy as np
from numba import njit
from metamerge.methods.simd import WIDTH, scan_band

@njit
def scan(row, base, tau, low, high, out):
    above = at = 0
    for i in range(0, row.shape[0] // WIDTH * WIDTH, WIDTH):
        found = scan_band(row, i, base, i, tau, i + 3, low, high, out, at)
        above += found >> 32
        at += found & 0xFFFFFFFF
    return above, at

rng = np.random.default_rng(5)
n = WIDTH * 4000
base = rng.standard_normal(n + 5).astype(np.float32)[5:]  # rows not 64-byte aligned
row = (base + rng.standard_normal(n).astype(np.float32)).astype(np.float32)
low, high = np.float32(0.5), np.float32(1.25)
base[:12] = 0.0  # so that τ is exactly these: NaN, ±0, ±inf, both bracket ends, just past one, +0
row[:12] = [np.nan, -0.0, 0.0, np.inf, -np.inf, low, -high, np.nextafter(high, np.float32(9)), 0.0, 0.0, 0.0, 0.0]
tau = np.full(n + 3 + WIDTH, -5.0, np.float32)
out = np.full(n + 2 * WIDTH, -7.0, np.float32)
above, at = scan(row, base, tau, low, high, out)
want_tau = row - base
magnitudes = np.abs(want_tau)
band = magnitudes[(magnitudes >= low) & (magnitudes <= high)]
checks = {
    "tau": np.array_equal(tau[3:n + 3].view(np.int32), want_tau.view(np.int32)),
    "tau untouched": bool((tau[:3] == -5.0).all() and (tau[n + 3:] == -5.0).all()),
    "above": int(above) == int(np.count_nonzero(magnitudes > high)),
    "inside": int(at) == band.size and 0 < band.size < n,
    "band": np.array_equal(out[:at], band),
    "nothing past 16": bool((out[at + WIDTH:] == -7.0).all()),
}
code = list(scan.inspect_asm().values())[0]
print(checks, "vcompressps" in code, "vpermps" in code, "zmm" in code)
"""


@pytest.mark.slow
@pytest.mark.parametrize("cpu", ["x86-64", "haswell", None])
def test_scan_band_gives_the_loops_values_counts_and_band_on_every_target(cpu, passes):
    """The first pass's 16-wide step (`simd.scan_band`) against numpy, compiled for SSE2, AVX2 and
    this machine (its own pack on each: vcompressps, vpermps by table, LLVM's expansion): τ bit for
    bit, the counts above and inside, the band in order; NaN, ±0, ±inf and both bracket ends
    included; nothing written past τ's 16 or 16 past the band's count. Also which pack ran, so
    that a target that did not take effect fails here."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("numba")
    if passes != "compiled":
        pytest.skip("about the compiled first pass (its subprocess does not see the torch parametrization)")
    if not runs_here(cpu):
        pytest.skip(f"this CPU cannot run code for {cpu}")
    from llvmlite import binding

    root = Path(__file__).resolve().parents[1]
    env = target_env(dict(os.environ), cpu)
    env["PYTHONPATH"] = str(root)
    done = subprocess.run([sys.executable, "-c", _SCAN_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr
    checks, compress, permute, wide = done.stdout.strip().rsplit(" ", 3)
    assert "False" not in checks, checks
    avx512 = cpu is None and binding.get_host_cpu_features().get("avx512f", False)
    avx2 = cpu == "haswell" or (cpu is None and not avx512 and binding.get_host_cpu_features().get("avx2", False))
    assert (compress, permute, wide) == (str(avx512), str(avx2), str(avx512))


def test_the_first_pass_gives_the_same_counts_and_bands_in_any_address_order(passes):
    """`_first_pass` visits the fine-tunes by ascending address (twice as fast on the benchmark VM
    when mapped files lie the other way round): the results are per fine-tune, whatever the order."""
    if passes != "compiled":
        pytest.skip("about the compiled first pass")
    import numpy as np

    stacked = _stacked("ties")
    n = stacked.shape[1]
    lo, hi = ties._brackets(list(stacked), int(0.2 * n), True)
    found = []
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):  # where each row lies in one buffer
        buffer = torch.empty(4 * n)
        rows = [buffer[slot * n:(slot + 1) * n] for slot in order]
        for row, source in zip(rows, stacked, strict=True):
            row.copy_(source)
        gram, base_sq, above, bands = ties_bands.first_pass(rows, lo, hi)
        packed, _ = bands.collect()
        found.append((gram, base_sq, above, packed.copy(), bands.lengths.copy()))
        addresses = [row.data_ptr() for row in rows[1:]]
        assert [addresses[t] for t in compiled.address_order(tuple(r.numpy() for r in rows))] == sorted(addresses)
    for gram, base_sq, above, packed, lengths in found[1:]:
        assert torch.equal(gram, found[0][0]) and base_sq == found[0][1] and above == found[0][2]
        assert np.array_equal(packed, found[0][3]) and np.array_equal(lengths, found[0][4])


def test_rows_that_lack_the_bands_ties_give_no_trim_and_the_scan_decides(passes):
    """Fault injection: the rows changed between the passes (the band counts ties the rows no longer
    hold). The compiled cut search must stop inside the rows and say so; the merge then takes the
    whole-row scan, never a cut from a block it could not finish."""
    if passes != "compiled":
        pytest.skip("about the compiled trims")
    stacked = _stacked("ties")
    rows = [row.clone() for row in stacked]
    k = int(0.2 * stacked.shape[1])
    lo, hi = ties._brackets(rows, k, True)
    _, _, above, bands = ties_bands.first_pass(rows, lo, hi)
    assert all(trim is not None for trim in ties_bands.trims(rows, k, above, bands))
    changed = [rows[0]] + [row + 1e-3 for row in rows[1:]]  # no |τ| equals a planted threshold any more
    assert ties_bands.trims(changed, k, above, bands) == [None, None, None]


def test_merges_in_two_threads_keep_their_own_scratch(passes):
    """The first pass's scratch is read after the kernel's lock is let go: merges in two threads of
    one process (Prefect's thread pool) must each find their own bands there."""
    if passes != "compiled":
        pytest.skip("about the compiled first pass")
    import threading

    plan, weights = _plan(), torch.tensor([0.5, 0.3, 0.2])
    inputs = {kind: _stacked(kind) for kind in ("random", "ties")}
    want = {kind: _unfused(stacked, weights, plan) for kind, stacked in inputs.items()}
    failures: list[str] = []

    def merge_many(kind: str) -> None:
        for _ in range(6):
            merged, _, _ = ties.ties_piece(list(inputs[kind]), weights, plan, None, lambda g, b: None)
            if not torch.equal(merged, want[kind]):
                failures.append(kind)

    threads = [threading.Thread(target=merge_many, args=(kind,)) for kind in inputs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
