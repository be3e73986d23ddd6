"""The few device operations the engine's asynchronous (CUDA) branch uses, behind one interface.

`CudaDevice` wraps torch.cuda. `SimulatedDevice` runs the same branch on CPU tensors for CI: it keeps the
ordering rules of CUDA streams and makes every broken rule visible in the pixels. It
- defers each asynchronous copy until a stream waits on an event recorded after it, or the host synchronises
  that event or stream (so a consumer that does not wait reads stale or poisoned memory);
- fills fresh device and pinned buffers with poison (NaN for floats, 0xAB for integers);
- poisons a copy's destination when the buffer it writes may still be in use on another stream the copy's stream
  is not ordered after (allocated there, or read there since a wait acquired it: a stream's read of an
  uploaded buffer lasts until the first event it records after the acquiring wait), or when a device source was
  written by the stream current before the copy stream was entered and the copy stream did not wait for it;
- poisons a pinned buffer the host writes while a copy from it is not known by the host to have finished.
Every hazard is also listed in `SimulatedDevice.hazards`. Compute runs eagerly on the CPU: only copies are
deferred, so the simulation finds races between copies, buffer reuse and host waits, not between kernels.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch


class CudaDevice:
    """torch.cuda on one device; events the host waits on block instead of spinning a core."""

    asynchronous = True

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def enter_thread(self) -> None:
        """At the start of each engine thread: nothing it runs may touch another GPU (cuda:N, N > 0)."""
        torch.cuda.set_device(self.device)

    def stream(self):
        return torch.cuda.Stream(self.device)

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    def use(self, stream):
        return torch.cuda.stream(stream)

    def event(self, *, blocking: bool = False):
        return torch.cuda.Event(blocking=blocking)

    def wait(self, stream, event) -> None:
        stream.wait_event(event)

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """Device memory, ordered by the caching allocator on the current stream only."""
        return torch.empty(shape, dtype=dtype, device=self.device)

    def pinned(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Asynchronous copy on the current stream."""
        dst.copy_(src, non_blocking=True)

    @contextlib.contextmanager
    def host_write(self, buf: torch.Tensor) -> Iterator[np.ndarray]:
        """A writable numpy view of pinned `buf`; the caller has waited for every copy reading it."""
        yield buf.numpy()

    def record_stream(self, t: torch.Tensor, stream) -> None:
        t.record_stream(stream)


def for_device(device: torch.device) -> CudaDevice | None:
    """The asynchronous device API for `device`, or None where the engine runs synchronously (CPU)."""
    return CudaDevice(device) if torch.device(device).type == "cuda" else None


# -- simulation

@torch.inference_mode()  # the engine's buffers are inference tensors; the finisher thread is outside the mode
def poison_fill(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan") if t.is_floating_point() else 0xAB)


@dataclass(eq=False)
class SimStream:
    name: str
    pos: int = 0  # ops enqueued so far (copies and event records)
    clock: dict = field(default_factory=dict)  # stream -> position this stream is ordered after


@dataclass(eq=False)
class SimEvent:
    sim: SimulatedDevice
    blocking: bool
    clock: dict | None = None  # None until recorded
    stream: SimStream | None = None  # where it was recorded

    def record(self, stream: SimStream | None = None) -> None:
        self.sim._record(self, stream or self.sim.current_stream())

    def synchronize(self) -> None:
        if self.clock is not None:
            self.sim._host_wait(self.clock)

    def query(self) -> bool:
        return self.clock is None or self.sim._covered(self.sim.host_clock, self.clock)


@dataclass(eq=False)
class _Copy:
    stream: SimStream
    pos: int
    dst: torch.Tensor
    src: torch.Tensor
    poison: bool
    done: bool = False

    def __post_init__(self):
        self.dst_key = _key(self.dst)


@dataclass(eq=False)
class _Buffer:
    users: list = field(default_factory=list)  # (stream, position) it must be ordered after before a copy writes
    readers: dict = field(default_factory=dict)  # stream -> None (reading, no event since) or end position
    copies: list = field(default_factory=list)  # copies reading or writing it


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class SimulatedDevice:
    """CUDA's ordering rules on CPU tensors (see the module docstring); one per engine under test."""

    asynchronous = True

    def __init__(self):
        self.device = torch.device("cpu")
        self.lock = threading.RLock()
        self.default = SimStream("default")
        self.pending: list[_Copy] = []
        self.buffers: dict[int, _Buffer] = {}
        self.hazards: list[str] = []
        self.copies = 0
        self._local = threading.local()
        self._n = 0

    # -- streams and events
    def enter_thread(self) -> None:
        self._local.stack = []

    @property
    def host_clock(self) -> dict:
        """What this host thread has seen finish: per thread, as another thread's waits tell it nothing."""
        if not hasattr(self._local, "host"):
            self._local.host = {}
        return self._local.host

    def stream(self) -> SimStream:
        with self.lock:
            self._n += 1
            return SimStream(f"s{self._n}")

    def _stack(self) -> list:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def current_stream(self) -> SimStream:
        stack = self._stack()
        return stack[-1] if stack else self.default

    @contextlib.contextmanager
    def use(self, stream: SimStream):
        stack = self._stack()
        stack.append(stream)
        try:
            yield
        finally:
            stack.pop()

    def event(self, *, blocking: bool = False) -> SimEvent:
        return SimEvent(self, blocking)

    def _record(self, ev: SimEvent, s: SimStream) -> None:
        with self.lock:
            s.pos += 1
            ev.clock = {**s.clock, s: s.pos}
            ev.stream = s
            for buf in self.buffers.values():  # the stream's reads of acquired buffers end here
                if s in buf.readers and buf.readers[s] is None:
                    buf.readers[s] = s.pos

    @staticmethod
    def _covered(clock: dict, need: dict) -> bool:
        return all(clock.get(s, 0) >= p for s, p in need.items())

    def wait(self, stream: SimStream, ev: SimEvent) -> None:
        """`stream`'s later work runs after everything `ev` covers: the copies it covers run now."""
        if ev.clock is None:
            return
        with self.lock:
            before = dict(stream.clock)
            self._merge(stream.clock, ev.clock)
            self._run_covered(ev.clock)
            # Buffers a copy on the event's own stream filled: acquired by this wait, read from now on. (Waits that
            # cover them only through a third stream's event are not reads: the download stream's wait for compute.)
            for key, buf in self.buffers.items():
                if any(c.dst_key == key and c.stream is ev.stream and c.stream is not stream
                       and before.get(c.stream, 0) < c.pos <= ev.clock.get(c.stream, 0) for c in buf.copies):
                    buf.readers[stream] = None

    def synchronize(self, stream: SimStream | None = None) -> None:
        s = stream or self.current_stream()
        self._host_wait({**s.clock, s: s.pos})

    def _host_wait(self, clock: dict) -> None:
        with self.lock:
            self._merge(self.host_clock, clock)
            self._run_covered(clock)

    @staticmethod
    def _merge(into: dict, other: dict) -> None:
        for s, p in other.items():
            into[s] = max(into.get(s, 0), p)

    @torch.inference_mode()
    def _run_covered(self, clock: dict) -> list[_Copy]:
        ran = [c for c in self.pending if clock.get(c.stream, 0) >= c.pos]
        for c in ran:
            if c.poison:
                poison_fill(c.dst)
            else:
                c.dst.copy_(c.src)
            c.done = True
            c.dst = c.src = None  # nothing kept alive: a freed buffer's address may be handed out again
        self.pending = [c for c in self.pending if not c.done]
        return ran

    # -- memory and copies
    def _track(self, t: torch.Tensor, user: tuple) -> torch.Tensor:
        with self.lock:
            self.buffers[_key(t)] = _Buffer(users=[user])
        return poison_fill(t)

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        s = self.current_stream()
        return self._track(torch.empty(shape, dtype=dtype), (s, s.pos))

    def pinned(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return self._track(torch.empty(shape, dtype=dtype), (self.default, 0))

    def record_stream(self, t: torch.Tensor, stream) -> None:
        pass

    def _unordered(self, s: SimStream, buf: _Buffer) -> list[str]:
        """Why a copy on `s` may not write `buf` yet: uses on other streams `s` is not ordered after."""
        why = [f"allocated on {u.name}@{p}" for u, p in buf.users if u is not s and s.clock.get(u, 0) < p]
        for r, end in buf.readers.items():
            if r is not s and (end is None or s.clock.get(r, 0) < end):
                why.append(f"read on {r.name} until {'now' if end is None else end}")
        why += [f"copy on {c.stream.name}@{c.pos}" for c in buf.copies
                if c.stream is not s and s.clock.get(c.stream, 0) < c.pos]
        return why

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Deferred copy on the current stream (see the module docstring for when it runs, and when it poisons)."""
        with self.lock:
            s = self.current_stream()
            stack = self._stack()
            why = []
            buf = self.buffers.get(_key(dst))
            if buf is not None:
                why += self._unordered(s, buf)
            if _key(src) not in self.buffers and len(stack) >= 2:
                producer = stack[-2]
                if producer is not s and s.clock.get(producer, 0) < producer.pos:
                    why.append(f"source written on {producer.name}@{producer.pos}")
            s.pos += 1
            c = _Copy(s, s.pos, dst, src, bool(why))
            if why:
                self.hazards.append(f"copy on {s.name}@{s.pos}: " + "; ".join(why))
            for t in (dst, src):
                if _key(t) in self.buffers:
                    copies = self.buffers[_key(t)].copies
                    copies.append(c)
                    del copies[:-8]  # older ones are ordered before these on their stream or were hazards already
            if buf is not None:
                buf.readers.clear()
            self.pending.append(c)
            self.copies += 1

    @contextlib.contextmanager
    def host_write(self, buf: torch.Tensor) -> Iterator[np.ndarray]:
        """The host writes pinned `buf`: poisoned afterwards if a copy from it may still be running."""
        with self.lock:
            tracked = self.buffers.get(_key(buf))
            racing = [c for c in (tracked.copies if tracked else []) if self.host_clock.get(c.stream, 0) < c.pos]
        yield buf.numpy()
        if racing:
            with self.lock:
                self.hazards.append(f"host wrote a buffer copies {[c.pos for c in racing]} may still read")
                poison_fill(buf)
