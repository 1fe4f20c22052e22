"""Helpers for flow tests: recipes over the zoo, task-run states read back from the Prefect API."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from metamerge.io.s3 import s3_client

REPO = Path(__file__).resolve().parent.parent


def zoo_recipe(zoo, endpoint: str, bucket: str, workdir: Path, skills: list[str] | None = None, **overrides) -> dict:
    from metamerge_prefect.cli import demo_recipe

    recipe = demo_recipe(zoo, endpoint, workdir)
    recipe["publish"]["target"] = f"s3://{bucket}/merges"
    if skills is not None:
        recipe["finetunes"] = [f for f in recipe["finetunes"] if f["name"] in skills]
    recipe.update(overrides)
    return recipe


def task_runs(flow_run_id, timeout: float = 30.0, expect=()) -> list:
    """Every task run of one flow run, from the Prefect API, once each has a final state.

    Task runs and their states reach the API as events, a moment after the flow returns: wait
    until every task run has a final state, and until every name in `expect` has appeared
    (otherwise a run whose last task runs are not recorded yet would look complete). With no
    task run and nothing expected, it waits the whole `timeout` and returns [].
    """
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    expect = set(expect)
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            settled = all(run.state is not None and run.state.is_final() for run in runs)
            if settled and expect <= {run.name for run in runs} and (runs or expect):
                return runs
            if time.monotonic() > deadline:
                if settled and not runs and not expect:
                    return []  # a run that started no task (it failed before any), after waiting `timeout`
                missing = expect - {run.name for run in runs}
                raise AssertionError(f"task runs of {flow_run_id} not all recorded and final after {timeout}s "
                                     f"(missing {sorted(missing)}; states {[(r.name, r.state and r.state.name) for r in runs]})")
            time.sleep(0.5)


def task_states(flow_run_id, timeout: float = 30.0, expect=()) -> dict[str, list[str]]:
    """{task name: [final state names]} of one flow run (see `task_runs`)."""
    states: dict[str, list[str]] = defaultdict(list)
    for run in task_runs(flow_run_id, timeout, expect):
        states[run.name].append(run.state.name)
    return dict(states)


def together_name(labels: list[str]) -> str:
    """The task run that extracts several missing fine-tunes in one pass over the base."""
    return f"extract {labels} in one pass over the base"


def expected_task_names(recipe: dict, first_run: bool = False) -> set[str]:
    """The task runs merge_flow (local runner) creates for a recipe: what a complete run records.

    `first_run`: nothing extracted yet, so with several fine-tunes one task extracts them together.
    """
    from metamerge.recipe import parse_recipe

    rec = parse_recipe(recipe)
    names = {f"resolve {rec.base}", "solve", "merge"} | {f"resolve {ft.ref}" for ft in rec.finetunes}
    names |= {f"extract {ft.label}" for ft in rec.finetunes}
    if first_run and len(rec.finetunes) > 1:
        names.add(together_name([ft.label for ft in rec.finetunes]))
    if rec.evaluation is not None:
        tasks = list(dict.fromkeys(t for ft in rec.finetunes for t in ft.tasks))
        names |= {f"evaluate base on ('{t}',)" for t in tasks} | {f"evaluate merged on ('{t}',)" for t in tasks}
        names |= {f"evaluate {ft.label} on ('{t}',)" for ft in rec.finetunes for t in ft.tasks}
    if rec.gate is not None:
        names.add("quality gate")
    if rec.publish is not None:
        names |= {"publish", "nightly history", "register asset"}
    return names


def bucket_keys(endpoint: str, bucket: str) -> set[str]:
    listed = s3_client(endpoint).list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"] for o in listed}


def start_flow_subprocess(recipe: dict, env_extra: dict[str, str]) -> subprocess.Popen:
    """merge_flow in its own process (own ephemeral Prefect API), so a test can SIGKILL it.

    Like the CLI, it installs the lifeline: its Prefect server does not outlive it (issue 13 #3).
    """
    code = ("import json, sys; from metamerge_prefect import lifeline; lifeline.install(); "
            "from metamerge_prefect.flows.merge_flow import merge_flow; merge_flow(json.loads(sys.argv[1]))")
    env = {**os.environ, **env_extra}
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_HOME"] = SUBPROCESS_HOME
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(recipe)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


SUBPROCESS_HOME = str(REPO / ".cache" / "prefect-subprocess-home")


def tagged_processes(key: str, value: str) -> list[int]:
    """Pids (not this one) whose environment holds KEY=VALUE: what is left of a run with that setting."""
    needle = f"{key}={value}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            pass
    return found


def wait_for_no_process_of(home: str = SUBPROCESS_HOME, timeout: float = 15.0) -> float:
    """Seconds until no process with PREFECT_HOME=home is left; fails the test after `timeout`."""
    import time

    started = time.monotonic()
    while tagged_processes("PREFECT_HOME", home):
        assert time.monotonic() - started < timeout, f"left running: {tagged_processes('PREFECT_HOME', home)}"
        time.sleep(0.1)
    return time.monotonic() - started


def flow_artifacts(flow_run_id, expect: tuple[str, ...] = (), timeout: float = 30.0) -> dict[str, object]:
    """{artifact key: data} of one flow run, from the Prefect API, once every key in `expect` is there.

    On a loaded machine the API may list a run's artifacts a moment after the flow returned.
    """
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if set(expect) <= {a.key for a in artifacts} or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    out: dict[str, object] = {}
    for artifact in artifacts:
        data = artifact.data
        if isinstance(data, str) and data[:1] in "[{":
            with contextlib.suppress(ValueError):  # a link artifact's markdown, `[text](url)`, stays text
                data = json.loads(data)
        out[artifact.key] = data
    return out
