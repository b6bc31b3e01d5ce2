"""pipeline.background: writes on threads whose outcomes reach the caller's thread."""

from __future__ import annotations

import threading

import pytest

from pipeline.background import background_writes


def test_writes_run_on_threads_in_order_and_never_more_than_the_limit_wait():
    started, release, done = [], threading.Event(), []

    def write(number: int) -> None:
        started.append((number, threading.current_thread()))
        release.wait(timeout=60)

    with background_writes(1, 2, "t") as writes:
        writes.submit(write, 0, done=lambda: done.append(0))
        writes.submit(write, 1, done=lambda: done.append(1))
        assert done == []  # two wait (the first still writing): the caller is not held back
        release.set()
        writes.submit(write, 2, done=lambda: done.append(2))  # a third: the oldest must end first
        assert done == [0]
        writes.submit(write, 3, done=lambda: done.append(3))
        assert done == [0, 1]
    assert done == [0, 1, 2, 3]  # every outcome collected when the block ends, in order
    assert [number for number, _ in started] == [0, 1, 2, 3]
    assert threading.main_thread() not in {thread for _, thread in started}


def test_a_failed_write_is_raised_in_the_callers_thread_and_its_done_never_runs():
    done = []

    def write(number: int) -> None:
        if number == 1:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"), background_writes(2, 8, "t") as writes:
        for number in range(3):
            writes.submit(write, number, done=lambda n=number: done.append(n))
    assert done == [0]


def test_an_error_in_the_block_still_waits_for_the_writes_under_way():
    finished = []
    slow = threading.Event()

    def write() -> None:
        slow.wait(timeout=0.2)
        finished.append(True)

    with pytest.raises(RuntimeError, match="caller"), background_writes(1, 4, "t") as writes:
        writes.submit(write)
        raise RuntimeError("caller")
    assert finished == [True]
