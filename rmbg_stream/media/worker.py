"""One background thread joined to its caller by one bounded queue: the decode thread of `VideoReader` and the
encode thread of `VideoWriter`.

Items flow either way. The reader's thread `put`s frames and the caller iterates `items()`; the writer's caller
`put`s frames and the thread iterates `items()`, until the caller's `finish()` sends `END`. Whichever way they
flow, the promises are the same:

- an exception escaping the thread's body is kept in `error` and raised on the caller's side: by `put` (the
  caller feeds a thread that failed), by `items()` after the items queued before it (the thread fed the caller),
  and by `finish()`;
- nothing waits forever: every wait polls, and gives up once the worker is stopped or its thread is gone, so a
  thread that fails at any point, even while it finishes after `END`, never leaves the caller hanging;
- `stop()` ends the thread early and waits for it: puts return False and `items()` ends.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

END = object()  # the last item: what comes after it is not read
POLL = 0.1  # seconds between checks for a stop or a dead thread while waiting on the queue


class Worker:
    """Runs `body(worker)` in a daemon thread named `name`; `size` bounds the queue (the frames in flight)."""

    def __init__(self, name: str, body: Callable[[Worker], None], size: int = 8):
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(body,), name=name, daemon=True)
        self._thread.start()

    def _main(self, body: Callable[[Worker], None]) -> None:
        try:
            body(self)
        except BaseException as exc:  # handed to the caller: the thread must not die silently
            self.error = exc

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def put(self, item: Any) -> bool:
        """Wait for room and queue `item`; False once stopped. On the caller's side, raises the thread's error."""
        while not self._stop.is_set():
            if self.error is not None:
                raise self.error
            try:
                self._queue.put(item, timeout=POLL)
                return True
            except queue.Full:
                pass
        return False

    def items(self) -> Iterator[Any]:
        """What the other side puts, up to `END`. Ends when stopped; on the caller's side also when the thread is
        gone (raising its error, if any, after the items it queued)."""
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=POLL)
            except queue.Empty:
                if self._thread.is_alive():
                    continue
                item = self._left_over()
            if item is END:
                return
            yield item

    def _left_over(self) -> Any:
        """Once the thread is gone: what it queued just before it ended, then its error, else `END`."""
        try:
            return self._queue.get_nowait()
        except queue.Empty:
            pass
        if self.error is not None:
            raise self.error
        return END

    def finish(self) -> None:
        """Caller's side, when the thread takes items: send `END`, wait for the thread and raise its error.
        Does not wait for room in the queue once the thread is gone, so a failed thread cannot hang it."""
        while self._thread.is_alive():
            try:
                self._queue.put(END, timeout=POLL)
                break
            except queue.Full:
                pass
        self._thread.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """End the thread early and wait for it; what was queued is dropped."""
        self._stop.set()
        self._thread.join()  # after its current item at most: every wait of the thread's, and items(), checks the stop
        while True:  # after the join, so that nothing the thread put at the last moment is left
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
