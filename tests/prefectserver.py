"""A real `prefect server` on a free loopback port, for tests that need one (deployments, Dask).

Ephemeral mode is not enough there: deployment workers and Dask worker processes must all
reach one API, which they find through PREFECT_API_URL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, step: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextmanager
def running_prefect_server(folder: Path) -> Iterator[dict]:
    """Starts the server with its own PREFECT_HOME under `folder`; stops it and everything in `processes`."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(folder / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_LOGGING_LEVEL": "INFO",
           "PREFECT_LOCAL_STORAGE_PATH": str(folder / "results")}
    env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    log = open(folder / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    processes = [server]
    try:
        wait_for(lambda: healthy(api) or server.poll() is not None, 120, "prefect server")
        assert server.poll() is None, (folder / "server.log").read_text()[-3000:]
        yield {"api": api, "url": f"http://127.0.0.1:{port}", "env": env, "processes": processes}
    finally:
        for proc in reversed(processes):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=15)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
        log.close()


@contextmanager
def using_api(api_url: str) -> Iterator[None]:
    """This process talks to `api_url` for the block, events included.

    Prefect keeps one events worker per process whose target is fixed when it starts; after
    another test's API (e.g. the session's test harness) it would keep sending task-run
    events there and task runs of this process would be missing from this server. Draining
    it before and after makes the next one start against the API in force.
    """
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    EventsWorker.drain_all()
    try:
        with temporary_settings({PREFECT_API_URL: api_url}):
            yield
            EventsWorker.drain_all()
    finally:
        EventsWorker.drain_all()


def events(api: str, names: list[str], resource_ids: list[str] | None = None) -> list[dict]:
    """Events of these names (last day) from the server's event log, through its REST API."""
    import json

    body: dict = {"filter": {"event": {"name": names}}, "limit": 50}  # the most one page holds
    if resource_ids:
        body["filter"]["resource"] = {"id": resource_ids}
    request = urllib.request.Request(f"{api}/events/filter", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["events"]


def browse(url: str, profile: Path, screenshot: Path | None = None, expect: tuple[str, ...] = (),
           attempts: int = 3) -> str | None:
    """The DOM headless Chromium renders for `url` (None without Chromium: `make browser`).

    The UI is a single-page app: on a loaded 2-core machine its API calls can still be pending
    when Chromium's virtual time budget runs out, and the DOM is the bare shell (seen in CI on
    the artifacts page). So the page is rendered again, up to `attempts` times, until every
    string in `expect` is in it; callers still assert on what comes back. With `screenshot`,
    the last render is also saved as a PNG; a failed screenshot is a warning, since the DOM is
    what tests assert on and the picture is documentation.
    """
    import shutil
    import warnings

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        warnings.warn("chromium is not installed: the Prefect UI was not checked (make browser)", stacklevel=2)
        return None
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--window-size=1400,1000"]
    dom = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(2 * attempt)
        dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True,
                             timeout=120).stdout
        if all(text in dom for text in expect):
            break
    if screenshot is not None:
        taken = subprocess.run([chromium, *flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
        if taken.returncode != 0 or not screenshot.exists() or screenshot.stat().st_size < 10_000:
            warnings.warn(f"no usable screenshot of {url}: {taken.stderr[-500:]!r}", stacklevel=2)
    return dom


def screenshot_folder(tmp_path: Path) -> Path:
    """docs/img with METAMERGE_UPDATE_SCREENSHOT=1 (to refresh the docs' pictures), else tmp_path."""
    repo = Path(__file__).resolve().parent.parent
    return repo / "docs" / "img" if os.environ.get("METAMERGE_UPDATE_SCREENSHOT") == "1" else tmp_path
