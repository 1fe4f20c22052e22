"""Issue 13 #1 and #6: metamerge never deletes, moves or overwrites what it did not write; it cleans
up only its own temporaries whose owner is dead. Real CLI processes, real files, real SIGKILLs."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from metamerge_prefect.cli import app
from tests.helpers import random_family

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def family(tmp_path):
    base, fts, *_ = random_family(tmp_path / "models", n_finetunes=2)
    recipe = {"name": "m", "base": str(base), "finetunes": [str(f) for f in fts], "method": "average",
              "merge": {"device": "cpu"}, "workdir": str(tmp_path / "work")}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, base, fts, tmp_path


def _merge(recipe: Path, out: Path, *extra: str):
    return runner.invoke(app, ["merge", str(recipe), "--out", str(out), *extra])


def _error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_out_with_a_users_files_is_refused_and_untouched(family):
    recipe, _, _, tmp_path = family
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "data").mkdir()
    (out / "data" / "x.csv").write_text("1,2")
    before = _tree_digest(out)
    result = _merge(recipe, out)
    assert result.exit_code == 1
    assert "exists, is not empty and was not written by metamerge" in _error_line(result)
    assert _tree_digest(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mine")]


def test_out_equal_to_inside_or_containing_an_input_is_refused(family):
    recipe, base, fts, tmp_path = family
    before = _tree_digest(tmp_path / "models")
    for out, words in [(base, "is the base folder"), (base / "merged", "is inside the base folder"),
                       (fts[1], "is the fine-tune 'ft1' folder"), (tmp_path / "models", "contains the base folder"),
                       (tmp_path / "work" / "out", "is inside the workdir folder")]:
        for flags in ([], ["--replace"]):  # refused always, even when replacing is allowed
            result = _merge(recipe, out, *flags)
            assert result.exit_code == 1, (out, flags, result.output)
            assert words in _error_line(result), (out, result.output)
    assert _tree_digest(tmp_path / "models") == before  # the base's sha256 never changes


def test_out_that_is_a_file_is_refused_and_not_renamed(family):
    recipe, _, _, tmp_path = family
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    for flags in ([], ["--replace"]):
        result = _merge(recipe, target, *flags)
        assert result.exit_code == 1 and "exists and is not a folder" in _error_line(result), result.output
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_replace_only_an_earlier_merge_output(family):
    from metamerge.io import outputs

    recipe, _, _, tmp_path = family
    out = tmp_path / "merged"
    assert _merge(recipe, out).exit_code == 0
    assert (out / outputs.OUTPUT_MARKER).exists() and (out / "model.safetensors").exists()
    again = _merge(recipe, out)
    assert again.exit_code == 1 and "pass --replace to replace it" in _error_line(again)
    replaced = _merge(recipe, out, "--replace")
    assert replaced.exit_code == 0, replaced.output
    (out / "my-notes.md").write_text("mine")
    refused = _merge(recipe, out, "--replace")
    assert refused.exit_code == 1 and "was not written by metamerge" in _error_line(refused)
    assert (out / "my-notes.md").read_text() == "mine"


def test_workdir_and_local_publish_target_follow_the_same_rule(family, tmp_path):
    from metamerge.errors import OutputError
    from metamerge.pipeline.preflight import preflight
    from metamerge.recipe import load_recipe

    recipe, base, _, _ = family
    data = yaml.safe_load(recipe.read_text())
    for key, value, words in [("workdir", str(base), "workdir"), ("workdir", str(base.parent), "workdir"),
                              ("publish", {"target": str(base / "pub")}, "publish target")]:
        changed = {**data, key: value}
        path = tmp_path / "changed.yaml"
        path.write_text(yaml.safe_dump(changed))
        with pytest.raises(OutputError, match=words):
            preflight(load_recipe(path))


def test_local_publish_never_writes_into_a_run_folder_it_did_not_create(tmp_path):
    from metamerge.errors import OutputError
    from metamerge.io.publish import publish_run

    (tmp_path / "a.bin").write_bytes(b"a")
    run_dir = tmp_path / "pub" / "m" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "a.bin").write_text("someone else's")
    with pytest.raises(OutputError, match="was not written by metamerge"):
        publish_run({"a.bin": tmp_path / "a.bin"}, str(tmp_path / "pub"), "m", "r1")
    assert (run_dir / "a.bin").read_text() == "someone else's" and sorted(os.listdir(run_dir)) == ["a.bin"]
    (tmp_path / "pub" / "m" / "latest.json").write_text("not ours")
    with pytest.raises(OutputError, match="latest.json exists and was not written by metamerge"):
        publish_run({"a.bin": tmp_path / "a.bin"}, str(tmp_path / "pub"), "m", "r2")
    assert (tmp_path / "pub" / "m" / "latest.json").read_text() == "not ours"


# --- #6: temporaries of killed runs ---------------------------------------------------------------


def _cli(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-c", "from metamerge_prefect.cli import main; main()", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_merge_cleans_the_temporary_a_killed_merge_left(family):
    from metamerge.io import outputs

    recipe, _, _, tmp_path = family
    out = tmp_path / "merged"
    marker = tmp_path / "hang"
    proc = _cli("merge", str(recipe), "--out", str(out),
                env_extra={"METAMERGE_TEST_HANG_AT": "merge", "METAMERGE_TEST_HANG_MARKER": str(marker)})
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    left = list(tmp_path.glob(".merged.tmp-*"))
    assert len(left) == 1 and (left[0] / outputs.TEMP_MARKER).exists()
    # a temporary whose owner lives, and a look-alike folder that is not ours, are never touched
    live = outputs.make_temp(out)
    foreign = tmp_path / ".merged.tmp-1-notours"
    foreign.mkdir()
    (foreign / "precious").write_text("x")
    try:
        done = _cli("merge", str(recipe), "--out", str(out))
        stdout, stderr = done.communicate(timeout=300)
        assert done.returncode == 0, stderr
        assert not left[0].exists(), "the dead run's temporary is removed"
        assert live.path.exists() and (foreign / "precious").exists()
        assert (out / "model.safetensors").exists()
    finally:
        live.discard()


def test_a_temporary_is_reclaimed_only_once_its_owner_is_dead(tmp_path):
    """The lock, not the pid, decides: a live owner (another process) keeps its folder."""
    from metamerge.io import outputs

    out = tmp_path / "out"
    code = ("import sys, time; from pathlib import Path; from metamerge.io import outputs; "
            "t = outputs.make_temp(Path(sys.argv[1])); print(t.path, flush=True); time.sleep(600)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    owner = subprocess.Popen([sys.executable, "-c", code, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    path = Path(owner.stdout.readline().strip())
    try:
        assert outputs.remove_stale_temporaries(out) == [] and path.exists()
    finally:
        owner.kill()
        owner.wait()
    assert outputs.remove_stale_temporaries(out) == [path] and not path.exists()
