"""Issue 13 #8: merges that make no sense do not pass silently.

- each fine-tune's relative task-vector norm ‖τ_t‖/‖θ₀‖ is reported (CLI, report.md, λ artifact),
  and above `merge.max_relative_norm` the run fails naming the fine-tune and the number;
- NaN/Inf in the base is blamed on the base;
- vocabulary rows dropped under `vocab: base` are reported per fine-tune.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from metamerge.engine.coefficients import solve_constant
from metamerge.engine.merge import merge_checkpoints
from metamerge.engine.taskvectors import extract_stats
from metamerge.errors import CheckpointError
from metamerge.methods.plan import MergePlan
from tests.helpers import random_family, write_checkpoint

REPO = Path(__file__).resolve().parent.parent


def _cli_merge(recipe: dict, tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", "from metamerge_prefect.cli import main; main()", "merge", str(path),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    return done, time.monotonic() - started


def _direct_relative_norm(base_dir: Path, ft_dir: Path) -> float:
    base = {}
    for f in base_dir.glob("*.safetensors"):
        base.update(load_file(str(f)))
    ft = {}
    for f in ft_dir.glob("*.safetensors"):
        ft.update(load_file(str(f)))
    floats = [k for k, v in base.items() if v.is_floating_point()]
    tau = sum(float(((ft[k].double() - base[k].double()) ** 2).sum()) for k in floats)
    theta = sum(float((base[k].double() ** 2).sum()) for k in floats)
    return math.sqrt(tau / theta)


def test_relative_norm_is_the_task_vectors_norm_over_the_bases(tmp_path):
    base, fts, *_ = random_family(tmp_path, n_finetunes=2)
    for i, ft in enumerate(fts):
        stats = extract_stats(base, ft, f"ft{i}", MergePlan(sparsify="magnitude", density=0.2))
        assert stats.relative_norm == pytest.approx(_direct_relative_norm(base, ft), rel=1e-6)


def test_raw_and_base_norms_are_one_float_whatever_the_sparsification(tmp_path):
    """‖τ‖² before sparsifying and ‖θ₀‖² are the same sums (norms' fixed order) on every path: the plain
    norm pass (fused, mapped), TIES' and DARE's (read, then trimmed in place). A float32 dot, which
    the sparsified path used for ‖τ‖² and every path for ‖θ₀‖², differs in the last bits."""
    base, fts, *_ = random_family(tmp_path, n_finetunes=1)
    plans = [MergePlan(), MergePlan(sparsify="magnitude", density=0.2), MergePlan(sparsify="random", density=0.5, seed=3)]
    stats = [extract_stats(base, fts[0], "ft0", plan) for plan in plans]
    assert len({(s.raw_sq_norm, s.base_sq_norm) for s in stats}) == 1, [(s.raw_sq_norm, s.base_sq_norm) for s in stats]
    assert stats[0].raw_sq_norm == stats[0].total_sq_norm
    # what the sparsified merges weigh: TIES' trim keeps a fifth, DARE's survivors are rescaled by 1/p
    assert stats[1].total_sq_norm < 0.9 * stats[1].raw_sq_norm < stats[2].total_sq_norm
    assert math.sqrt(stats[0].raw_sq_norm / stats[0].base_sq_norm) == pytest.approx(_direct_relative_norm(base, fts[0]),
                                                                                   rel=1e-9)


@pytest.mark.parametrize("method", ["metagpt", "task_arithmetic", "ties"])
def test_finetunes_of_an_unrelated_init_fail_naming_the_finetune_and_the_number(tmp_path, method):
    """metagpt checks the extracted norms before merging; the others, the merge pass's own sums before committing."""
    base, *_ = random_family(tmp_path / "a", n_finetunes=1, seed=0)
    _, alien_fts, *_ = random_family(tmp_path / "b", n_finetunes=2, seed=1, scale=[0.01, 0.01])
    recipe = {"name": "m", "base": str(base), "finetunes": [str(f) for f in alien_fts], "method": method,
              "merge": {"device": "cpu"}, "workdir": str(tmp_path / "work")}
    done, elapsed = _cli_merge(recipe, tmp_path)
    assert done.returncode == 1
    expected = _direct_relative_norm(base, alien_fts[0])
    assert expected > 1.0  # independent weights: ‖θ_t − θ₀‖ ≥ ‖θ₀‖
    assert done.stderr.strip() == (f"error: fine-tune 'ft0': ‖τ‖/‖θ₀‖ = {expected:.3f} is above "
                                   "merge.max_relative_norm 0.8; it does not look like a fine-tune of this base")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    print(f"{done.stderr.strip()} ({elapsed:.1f}s)")

    recipe["merge"]["max_relative_norm"] = 2.0  # the bound is the recipe's
    done, _ = _cli_merge(recipe, tmp_path)
    assert done.returncode == 0, done.stderr
    assert f'"ft0": {round(expected, 4)}' in done.stdout and "‖τ‖/‖θ₀‖ per fine-tune" in done.stdout


def test_nan_in_the_base_is_blamed_on_the_base(tmp_path):
    base_dir, fts, base, _ = random_family(tmp_path, n_finetunes=2)
    broken = dict(base)
    broken["model.norm.weight"] = base["model.norm.weight"].clone()
    broken["model.norm.weight"][3] = float("nan")
    bad_base = write_checkpoint(tmp_path / "nan-base", broken)
    with pytest.raises(CheckpointError) as info:
        extract_stats(bad_base, fts[0], "ft0")
    assert str(info.value) == f"base {bad_base}: tensor 'model.norm.weight' contains NaN or Inf"
    with pytest.raises(CheckpointError) as info:
        merge_checkpoints(bad_base, [("ft0", fts[0]), ("ft1", fts[1])], solve_constant(["ft0", "ft1"], 0.5, "average"),
                          MergePlan(weighting="uniform"), tmp_path / "out", device="cpu")
    assert str(info.value) == f"base {bad_base}: tensor 'model.norm.weight' contains NaN or Inf"
    recipe = {"name": "m", "base": str(bad_base), "finetunes": [str(f) for f in fts], "merge": {"device": "cpu"},
              "workdir": str(tmp_path / "work")}
    done, _ = _cli_merge(recipe, tmp_path)
    assert done.returncode == 1 and done.stderr.strip() == f"error: base {bad_base}: tensor 'model.norm.weight' contains NaN or Inf"


def _with_added_tokens(tmp_path: Path, rows: int = 3):
    base_dir, fts, base, ft_tensors = random_family(tmp_path / "models", n_finetunes=2)
    grown = dict(ft_tensors[1])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        grown[name] = torch.cat([grown[name], torch.randn(rows, grown[name].shape[1])])
    big = write_checkpoint(tmp_path / "models" / "big", grown)
    return base_dir, [fts[0], big]


def test_dropped_vocabulary_rows_are_reported_by_merge(tmp_path):
    base_dir, fts = _with_added_tokens(tmp_path)
    recipe = {"name": "m", "base": str(base_dir), "finetunes": [str(f) for f in fts], "merge": {"device": "cpu"},
              "workdir": str(tmp_path / "work")}
    done, _ = _cli_merge(recipe, tmp_path)
    assert done.returncode == 0, done.stderr
    assert ("fine-tune 'big': 3 vocabulary row(s) beyond the base's dropped (vocab: base) from lm_head.weight, "
            "model.embed_tokens.weight") in done.stdout
    assert "fine-tune 'ft0'" not in done.stdout


def test_report_and_lambda_artifact_carry_norms_and_dropped_rows(tmp_path, isolated_results):
    from metamerge_prefect.flows.merge_flow import merge_flow
    from tests.flowtools import flow_artifacts

    base_dir, fts = _with_added_tokens(tmp_path)
    recipe = {"name": "m", "base": str(base_dir), "finetunes": [str(f) for f in fts], "merge": {"device": "cpu"},
              "workdir": str(tmp_path / "work"), "publish": {"target": str(tmp_path / "pub")}}
    state = merge_flow(recipe, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    norms = summary["relative_norms"]
    assert norms["ft0"] == pytest.approx(_direct_relative_norm(base_dir, fts[0]), rel=1e-6)
    assert summary["dropped_rows"] == {"big": {"lm_head.weight": 3, "model.embed_tokens.weight": 3}}
    report = (Path(summary["published"]["run_uri"]) / "report.md").read_text()
    assert "| fine-tune | λ | ‖τ‖/‖θ₀‖ |" in report and f"| {norms['ft0']:.4f} |" in report
    assert "## Vocabulary rows dropped (vocab: base)" in report and "| big | model.embed_tokens.weight | 3 |" in report
    records = flow_artifacts(state.state_details.flow_run_id, expect=("merge-coefficients",))["merge-coefficients"]
    assert {r["fine-tune"]: r["relative norm ‖τ‖/‖θ₀‖"] for r in records} == pytest.approx(norms, rel=1e-5)
    merge_report = json.loads((Path(summary["published"]["run_uri"]) / "merge_report.json").read_text())
    assert merge_report["dropped_rows"] == summary["dropped_rows"]


def test_extracting_together_reads_the_base_once_and_gives_the_same_bytes(tmp_path, monkeypatch):
    import dataclasses

    from metamerge.engine import checkpoint
    from metamerge.engine.taskvectors import extract_stats, extract_stats_many
    from metamerge.methods.plan import MergePlan
    from tests.helpers import random_family

    base_dir, ft_dirs, *_ = random_family(tmp_path, n_finetunes=3)
    for plan in (MergePlan(), dataclasses.replace(MergePlan(), sparsify="magnitude", density=0.3)):
        alone = [extract_stats(base_dir, d, f"ft{i}", plan) for i, d in enumerate(ft_dirs)]
        reads: list[tuple[str, str]] = []
        real_read, real_map = checkpoint.CheckpointReader.read_f32_into, checkpoint.CheckpointReader.mapped_f32

        def counting_read(self, name, out, rows=None, real=real_read, reads=reads):
            reads.append((self.label, "read"))
            return real(self, name, out, rows)

        def counting_map(self, name, rows=None, real=real_map, reads=reads):
            piece = real(self, name, rows)
            if piece is not None:
                reads.append((self.label, "mapped"))
            return piece

        monkeypatch.setattr(checkpoint.CheckpointReader, "read_f32_into", counting_read)
        monkeypatch.setattr(checkpoint.CheckpointReader, "mapped_f32", counting_map)
        together = extract_stats_many(base_dir, [(d, f"ft{i}") for i, d in enumerate(ft_dirs)], plan)
        monkeypatch.undo()
        assert together == alone  # every float sum identical, not just close
        per_input = {label: sum(1 for who, _ in reads if who == label) for label, _ in reads}
        assert per_input["base"] == per_input["ft0"] == per_input["ft1"] == per_input["ft2"] > 0
        # plain sums map the pieces (no copy); a sparsified pass trims in place, so it reads copies
        assert {how for _, how in reads} == ({"mapped"} if plan.sparsify == "none" else {"read"})


def test_read_ahead_yields_in_order_alternates_slots_and_leaves_no_thread():
    """The norm pass's read-ahead: piece i+1 loads into the other slot; an error surfaces where its
    piece is taken; closing early (a failed pass) waits for the load in flight, so no thread survives."""
    import threading

    from metamerge.engine.prefetch import read_ahead

    calls: list[tuple[int, int]] = []

    def load(index: int, slot: int) -> int:
        calls.append((index, slot))
        if index == 3:
            raise CheckpointError("piece 3 is corrupt")
        return index * 10

    pieces = read_ahead(5, load)
    assert [next(pieces), next(pieces), next(pieces)] == [0, 10, 20]
    with pytest.raises(CheckpointError, match="piece 3"):
        next(pieces)
    assert calls == [(0, 0), (1, 1), (2, 0), (3, 1)]

    started = threading.Event()

    def slow(index: int, slot: int) -> int:
        started.set()
        time.sleep(0.3 if index == 1 else 0)
        return index

    early = read_ahead(3, slow)
    assert next(early) == 0
    started.wait()
    early.close()  # piece 1 is still loading: close waits for it
    assert not [t for t in threading.enumerate() if t.name.startswith("read-ahead")]
    assert list(read_ahead(0, slow)) == []


def test_read_ahead_drops_each_piece_on_the_loading_thread_before_the_load_after_next():
    """A mapped piece is unmapped where its last reference goes: that must be the loading thread
    (the consumer's thread computes), and before piece i+2 is loaded (two pieces in flight)."""
    import threading

    from metamerge.engine.prefetch import read_ahead

    events: list[tuple[str, int, str]] = []

    class Piece:
        def __init__(self, index: int):
            self.index = index

        def __del__(self):
            events.append(("dropped", self.index, threading.current_thread().name))

    def load(index: int, slot: int) -> Piece:
        events.append(("loaded", index, threading.current_thread().name))
        return Piece(index)

    pieces = read_ahead(4, load)
    for _ in range(4):
        piece = next(pieces)
        del piece  # the consumer lets go before asking for the next one, as the merge loop does
    with pytest.raises(StopIteration):
        next(pieces)
    dropped = [e for e in events if e[0] == "dropped"]
    assert sorted(e[1] for e in dropped) == [0, 1, 2, 3]
    assert all(name.startswith("read-ahead") for _, _, name in dropped), dropped
    order = [(kind, index) for kind, index, _ in events]
    for index in range(2):
        assert order.index(("dropped", index)) < order.index(("loaded", index + 2))
