"""Host <-> device transfers for the engine.

CUDA: each batch is packed into one of two pinned staging buffers and uploaded on a copy stream,
so the upload of batch k+1 overlaps the compute of batch k; the compute stream waits on an event,
never on the device. Results go back into pinned memory on a second copy stream and an event says
when they are ready. CPU: the same calls, without copies where none are needed.
"""

from __future__ import annotations

import numpy as np
import torch

ALIGN = 256  # bytes: each array's offset in a staging buffer, so the kernels reading its view get aligned loads


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class Uploader:
    """`api`: the asynchronous device API (`device_api`), or None on the CPU."""

    def __init__(self, device: torch.device, api=None):
        self.device = device
        self.api = api
        self.cuda = api is not None
        if self.cuda:
            self.stream = api.stream()
            self.host: list[torch.Tensor | None] = [None, None]
            self.dev: list[torch.Tensor | None] = [None, None]
            self.uploaded: list = [None, None]  # host buffer free to overwrite (the host waits: blocking)
            self.consumed: list = [None, None]  # device buffer free to overwrite (recorded by `release`)
            self.slot = 0
            self._last = None

    def upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """uint8 arrays -> device uint8 tensors of the same shapes, ready on the current stream."""
        if not self.cuda:
            # Strided views are fine (consumers copy them once anyway); read-only arrays (PIL's) are copied, as
            # torch tensors are always writable.
            return [torch.from_numpy(a if a.flags.writeable else a.copy()) for a in arrays]
        api = self.api
        j, self.slot = self.slot, self.slot ^ 1
        offsets, total = [], 0
        for a in arrays:
            offsets.append(total)
            total = _aligned(total + a.nbytes)
        if self.uploaded[j] is not None:
            self.uploaded[j].synchronize()
        if self.host[j] is None or self.host[j].numel() < total:
            if self.consumed[j] is not None:
                self.consumed[j].synchronize()
            size = _aligned(int(total * 1.25) + 4096)
            self.host[j] = api.pinned(size, torch.uint8)
            # Allocated on the upload stream, which writes it first: the caching allocator orders a block only on
            # the stream it was allocated on, and memory freed on the compute stream may still be read by queued
            # kernels there (the first use of each slot, and every growth).
            with api.use(self.stream):
                self.dev[j] = api.empty(size, torch.uint8)
        host, dev = self.host[j], self.dev[j]
        with api.host_write(host) as flat:
            for a, off in zip(arrays, offsets):
                flat[off:off + a.nbytes].reshape(a.shape)[...] = a  # one copy, even from a strided view
        with api.use(self.stream):
            if self.consumed[j] is not None:
                api.wait(self.stream, self.consumed[j])
            api.copy(dev[:total], host[:total])
            done = api.event(blocking=True)
            done.record(self.stream)
        self.uploaded[j] = done
        api.wait(api.current_stream(), done)
        self._last = j
        return [dev[o:o + a.nbytes].view(a.shape) for o, a in zip(offsets, arrays)]

    def release(self) -> None:
        """Mark the last upload's device buffer as read by everything enqueued so far on the current stream."""
        if self.cuda and self._last is not None:
            ev = self.api.event(blocking=True)  # the host may wait on it before reallocating
            ev.record(self.api.current_stream())
            self.consumed[self._last] = ev
            self._last = None


class Downloader:
    def __init__(self, device: torch.device, api=None):
        self.api = api
        self.cuda = api is not None
        if self.cuda:
            self.device = device
            self.stream = api.stream()

    def download(self, tensors: list[torch.Tensor]):
        """Start copying device tensors to the host; returns (event or None, host tensors)."""
        if not self.cuda:
            return None, tensors
        api = self.api
        ready = api.event()
        ready.record(api.current_stream())
        with api.use(self.stream):
            api.wait(self.stream, ready)
            hosts = []
            for t in tensors:
                h = api.pinned(t.shape, t.dtype)
                api.copy(h, t)
                api.record_stream(t, self.stream)
                hosts.append(h)
            done = api.event(blocking=True)  # the finisher thread sleeps on it
            done.record(self.stream)
        return done, hosts
