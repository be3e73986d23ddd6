"""Counters, rate meters and a latency histogram, rendered in the Prometheus text format."""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.033, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class Meter:
    """Events per second over the last `window` seconds."""

    def __init__(self, window: float = 2.0):
        self.window = window
        self.times: deque[float] = deque()
        self.count = 0

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.count += 1
        self.times.append(now)
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self.times and self.times[0] < now - self.window:
            self.times.popleft()

    def rate(self) -> float:
        self._trim(time.monotonic())
        return len(self.times) / self.window


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS, recent: int = 256):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0
        self.recent: deque[float] = deque(maxlen=recent)  # for quantiles in the live stats

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        self.recent.append(value)
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
                break

    def quantile(self, q: float) -> float | None:
        if not self.recent:
            return None
        values = sorted(self.recent)
        return values[min(len(values) - 1, int(q * len(values)))]


def _count(path: str) -> int:
    try:
        return len(os.listdir(path))
    except OSError:  # not Linux
        return -1


def process_families() -> list[tuple[str, str, str, list[tuple[dict, float]]]]:
    """This process's open file descriptors, asyncio tasks and threads (-1 where /proc is missing), so a soak can
    tell whether clients that came and went left any behind. Call it on the event loop."""
    return [
        ("rmbg_process_open_fds", "gauge", "Open file descriptors.", [({}, _count("/proc/self/fd"))]),
        ("rmbg_process_asyncio_tasks", "gauge", "Asyncio tasks not yet done (this request's own included).",
         [({}, len(asyncio.all_tasks()))]),
        ("rmbg_process_threads", "gauge", "OS threads.", [({}, _count("/proc/self/task"))]),
    ]


def _fmt(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def render(families: list[tuple[str, str, str, list[tuple[dict, float]]]], histograms) -> str:
    """families: (name, type, help, [(labels, value)]); histograms: (name, help, Histogram)."""
    lines = []
    for name, kind, help_text, samples in families:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {_fmt(value)}" if lab else f"{name} {_fmt(value)}")
    for name, help_text, h in histograms:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        total = 0
        for b, c in zip(h.buckets, h.counts):
            total += c
            lines.append(f'{name}_bucket{{le="{b}"}} {total}')
        lines += [f'{name}_bucket{{le="+Inf"}} {h.count}', f"{name}_sum {_fmt(h.sum)}", f"{name}_count {h.count}"]
    return "\n".join(lines) + "\n"
