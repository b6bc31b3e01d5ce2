"""Writes that run on threads while the caller's thread goes on (the feature stage's shard, the
prediction stage's PNGs): at most ``limit`` of them wait, and each one's outcome, its error
included, reaches the caller's thread in the order they were handed over."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

# Mask PNGs that may wait for their threads in a prediction stage (a VOC-size mask is ~0.2 MB).
MASKS_IN_FLIGHT = 64


class BackgroundWrites:
    def __init__(self, executor: ThreadPoolExecutor, limit: int) -> None:
        self._executor, self._limit = executor, limit
        self._pending: collections.deque[tuple[Future, Callable[[], object] | None]] = collections.deque()

    def submit(self, write: Callable[..., object], *args: object, done: Callable[[], object] | None = None) -> None:
        """``write(*args)`` on a thread, and ``done()`` in the caller's thread once it has succeeded;
        waits while more than ``limit`` writes wait (their memory stays bounded)."""
        self._pending.append((self._executor.submit(write, *args), done))
        while len(self._pending) > self._limit:
            self._finish_oldest()

    def finish(self) -> None:
        """Wait for every write handed over, raising the first that failed."""
        while self._pending:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        future, done = self._pending.popleft()
        future.result()  # a failed write is raised here, in the caller's thread
        if done is not None:
            done()


@contextlib.contextmanager
def background_writes(threads: int, limit: int, name: str) -> Iterator[BackgroundWrites]:
    """Writes on ``threads`` threads named ``name``. The block ends only when the writes under way
    have: what they write (a shard, a folder) can be closed, or removed after an error, safely.
    Without an error in the block, every write's outcome is checked first."""
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix=name) as executor:
        writes = BackgroundWrites(executor, limit)
        yield writes
        writes.finish()
