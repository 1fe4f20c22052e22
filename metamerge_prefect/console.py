"""What a CLI user sees: our stage progress and the result, not the libraries' chatter.

lm-eval, transformers, datasets and Prefect each print progress bars or log lines to stderr;
around a merge they bury the one table that matters and, on failure, put a hundred lines of
traceback above the one `error:` line. Without `--verbose`, everything written to stderr during
a command (Python-level and file-descriptor-level, so child processes and C libraries too) goes
to a log file instead, and the command shows one progress line per stage. The Prefect UI still
gets every log: its API handler is untouched.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

# progress bars and chatter of third-party libraries, off unless --verbose
QUIET_ENV = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
}
NOISY_LOGGERS = ("lm_eval", "lm-eval", "transformers", "datasets", "accelerate", "filelock", "httpx", "botocore")


class RichStages:
    """One line per stage (one per scope in a comparison): spinner or bar, then ✓ and its time."""

    def __init__(self, stream: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

        self.console = Console(file=stream or sys.stdout, highlight=False)
        self.progress = Progress(
            SpinnerColumn(finished_text="[green]✓[/]"), TextColumn("{task.description:<28}"),
            BarColumn(bar_width=24), TextColumn("{task.fields[note]:>14}"),
            console=self.console, redirect_stdout=False, redirect_stderr=False,
        )
        self.rows: dict[str, int] = {}

    def __enter__(self) -> RichStages:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def _row(self, scope: str, stage: str) -> int:
        key = scope or stage
        if key not in self.rows:
            self.rows[key] = self.progress.add_task(key, total=None, note="")
        return self.rows[key]

    def started(self, scope: str, stage: str) -> None:
        row = self._row(scope, stage)
        self.progress.reset(row, total=None, description=f"{scope}: {stage}" if scope else stage, note="")

    def advanced(self, scope: str, stage: str, done: float, total: float) -> None:
        note = f"{done / 1e6:.0f}/{total / 1e6:.0f} MB" if stage == "merge" else f"{done:.0f}/{total:.0f}"
        self.progress.update(self._row(scope, stage), completed=done, total=max(total, 1), note=note)

    def finished(self, scope: str, stage: str, seconds: float) -> None:
        row = self._row(scope, stage)
        task = self.progress.tasks[row] if row < len(self.progress.tasks) else None
        total = (task.total if task is not None and task.total else None) or 1
        description = f"{scope}: done" if scope else stage
        self.progress.update(row, total=total, completed=total, description=description, note=f"{seconds:.1f}s")


def cli_log_path(command: str) -> Path:
    """Where a quiet command's stderr goes: beside Prefect's own files, one file per command."""
    home = Path(os.environ.get("PREFECT_HOME", ".prefect"))
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return home / "cli-logs" / f"{command}-{stamp}-{os.getpid()}.log"


_open_logs: list[TextIO] = []  # never closed: handlers configured meanwhile keep writing to them


@contextmanager
def quiet_stderr(log_path: Path, verbose: bool) -> Iterator[Path | None]:
    """Sends stderr (file descriptor 2 and sys.stderr) to `log_path` for the block, unless verbose."""
    if verbose:
        yield None
        return
    env_before = {key: os.environ.get(key) for key in QUIET_ENV}
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    console_handlers = _prefect_console_handlers()
    for handler, _level in console_handlers:
        handler.setLevel(logging.CRITICAL)
    _silence_library_progress()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - outlives the block on purpose
    _open_logs.append(log)
    saved_fd = None
    try:
        sys.stderr.flush()
        saved_fd = os.dup(2)
        os.dup2(log.fileno(), 2)
    except (OSError, ValueError):  # no real file descriptor 2 (an embedding host): Python level only
        saved_fd = None
    saved_stderr, sys.stderr = sys.stderr, log
    try:
        yield log_path
    finally:
        sys.stderr = saved_stderr
        if saved_fd is not None:
            log.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        for handler, level in console_handlers:
            handler.setLevel(level)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for key, value in env_before.items():  # an in-process caller (a test) gets its environment back
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _prefect_console_handlers() -> list[tuple[logging.Handler, int]]:
    """Prefect's console handlers configured before this block (an in-process caller, a test)."""
    if "prefect" not in sys.modules:
        return []  # configured later, from PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL
    from prefect.logging.handlers import PrefectConsoleHandler

    found = []
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler) and all(handler is not h for h, _ in found):
                found.append((handler, handler.level))
    return found


def _silence_library_progress() -> None:
    """Libraries already imported read their environment once: tell them directly."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
