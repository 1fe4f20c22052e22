"""Read-ahead: load piece i+1 on a background thread while piece i is being computed.

A pass over checkpoints alternates between copying bytes out of the page cache (or S3) and
arithmetic on them; on a machine with two or more cores the two overlap, so a pass costs the
larger of the two instead of their sum. Loads go into two alternating slots of reused buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

Loaded = TypeVar("Loaded")


def read_ahead(count: int, load: Callable[[int, int], Loaded]) -> Iterator[Loaded]:
    """Yields load(0, slot 0), load(1, slot 1), load(2, slot 0)…, each started while the previous is used.

    `load(index, slot)` must write only into buffers of `slot`: the consumer is still reading
    the other slot's. A load's exception is raised where its result is taken. The generator lets
    go of piece i before it starts loading piece i+2, so a consumer that drops piece i before
    asking for i+1 holds at most two pieces (mapped pieces count in memory while referenced).
    The last reference goes on the loading thread: unmapping a mapped piece costs about 25 ms
    per GB of page-table teardown, which the consumer's thread then spends computing instead.
    """
    if count == 0:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
        pending: Future | None = pool.submit(load, 0, 0)
        try:
            for index in range(count):
                loaded = pending.result()
                # the finished future would keep its result alive: rebinding drops it here, where `loaded` still holds it
                pending = pool.submit(load, index + 1, (index + 1) % 2) if index + 1 < count else None
                yield loaded
                pool.submit(_let_go, loaded)  # queued before the load of piece index + 2
                del loaded
        finally:
            if pending is not None:
                pending.cancel()


def _let_go(piece: object) -> None:
    """Runs on the loading thread, which then drops the work item holding the last reference."""
