"""Per-shard merging (the scale-out path) writes exactly the bytes of a whole-model run."""

from __future__ import annotations

import json

import pytest
import torch

from metamerge.engine import checkpoint
from metamerge.engine.coefficients import solve_constant, solve_metagpt
from metamerge.engine.merge import merge_checkpoints
from metamerge.engine.shards import assemble_shard_files, merge_shard_file, output_shard_files
from metamerge.engine.taskvectors import extract_stats
from metamerge.errors import CheckpointError
from metamerge.methods.plan import MergePlan
from tests.helpers import random_family

LABELS = ["ft0", "ft1", "ft2"]
SHARD_MB = 1.5 / 1024  # 1.5 KB: the random family's tensors land in several shards

PLANS = {
    "metagpt": MergePlan(),
    "ties": MergePlan(sparsify="magnitude", density=0.3, consensus="ties", weighting="constant", normalize=True),
    "dare": MergePlan(sparsify="random", density=0.5, seed=7, weighting="constant", weight=0.4),
}


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("method", list(PLANS))
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_per_shard_merge_is_byte_identical_to_whole_model(tmp_path, monkeypatch, method, dtype):
    # small row chunks, so DARE's masks are keyed per chunk and chunks straddle nothing
    monkeypatch.setattr(checkpoint, "CHUNK_ELEMENTS", 100)
    base_dir, ft_dirs, _, _ = random_family(tmp_path / "in")
    finetunes = list(zip(LABELS, ft_dirs, strict=True))
    plan = PLANS[method]
    if plan.weighting == "metagpt":
        stats = [extract_stats(base_dir, d, label) for label, d in finetunes]
        coefficients = solve_metagpt(LABELS, {s.label: s.sq_norms for s in stats}, "layer")
    else:
        coefficients = solve_constant(LABELS, plan.weight, method)
    opts = {"dtype": dtype, "device": "cpu", "shard_size_mb": SHARD_MB}

    whole = merge_checkpoints(base_dir, finetunes, coefficients, plan, tmp_path / "whole", **opts)

    names = output_shard_files(base_dir, dtype, SHARD_MB)
    assert len(names) >= 3
    staged = tmp_path / "staged"
    staged.mkdir()
    # out of order, as workers would finish them
    reports = [merge_shard_file(base_dir, finetunes, coefficients, plan, staged, i, **opts) for i in reversed(range(len(names)))]
    assert sorted(r.filename for r in reports) == sorted(names)
    assert not [p for p in staged.iterdir() if p.name.startswith(".")], "temporary files left behind"
    final = assemble_shard_files(base_dir, reports, LABELS, tmp_path / "sharded", dtype=dtype, shard_size_mb=SHARD_MB)

    want, got = _files(tmp_path / "whole"), _files(tmp_path / "sharded")
    assert list(got) == list(want)
    for name in want:
        assert got[name] == want[name], name
    assert json.loads(got[checkpoint.INDEX_NAME])["weight_map"]  # the index itself is among the equal files
    torch.testing.assert_close(torch.tensor(final.gram), torch.tensor(whole.gram), rtol=1e-9, atol=1e-12)
    assert final.bytes_read == whole.bytes_read and final.bytes_written == whole.bytes_written
    assert (final.tensors, final.merged_tensors, final.copied_tensors) == (
        whole.tensors, whole.merged_tensors, whole.copied_tensors)
    assert final.delta_rounding_loss == pytest.approx(whole.delta_rounding_loss, rel=1e-9, abs=1e-12)


def test_finalize_refuses_a_missing_shard_and_leaves_nothing(tmp_path):
    base_dir, ft_dirs, _, _ = random_family(tmp_path / "in")
    finetunes = list(zip(LABELS, ft_dirs, strict=True))
    coefficients = solve_constant(LABELS, 0.3, "task_arithmetic")
    plan = MergePlan(weighting="constant", weight=0.3)
    staged = tmp_path / "staged"
    staged.mkdir()
    reports = [merge_shard_file(base_dir, finetunes, coefficients, plan, staged, i, device="cpu", shard_size_mb=SHARD_MB)
               for i in range(len(output_shard_files(base_dir, "auto", SHARD_MB)))]
    with pytest.raises(CheckpointError, match="do not match the plan"):
        assemble_shard_files(base_dir, reports[1:], LABELS, tmp_path / "out", shard_size_mb=SHARD_MB)
    # a shard whose bytes were cut short is caught by the whole-checkpoint verification
    truncated = staged / reports[0].filename
    truncated.write_bytes(truncated.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="truncated"):
        assemble_shard_files(base_dir, reports, LABELS, tmp_path / "out", shard_size_mb=SHARD_MB)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
    with pytest.raises(CheckpointError, match="does not exist"):
        merge_shard_file(base_dir, finetunes, coefficients, plan, staged, 99, device="cpu", shard_size_mb=SHARD_MB)
