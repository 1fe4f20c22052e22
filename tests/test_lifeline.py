"""Issue 13 #3: no process of ours outlives the command, even when the command is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.flowtools import tagged_processes

REPO = Path(__file__).resolve().parent.parent


def _wait_until_gone(key: str, value: str, timeout: float = 15.0) -> float:
    started = time.monotonic()
    while tagged_processes(key, value):
        assert time.monotonic() - started < timeout, f"still running: {tagged_processes(key, value)}"
        time.sleep(0.1)
    return time.monotonic() - started


def test_children_die_with_a_sigkilled_parent(tmp_path):
    """Any child (here two levels of them) is terminated once the process that installed the lifeline dies."""
    code = ("import subprocess, sys, time; from metamerge_prefect import lifeline; lifeline.install(); "
            "subprocess.Popen([sys.executable, '-c', 'import subprocess, time; "
            "subprocess.Popen([\"sleep\", \"600\"]); time.sleep(600)']); print('ready', flush=True); time.sleep(600)")
    marker = f"lifeline-test-{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "LIFELINE_TEST": marker}
    parent = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 10
    while len(tagged_processes("LIFELINE_TEST", marker)) < 3:  # parent, python child, sleep grandchild
        assert time.monotonic() < deadline, tagged_processes("LIFELINE_TEST", marker)
        time.sleep(0.05)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    print(f"children gone {_wait_until_gone('LIFELINE_TEST', marker):.2f}s after SIGKILL")


@pytest.mark.slow
def test_sigkill_of_metamerge_run_leaves_no_prefect_server(zoo, s3_endpoint, bucket, tmp_path):
    from tests.flowtools import zoo_recipe

    recipe = zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    home = str(tmp_path / "prefect-home")
    marker = tmp_path / "hang"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": home, "METAMERGE_TEST_HANG_AT": "merge",
           "METAMERGE_TEST_HANG_MARKER": str(marker)}
    env.pop("PREFECT_API_URL", None)
    cli = subprocess.Popen([sys.executable, "-c", "from metamerge_prefect.cli import main; main()", "run", str(path)],
                           cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert cli.poll() is None, cli.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    ours = tagged_processes("PREFECT_HOME", home)
    assert cli.pid in ours and len(ours) >= 2, ours  # the CLI and its ephemeral Prefect server
    cli.send_signal(signal.SIGKILL)
    cli.wait()
    print(f"ephemeral Prefect server gone {_wait_until_gone('PREFECT_HOME', home):.2f}s after SIGKILL of the CLI")
