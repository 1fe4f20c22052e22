"""The CLI's watch and inspect commands on a local registry and a local publish target."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from metamerge.io.publish import publish_run
from metamerge_prefect.cli import app
from tests.helpers import random_family

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("restore_environment")


@pytest.fixture
def local_setup(tmp_path):
    base_dir, ft_dirs, *_ = random_family(tmp_path / "models", n_finetunes=3)
    registry = tmp_path / "registry"
    for i, d in enumerate(ft_dirs[1:], start=1):
        target = registry / f"ft{i}"
        target.mkdir(parents=True)
        for f in d.iterdir():
            (target / f.name).write_bytes(f.read_bytes())
        (target / "finetune.json").write_text(json.dumps({"base": str(base_dir), "tasks": []}))
    alien = registry / "alien"
    alien.mkdir()
    (alien / "finetune.json").write_text(json.dumps({"base": "/elsewhere", "tasks": []}))
    recipe = {"name": "m", "base": str(base_dir), "finetunes": [str(ft_dirs[0])],
              "publish": {"target": str(tmp_path / "published")}, "workdir": str(tmp_path / "w")}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, registry, tmp_path


def test_watch_flow_finds_new_finetunes_and_then_none(local_setup, prefect_api):
    from metamerge_prefect.flows.watch_flow import watch_flow

    path, registry, tmp_path = local_setup
    result = watch_flow(str(path), str(registry))
    assert sorted(r.rsplit("/", 1)[-1] for r in result["new"]) == ["ft1", "ft2"]  # "alien" has another base
    assert result["event"]
    # once a merge with those inputs is published, nothing is new any more
    (tmp_path / "x").write_text("x")
    publish_run({"x": tmp_path / "x"}, str(tmp_path / "published"), "m", "r1",
                extra={"inputs": {"finetunes": [str((registry / n).resolve()) for n in ("ft1", "ft2")]}})
    assert watch_flow(str(path), str(registry)) == {"new": [], "event": None}


@pytest.mark.slow
def test_watch_command_in_its_own_process(local_setup):
    import os
    import subprocess
    import sys
    from pathlib import Path

    path, registry, tmp_path = local_setup
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    exe = Path(sys.executable).parent / "metamerge"
    out = subprocess.run([str(exe), "watch", str(path), str(registry)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "new fine-tunes:" in out.stdout and "ft1" in out.stdout and "alien" not in out.stdout


def test_inspect_shows_manifest_lambda_and_scores(tmp_path):
    docs = {"coefficients.json": json.dumps({"groups": {"model": [0.25, 0.75]}}),
            "scores.json": json.dumps({"records": [{"model": "merged", "avg_norm": 0.9}]})}
    files = {}
    for name, text in docs.items():
        (tmp_path / name).write_text(text)
        files[name] = tmp_path / name
    publish_run(files, str(tmp_path / "pub"), "m", "r1", extra={"method": "metagpt"})
    result = runner.invoke(app, ["inspect", str(tmp_path / "pub" / "m" / "r1")])
    assert result.exit_code == 0, result.output
    assert "run r1 of m (metagpt), 2 files" in result.output
    assert "[0.25, 0.75]" in result.output and "avg_norm=0.900" in result.output


def test_run_with_a_bad_recipe_is_one_line_and_exit_1(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\nbase: /b\nfinetunes: [/f]\nmethod: {name: ties, density: 7}\n")
    result = runner.invoke(app, ["run", str(bad)])
    assert result.exit_code == 1
    message = result.output.strip()
    assert message.startswith("error: ") and "method.density" in message
    assert "\n" not in message, message


def test_inspect_of_a_missing_local_run_says_so(tmp_path):
    """Issue 13 #10: not a raw `[Errno 2]`."""
    missing = tmp_path / "pub" / "m" / "no-such-run"
    result = runner.invoke(app, ["inspect", str(missing)])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: no published run at {missing}"


def test_inspect_of_a_missing_s3_run_says_so(s3_endpoint, bucket):
    """Issue 13 #10: not `error: s3://…/manifest.json`."""
    uri = f"s3://{bucket}/merges/m/no-such-run"
    result = runner.invoke(app, ["inspect", uri, "--endpoint-url", s3_endpoint])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: no published run at {uri}"
