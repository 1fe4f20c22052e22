"""What a user sees from `metamerge run`, in a real process: stages, the table, the URI; or one error line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.flowtools import zoo_recipe

pytestmark = pytest.mark.slow

# what the libraries print when nobody stops them (each was seen around the table before)
NOISE = ("Running loglikelihood", "Tokenizing inputs", "Loading weights", "Writing model shards", "Traceback",
         "| INFO", "| WARNING", "| ERROR", "it/s]")
STAGES = ("resolve", "extract", "solve", "merge", "evaluate", "publish")


def _cli(args: list[str], tmp_path: Path, recipe: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           # results of this run only: a cache hit would skip the very stages whose noise is checked
           "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "results")}
    env.pop("PREFECT_API_URL", None)
    for key in ("TQDM_DISABLE", "TRANSFORMERS_VERBOSITY", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"):
        env.pop(key, None)  # the CLI must quieten the libraries itself
    exe = Path(sys.executable).parent / "metamerge"
    return subprocess.run([str(exe), *args, str(path)], capture_output=True, text=True, env=env, timeout=600,
                          cwd=tmp_path)


def test_run_prints_one_line_per_stage_the_table_and_the_uri(zoo, s3_endpoint, bucket, tmp_path):
    recipe = zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work", skills=["capitals", "reverse"])
    out = _cli(["run"], tmp_path, recipe)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr == ""
    lines = out.stdout.splitlines()
    assert len(lines) <= 25, out.stdout
    for noise in NOISE:
        assert noise not in out.stdout, noise
    for stage in STAGES:
        assert sum(line.split()[1:2] == [stage] for line in lines if line.startswith("✓")) == 1, (stage, out.stdout)
    assert any(line.startswith("merged (metagpt)") for line in lines)
    assert any(line.startswith("published: s3://") for line in lines)
    # the libraries' output was kept, not lost: it is in the command's log file
    logs = list((tmp_path / "prefect-home" / "cli-logs").glob("run-*.log"))
    assert len(logs) == 1 and "loglikelihood" in logs[0].read_text()


def _broken(zoo, tmp_path: Path, recipe: dict) -> dict:
    name = "model.layers.0.mlp.up_proj.weight"
    bad = tmp_path / "reverse-bad"
    shutil.copytree(zoo.finetunes["reverse"], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors[name] = torch.zeros(7, 7)
    save_file(tensors, str(bad / "model.safetensors"))
    recipe["finetunes"][1]["ref"] = str(bad)
    return recipe


def test_a_failed_run_ends_with_one_error_line_and_no_traceback(zoo, s3_endpoint, bucket, tmp_path):
    recipe = _broken(zoo, tmp_path, zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work",
                                                skills=["capitals", "reverse"]))
    out = _cli(["run"], tmp_path, recipe)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: fine-tune 'reverse': tensor "), out.stderr
    assert "has shape [7, 7]" in out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert len(out.stdout.splitlines()) <= 6, out.stdout

    # --verbose shows what the quiet run kept in its log: Prefect's console logs, then the same error
    loud = _cli(["--verbose", "run"], tmp_path, recipe)
    assert loud.returncode == 1
    assert "| INFO    | prefect" in loud.stderr
    assert any(line.startswith("error: fine-tune 'reverse': tensor ") for line in loud.stderr.splitlines())
