"""How the streaming engine feeds TIES: brackets made on the read-ahead thread, one reused buffer
for whole-tensor results. Both are speed only: the bytes must be those of the plain way."""

from __future__ import annotations

import threading
import time

import pytest

from metamerge.engine import checkpoint, writer
from metamerge.engine.coefficients import solve_constant
from metamerge.engine.merge import merge_checkpoints
from metamerge.engine.pieces import WholeResult
from metamerge.methods import compiled, ties
from metamerge.methods.plan import MergePlan
from tests.helpers import TIES_LABELS, safetensors_bytes, ties_family, ties_plan

PLAN = ties_plan()
LABELS = TIES_LABELS


@pytest.fixture
def family(tmp_path):
    return ties_family(tmp_path)


def _merge(family, out):
    base_dir, finetunes = family
    return merge_checkpoints(base_dir, finetunes, solve_constant(LABELS, 1.0, "ties"), PLAN, out, device="cpu")


_bytes = safetensors_bytes


def test_brackets_are_made_on_the_read_ahead_thread_and_change_no_byte(family, tmp_path, monkeypatch):
    if not compiled.AVAILABLE:
        pytest.skip("the read-ahead brackets serve the compiled passes")
    monkeypatch.setenv("METAMERGE_COMPILED", "1")
    real, threads = ties._brackets, []

    def recorded(rows, k, fast):
        threads.append((threading.current_thread().name, fast))
        return real(rows, k, fast)

    monkeypatch.setattr(ties, "_brackets", recorded)
    _merge(family, tmp_path / "ahead")
    assert len(threads) == 2 and all(name.startswith("read-ahead") and not fast for name, fast in threads)

    threads.clear()
    monkeypatch.setattr(checkpoint, "CHUNK_ELEMENTS", 50_000)  # the 90 000-entry tensors are now whole pieces
    _merge(family, tmp_path / "whole")
    # not mapped ahead, so not sampled ahead: two whole pieces would be resident at once
    assert threads == [(threading.current_thread().name, True)] * 2

    threads.clear()
    monkeypatch.undo()
    monkeypatch.setenv("METAMERGE_COMPILED", "1")
    monkeypatch.setattr(ties, "_brackets", recorded)
    monkeypatch.setattr(ties, "brackets_ahead", lambda *args: None)  # the merging thread brackets again
    _merge(family, tmp_path / "behind")
    assert threads == [(threading.current_thread().name, True)] * 2
    assert _bytes(tmp_path / "ahead") == _bytes(tmp_path / "behind") == _bytes(tmp_path / "whole")


def test_no_brackets_ahead_where_the_merge_will_not_select(monkeypatch):
    import torch

    monkeypatch.setenv("METAMERGE_COMPILED", "1")
    rows = [torch.randn(70_000) for _ in range(4)]
    assert ties.brackets_ahead(torch.stack(rows), PLAN, None) is None  # a tensor: the torch passes bracket it
    assert ties.brackets_ahead(rows[:], MergePlan(sparsify="magnitude", density=1.0, consensus="ties"), None) is None
    assert ties.brackets_ahead([row[:1000] for row in rows], PLAN, None) is None  # small: a full selection
    assert ties.brackets_ahead(rows, PLAN, [(0.5, 70_000)] * 3) is None  # every trim remembered
    if compiled.AVAILABLE:
        lo, hi = ties.brackets_ahead(rows, PLAN, [(0.5, 70_000), None, (0.5, 70_000)])
        want = ties._brackets(rows, int(0.2 * 70_000), fast=True)
        assert torch.equal(lo, want[0]) and torch.equal(hi, want[1]) and bool((lo < hi).all())


def test_whole_results_share_one_buffer_that_only_grows():
    results = WholeResult()
    first = results.take(1000)
    assert results.take(800).data_ptr() == first.data_ptr() and results.take(800).numel() == 800
    bigger = results.take(5000)
    assert bigger.numel() == 5000 and results.take(1000).data_ptr() == bigger.data_ptr()


def test_a_slow_write_of_a_whole_tensor_is_never_overwritten_by_the_next(family, tmp_path, monkeypatch):
    """Fault injection: with every piece a whole tensor above the workspace, consecutive results
    reuse one buffer; each write is slowed so that, without the wait, the next merge would overwrite
    bytes still being written."""
    _merge(family, tmp_path / "plain")
    monkeypatch.setattr(checkpoint, "CHUNK_ELEMENTS", 64)  # the workspace holds 64 entries: all whole
    real = writer.ShardedWriter.write

    def slow(self, name, tensor):
        time.sleep(0.05)
        return real(self, name, tensor)

    monkeypatch.setattr(writer.ShardedWriter, "write", slow)
    _merge(family, tmp_path / "slow")
    assert _bytes(tmp_path / "slow") == _bytes(tmp_path / "plain")


def test_a_whole_tensor_is_merged_only_after_the_previous_ones_write(family, tmp_path, monkeypatch):
    """The write of a whole tensor still reads the one result buffer, and while it runs the loading
    thread unmaps that tensor's inputs: a first pass beside it (tried in stop 31, to overlap the LM
    head's write with the embedding's first pass) had two whole tensors' pages mapped at once, peak
    RSS 898 → 1062 MB on the benchmark family. So nothing of the next whole tensor runs before."""
    if not compiled.AVAILABLE:
        pytest.skip("about the compiled passes")
    monkeypatch.setenv("METAMERGE_COMPILED", "1")
    monkeypatch.setattr(checkpoint, "CHUNK_ELEMENTS", 64)  # every piece is a whole tensor
    from metamerge.methods import ties_bands

    events: list[str] = []
    real_write, real_first = writer.ShardedWriter.write, ties_bands.first_pass

    def slow_write(self, name, tensor):
        events.append("write starts")
        time.sleep(0.1)
        events.append("write ends")
        return real_write(self, name, tensor)

    def first_pass(rows, lo, hi):
        events.append("first pass")
        return real_first(rows, lo, hi)

    monkeypatch.setattr(writer.ShardedWriter, "write", slow_write)
    monkeypatch.setattr(ties_bands, "first_pass", first_pass)
    _merge(family, tmp_path / "out")
    assert events.count("first pass") >= 2 and events.count("write starts") >= 2
    assert all(events[i:i + 2] != ["write starts", "first pass"] for i in range(len(events) - 1))


def test_a_merge_lets_its_first_pass_scratch_go(family, tmp_path, monkeypatch):
    """The scratch is kept from tensor to tensor, not after the merge (a worker process lives on)."""
    if not compiled.AVAILABLE:
        pytest.skip("about the compiled passes")
    monkeypatch.setenv("METAMERGE_COMPILED", "1")
    from metamerge.methods import ties_bands

    sizes = []
    real = ties_bands.Scratch.take

    def take(self, blocks, count):
        taken = real(self, blocks, count)
        sizes.append(self.buffer.size)
        return taken

    monkeypatch.setattr(ties_bands.Scratch, "take", take)
    _merge(family, tmp_path / "out")
    assert sizes and max(sizes) > 0
    assert ties_bands.SCRATCH.buffer.size == 0
