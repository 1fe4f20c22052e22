"""Stage progress for whoever watches the run: the CLI draws it, a worker or a test draws nothing.

The pipeline's stages (resolve, extract, solve, merge, evaluate, gate, publish) report here,
not to a terminal: the core stays free of any display, Prefect tasks and Dask workers report
into the silent default, and the CLI installs a renderer for the duration of one command. Timings
are kept either way, because the run report prints them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class StageView(Protocol):
    """What a display implements; every call may come from any thread."""

    def started(self, scope: str, stage: str) -> None: ...

    def advanced(self, scope: str, stage: str, done: float, total: float) -> None: ...

    def finished(self, scope: str, stage: str, seconds: float) -> None: ...


class SilentView:
    def started(self, scope: str, stage: str) -> None:
        pass

    def advanced(self, scope: str, stage: str, done: float, total: float) -> None:
        pass

    def finished(self, scope: str, stage: str, seconds: float) -> None:
        pass


_lock = threading.Lock()
_view: StageView = SilentView()
_scope = ""


def view() -> StageView:
    return _view


def scope() -> str:
    """A label of the run the stages belong to (a method, in a comparison); empty for one run."""
    return _scope


@contextmanager
def showing(new_view: StageView) -> Iterator[StageView]:
    """Routes every stage report of this process to `new_view` until the block ends."""
    global _view
    with _lock:
        previous, _view = _view, new_view
    try:
        yield new_view
    finally:
        with _lock:
            _view = previous


@contextmanager
def scoped(label: str) -> Iterator[None]:
    global _scope
    previous, _scope = _scope, label
    try:
        yield
    finally:
        _scope = previous


def advance(stage: str, done: float, total: float) -> None:
    _view.advanced(_scope, stage, done, total)


class StageClock:
    """Wall time per stage, for the run report (cached stages show up as near zero), and the view."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        label = _scope
        _view.started(label, name)
        try:
            yield
        except BaseException as exc:
            if stage_of(exc) is None:  # the innermost stage is where it failed
                exc.metamerge_stage = name  # type: ignore[attr-defined]
            raise
        finally:
            elapsed = time.monotonic() - started
            self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 3)
            _view.finished(label, name, elapsed)


def stage_of(exc: BaseException) -> str | None:
    """The stage an exception escaped from, for an alert that says where a run failed.

    Carried on the exception itself (pickled with it), so a subflow's failure names its stage
    to the parent flow that re-raises it.
    """
    return getattr(exc, "metamerge_stage", None)
