"""TIES trims remembered between merges (engine/thresholds.py): same bytes, one pass, never trusted."""

from __future__ import annotations

import json

import pytest

from metamerge.engine.coefficients import solve_constant
from metamerge.engine.merge import merge_checkpoints
from metamerge.engine.thresholds import ThresholdCache
from metamerge.methods import compiled, ties, ties_bands
from tests.helpers import TIES_LABELS, random_family, safetensors_bytes, ties_family, ties_plan

PLAN = ties_plan()
LABELS = TIES_LABELS


@pytest.fixture
def family(tmp_path):
    return ties_family(tmp_path)


def _merge(family, out, cache=None, count=3):
    base_dir, finetunes = family
    return merge_checkpoints(base_dir, finetunes[:count], solve_constant(LABELS[:count], 1.0, "ties"), PLAN, out,
                             device="cpu", thresholds=cache)


_bytes = safetensors_bytes


def _cache(tmp_path, count=3):
    return ThresholdCache(tmp_path / "trims", [f"key-{label}" for label in LABELS[:count]])


@pytest.fixture(autouse=True)
def _compiled_passes(monkeypatch):
    if not compiled.AVAILABLE:
        pytest.skip("remembered trims are used by the compiled passes")
    monkeypatch.setenv("METAMERGE_COMPILED", "1")


def test_a_second_merge_reuses_every_trim_and_writes_the_same_bytes(family, tmp_path, monkeypatch):
    plain = _merge(family, tmp_path / "plain")
    first = _merge(family, tmp_path / "first", _cache(tmp_path))
    assert (first.ties_tensors, first.ties_selected) == (2, 2)
    files = sorted((tmp_path / "trims").glob("*.json"))
    assert [f.name for f in files] == [f"key-{label}.json" for label in LABELS]
    stored = json.loads(files[0].read_text())["tensors"]
    assert sorted(stored) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]

    selections = []
    monkeypatch.setattr(ties, "_brackets", lambda *a: selections.append(a) or pytest.fail("selected again"))
    second = _merge(family, tmp_path / "second", _cache(tmp_path))
    assert (second.ties_tensors, second.ties_selected) == (2, 0) and not selections
    assert _bytes(tmp_path / "first") == _bytes(tmp_path / "plain") == _bytes(tmp_path / "second")
    for row, plain_row in zip(second.gram, plain.gram, strict=True):  # the one pass makes the diagnostics too
        assert row == pytest.approx(plain_row, rel=1e-6)


@pytest.mark.parametrize("damage", ["tampered", "garbage", "deleted", "old version"])
def test_a_damaged_trim_file_costs_a_selection_never_a_byte(family, tmp_path, damage):
    _merge(family, tmp_path / "first", _cache(tmp_path))
    path = tmp_path / "trims" / "key-ft1.json"
    original = ThresholdCache(tmp_path / "trims", ["key-ft1"]).known[0]
    data = json.loads(path.read_text())
    if damage == "tampered":  # a plausible but wrong threshold: only the kept count can tell
        name = "model.layers.1.self_attn.q_proj.weight"
        data["tensors"][name][0] *= 0.999
        path.write_text(json.dumps(data))
    elif damage == "garbage":
        path.write_bytes(b"\x00{not json")
    elif damage == "deleted":
        path.unlink()
    else:
        data["version"] = 0
        path.write_text(json.dumps(data))
    again = _merge(family, tmp_path / "again", _cache(tmp_path))
    assert _bytes(tmp_path / "again") == _bytes(tmp_path / "first")
    assert again.ties_selected == (1 if damage == "tampered" else 2)
    assert ThresholdCache(tmp_path / "trims", ["key-ft1"]).known[0] == original  # the right trims again


def test_trims_of_another_merge_saved_meanwhile_are_kept(tmp_path):
    one, two = (ThresholdCache(tmp_path, ["k"]) for _ in range(2))
    one.learn("a", [(0.5, 7)])
    two.learn("b", [(0.25, 3)])
    assert one.save() == [] and two.save() == []
    assert ThresholdCache(tmp_path, ["k"]).known[0] == {"a": (0.5, 7), "b": (0.25, 3)}


def test_an_unwritable_trims_folder_leaves_the_merge_committed(family, tmp_path):
    """Fault injection (works as root too): the trims folder's parent is a file."""
    (tmp_path / "file").write_text("not a folder")
    cache = ThresholdCache(tmp_path / "file" / "trims", [f"key-{label}" for label in LABELS])
    report = _merge(family, tmp_path / "out", cache)
    assert _bytes(tmp_path / "out") and report.ties_selected == 2
    assert len(report.ties_trims_unsaved) == 3 and "key-ft0.json" in report.ties_trims_unsaved[0]


def test_a_new_fine_tune_is_selected_alone(family, tmp_path, monkeypatch):
    """The nightly case: yesterday's two fine-tunes are remembered, today's third is counted by a
    first pass over the base and itself only; the merge is that of a plain three-way merge."""
    _merge(family, tmp_path / "yesterday", _cache(tmp_path, count=2), count=2)
    passes = []
    first_pass = ties_bands.first_pass
    monkeypatch.setattr(ties_bands, "first_pass", lambda rows, lo, hi: passes.append(len(rows)) or first_pass(rows, lo, hi))
    today = _merge(family, tmp_path / "today", _cache(tmp_path))
    assert passes == [2, 2]  # base + the new fine-tune, for each of the two big tensors
    assert (today.ties_tensors, today.ties_selected) == (2, 2)
    monkeypatch.setattr(ties_bands, "first_pass", first_pass)
    _merge(family, tmp_path / "plain", None)
    assert _bytes(tmp_path / "today") == _bytes(tmp_path / "plain")
    assert len(ThresholdCache(tmp_path / "trims", ["key-ft2"]).known[0]) == 2  # learned for tomorrow


def test_nan_in_a_new_fine_tune_is_named_when_the_others_are_remembered(family, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from metamerge.errors import CheckpointError

    _merge(family, tmp_path / "yesterday", _cache(tmp_path, count=2), count=2)
    _, finetunes = family
    shard = next(finetunes[2][1].glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["model.layers.1.self_attn.q_proj.weight"][3, 4] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"fine-tune 'ft2': tensor 'model.layers.1.self_attn.q_proj.weight'.*NaN"):
        _merge(family, tmp_path / "today", _cache(tmp_path))
    assert not (tmp_path / "today").exists()
    assert torch.isnan(load_file(shard)["model.layers.1.self_attn.q_proj.weight"]).any()  # (the input is untouched)


def test_the_merge_command_remembers_trims_in_its_workdir(tmp_path, monkeypatch):
    """`metamerge merge` (and the flow's merge stage) keep the trims under workdir/trims, named by content."""
    import yaml
    from typer.testing import CliRunner

    from metamerge_prefect.cli import app

    base, fts, *_ = random_family(tmp_path / "models", n_finetunes=3, hidden=300)
    recipe = {"name": "t", "base": str(base), "finetunes": [str(f) for f in fts], "method": "ties",
              "merge": {"device": "cpu", "max_relative_norm": None}, "workdir": str(tmp_path / "work")}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    runner = CliRunner()
    first = runner.invoke(app, ["merge", str(path), "--out", str(tmp_path / "one")])
    assert first.exit_code == 0, first.output
    assert len(list((tmp_path / "work" / "trims").glob("*.json"))) == 3
    monkeypatch.setattr(ties, "_brackets", lambda *a: pytest.fail("the second merge selected again"))
    second = runner.invoke(app, ["merge", str(path), "--out", str(tmp_path / "two")])
    assert second.exit_code == 0, second.output
    assert _bytes(tmp_path / "one") == _bytes(tmp_path / "two")
