"""rmbg_stream.media.worker: the thread + bounded queue under VideoReader and VideoWriter. Errors reach the
caller whichever way the items flow, and no wait outlives a failed or stopped thread."""

from __future__ import annotations

import threading
import time

import pytest

from rmbg_stream.media.worker import END, Worker


def within(seconds: float, fn) -> None:
    """Run `fn` in a thread and fail if it is still running after `seconds` (a hang, not a slow test)."""
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "hangs"


def test_items_from_a_failing_thread_come_before_its_error():
    def body(w: Worker) -> None:
        for i in range(3):
            w.put(i)
        raise ValueError("decode failed")

    w = Worker("test-produce", body, size=8)
    got: list[int] = []
    with pytest.raises(ValueError, match="decode failed"):
        for item in w.items():
            got.append(item)
    assert got == [0, 1, 2]


def test_a_thread_that_ends_without_end_ends_the_items():
    w = Worker("test-produce", lambda w: w.put("only"), size=2)
    assert list(w.items()) == ["only"]


def test_a_caller_feeding_a_failed_thread_gets_its_error_instead_of_waiting():
    def body(w: Worker) -> None:
        raise OSError("disk full")

    w = Worker("test-consume", body, size=1)
    raised: list[BaseException] = []

    def feed():
        try:
            for i in range(10):  # far more than the queue holds
                w.put(i)
        except OSError as exc:
            raised.append(exc)

    within(5, feed)
    assert raised and str(raised[0]) == "disk full"


def test_finish_raises_an_error_from_the_thread_finishing_instead_of_hanging():
    def body(w: Worker) -> None:
        for _ in w.items():
            pass
        raise RuntimeError("flush failed")  # after END: the caller is waiting in finish()

    w = Worker("test-consume", body, size=1)
    raised: list[BaseException] = []

    def close():
        for i in range(5):
            w.put(i)
        try:
            w.finish()
        except RuntimeError as exc:
            raised.append(exc)

    within(5, close)
    assert raised and str(raised[0]) == "flush failed"


def test_stop_ends_a_thread_blocked_on_a_full_queue():
    puts: list[bool] = []

    def body(w: Worker) -> None:
        while True:
            ok = w.put(time.monotonic())
            if not ok:
                puts.append(ok)
                return

    w = Worker("test-produce", body, size=2)
    time.sleep(0.2)  # the queue is full and the thread waits for room
    within(5, w.stop)
    assert puts == [False] and w.stopped and list(w.items()) == []


def test_end_stops_the_items_and_what_follows_it_is_not_read():
    taken: list[int] = []
    w = Worker("test-consume", lambda w: taken.extend(w.items()), size=4)
    w.put(1)
    w.put(END)
    w.put(2)
    w.finish()
    assert taken == [1]
