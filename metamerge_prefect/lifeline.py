"""No process of ours outlives the command that started it, even when that command is SIGKILLed.

Prefect's ephemeral API server, Dask workers and other helpers are child processes; when the
command dies by SIGKILL nothing runs its clean-up, and they would live on as orphans. `install()`
tags this process's environment with a fresh token (every child started afterwards inherits it)
and starts a tiny watchdog: it waits, without polling, for this process to exit (a pidfd;
`getppid()` polling where pidfds are missing) and then terminates (SIGTERM, then SIGKILL after
3 s) every process whose environment carries the token. On a normal exit there is nothing left
to kill and the watchdog just exits. Linux only (it reads /proc); a no-op elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

ENV = "METAMERGE_LIFELINE"

_WATCHDOG = r"""
import os, select, signal, sys, time
parent, token = int(sys.argv[1]), sys.argv[2]
me = os.getpid()
try:
    fd = os.pidfd_open(parent)
    select.select([fd], [], [])  # readable once the parent has exited, however it died
except (AttributeError, OSError):
    while os.getppid() == parent:
        time.sleep(0.2)
needle = ("%s=%s" % (sys.argv[3], token)).encode()

def tagged():
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open("/proc/%s/environ" % name, "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            pass
    return found

for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
    pids = tagged()
    if not pids:
        break
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and tagged():
        time.sleep(0.1)
"""

_watchdog: subprocess.Popen | None = None


def install() -> str | None:
    """Tags this process's future children and starts the watchdog (once per process); returns the token."""
    global _watchdog
    if _watchdog is not None:
        return os.environ.get(ENV)
    if not sys.platform.startswith("linux") or not os.path.isdir("/proc"):
        return None
    token = uuid.uuid4().hex
    os.environ[ENV] = token
    # its own session: a Ctrl-C to the terminal's process group does not stop it before it cleans up;
    # a minimal environment: it carries neither the token nor PREFECT_HOME
    _watchdog = subprocess.Popen(
        [sys.executable, "-I", "-c", _WATCHDOG, str(os.getpid()), token, ENV],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, env={"PATH": os.environ.get("PATH", "")},
    )
    return token

