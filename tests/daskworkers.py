"""Dask workers that share nothing on disk: each sees its own folder at the recipe's workdir path.

A LocalCluster's workers share one disk, so a task that reads a file another worker wrote
locally passes there and fails on a real multi-machine cluster. Here each worker process runs in
its own mount namespace where the workdir path is bind-mounted to a private folder: what passes
is only what a cluster of separate machines could do (everything else goes through S3).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def _unshare_prefix() -> list[str] | None:
    """The command prefix that gives a process its own mount namespace here, or None."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "--mount", "--propagation", "private"],
                   ["unshare", "--mount", "--propagation", "private", "--map-root-user"]):
        probe = subprocess.run([*prefix, "sh", "-c", "mount --bind / /mnt 2>/dev/null || mount --bind /tmp /tmp"],
                               capture_output=True, timeout=30)
        if probe.returncode == 0:
            return prefix
    return None


@dataclass
class PrivateWorkers:
    address: str
    folders: list[Path]  # what each worker sees at the workdir path
    processes: list[subprocess.Popen]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]


@contextlib.contextmanager
def private_workers(workdir: Path, root: Path, env: dict[str, str], resources: list[str | None],
                    ) -> Iterator[PrivateWorkers]:
    """A scheduler plus one worker per `resources` entry (e.g. "GPU=1" or None), 1 thread, no nanny.

    A worker killed with SIGKILL is gone for good (no nanny restarts it): its tasks go to the others.
    """
    from distributed import Client, LocalCluster

    prefix = _unshare_prefix()
    if prefix is None:
        pytest.skip("needs mount namespaces (unshare --mount) to give each Dask worker its own disk")
    workdir.mkdir(parents=True, exist_ok=True)
    folders, processes = [], []
    with LocalCluster(n_workers=0, processes=True, dashboard_address=None) as cluster:
        try:
            for index, resource in enumerate(resources):
                folder = root / f"worker-{index}"
                folder.mkdir(parents=True)
                folders.append(folder)
                extra = f" --resources {resource}" if resource else ""
                script = (f'mount --bind "$1" "$2" && exec "$3" -m distributed.cli.dask_worker "$4" --nthreads 1 '
                          f'--memory-limit 3GiB --no-dashboard --no-nanny --name private-{index}{extra}')
                processes.append(subprocess.Popen(
                    [*prefix, "sh", "-c", script, "sh", str(folder), str(workdir), sys.executable,
                     cluster.scheduler_address],
                    env={**os.environ, **env}, start_new_session=True,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            with Client(cluster.scheduler_address) as client:
                deadline = time.monotonic() + 120
                while len(client.scheduler_info(n_workers=-1)["workers"]) < len(resources):
                    assert time.monotonic() < deadline, "private Dask workers did not start"
                    assert all(p.poll() is None for p in processes), "a private Dask worker exited at start"
                    time.sleep(0.2)
            yield PrivateWorkers(cluster.scheduler_address, folders, processes)
        finally:
            for process in processes:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
