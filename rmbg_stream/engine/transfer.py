"""Host <-> device transfers for the engine.

CUDA: each batch is packed into one of two pinned staging buffers and uploaded on a copy stream,
so the upload of batch k+1 overlaps the compute of batch k; the compute stream waits on an event,
never on the device. Results go back into pinned memory on a second copy stream and an event says
when they are ready. CPU: the same calls, without copies where none are needed.
"""

from __future__ import annotations

import numpy as np
import torch


class Uploader:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            self.host: list[torch.Tensor | None] = [None, None]
            self.dev: list[torch.Tensor | None] = [None, None]
            self.uploaded: list[torch.cuda.Event | None] = [None, None]  # host buffer free to overwrite
            self.consumed: list[torch.cuda.Event | None] = [None, None]  # device buffer free to overwrite
            self.slot = 0

    def upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """uint8 arrays -> device uint8 tensors of the same shapes, ready on the current stream."""
        if not self.cuda:
            # Strided views are fine (consumers copy them once anyway); read-only arrays (PIL's) are copied, as
            # torch tensors are always writable.
            return [torch.from_numpy(a if a.flags.writeable else a.copy()) for a in arrays]
        j, self.slot = self.slot, self.slot ^ 1
        total = sum(a.nbytes for a in arrays)
        if self.uploaded[j] is not None:
            self.uploaded[j].synchronize()
        if self.host[j] is None or self.host[j].numel() < total:
            if self.consumed[j] is not None:
                self.consumed[j].synchronize()
            size = int(total * 1.25) + 4096
            self.host[j] = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            self.dev[j] = torch.empty(size, dtype=torch.uint8, device=self.device)
        host, dev = self.host[j], self.dev[j]
        flat = host.numpy()
        offsets, off = [], 0
        for a in arrays:
            flat[off:off + a.nbytes].reshape(a.shape)[...] = a  # one copy, even from a strided view
            offsets.append(off)
            off += a.nbytes
        with torch.cuda.stream(self.stream):
            if self.consumed[j] is not None:
                self.stream.wait_event(self.consumed[j])
            dev[:total].copy_(host[:total], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.uploaded[j] = done
        torch.cuda.current_stream(self.device).wait_event(done)
        self._last = j
        return [dev[o:o + a.nbytes].view(a.shape) for o, a in zip(offsets, arrays)]

    def release(self) -> None:
        """Mark the last upload's device buffer as read by everything enqueued so far on the current stream."""
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self.consumed[self._last] = ev


class Downloader:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.device = device
            self.stream = torch.cuda.Stream(device)

    def download(self, tensors: list[torch.Tensor]):
        """Start copying device tensors to the host; returns (event or None, host tensors)."""
        if not self.cuda:
            return None, tensors
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            hosts = []
            for t in tensors:
                h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                h.copy_(t, non_blocking=True)
                t.record_stream(self.stream)
                hosts.append(h)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done, hosts
