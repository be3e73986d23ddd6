"""The engine: one per process, owns the backend and the device, serves many streams.

One worker thread gathers frames from all streams (`streams`: queues, dropping, back-pressure) into batches,
runs preprocess -> network -> temporal smoothing -> upsampling -> composite (`render`) on the device, and
hands results back; on CUDA a second thread waits for the downloads so the worker never blocks on the GPU.
`StreamOptions`, `Result`, `Stream` and `as_rgb` are re-exported here for the front ends.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from . import composite, render
from .device_api import for_device
from .filters import half, upsample2x
from .preprocess import resize, to_float
from .render import BackgroundCache
from .smoothing import TemporalSmoother, smooth_streams
from .streams import Result, Stream, StreamOptions, _Item, as_rgb
from .transfer import Downloader, Uploader
from .yuv import YUVSpec, to_planes, yuv_to_rgb

if TYPE_CHECKING:
    from .backends import Backend

__all__ = ["Engine", "Result", "Stream", "StreamOptions", "as_rgb", "to_float"]

log = logging.getLogger(__name__)


@dataclass
class _Group:
    """Frames of one layout and size in a batch: the network, smoothing and upsampling run on them together."""

    rows: list[int]  # their indices in the batch
    # Full size, float 0..1: (frame,) RGB (B,3,H,W), or 4:2:0 (y (B,1,H,W), uv (B,2,H/2,W/2)) code values / 255.
    planes: tuple[torch.Tensor, ...]
    small: torch.Tensor  # the network input: RGB (B,3,h,w) float 0..1
    alpha: torch.Tensor | None = None  # (B,1,h,w) float 0..1, once the backend ran


def _take(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Rows `rows` of `t` along dim 0: a view when consecutive. Never a tensor index: a host index tensor on a
    device tensor is a copy the host waits for."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return t[rows[0]:rows[0] + len(rows)]
    return torch.cat([t[j:j + 1] for j in rows])


def batch_sizes(max_batch: int) -> list[int]:
    """Every batch size the engine may hand the backend: a batch is the frames of one network input size, 1 to
    `max_batch` of them (a compiled backend pads each up to its own sizes)."""
    return list(range(1, max_batch + 1))


def warm_up(backend: Backend, sizes: list[int]) -> None:
    """One forward of mid-grey frames per batch size in `sizes` at the backend's nominal resolution, so that the
    first real batch of each size pays no cuDNN autotuning (`tuning.fast_convolutions`), lazy initialisation or
    compilation. Nothing for a backend without a resolution (the chroma keyer: element-wise, any size)."""
    if backend.resolution is None:
        return
    h, w = backend.resolution
    for b in sizes:
        backend(torch.full((b, 3, h, w), 0.5, device=backend.device))


class Engine:
    def __init__(self, backend: Backend, *, max_batch: int = 4, max_wait_ms: float = 4.0, guided_radius: int = 2,
                 guided_eps: float = composite.GUIDED_EPS, device_api=None, warm: bool | None = None):
        """`device_api`: the asynchronous device interface (`device_api.SimulatedDevice` in tests); default:
        torch.cuda on a CUDA backend, none (synchronous) on the CPU. `warm`: run `warm_up` for every batch size
        before the constructor returns (default: on CUDA, where the first batch of a size can stall a live stream
        for seconds; the CPU has nothing to tune)."""
        self.backend = backend
        self.device = backend.device
        self.max_batch = max(1, max_batch)
        self.max_wait = max_wait_ms / 1000
        self.guided_radius = guided_radius
        self.guided_eps = guided_eps
        self.cond = threading.Condition()
        self.streams: list[Stream] = []
        self.closed = False
        self.batches = self.frames = 0
        self.last_batch_size = 0
        self.api = device_api if device_api is not None else for_device(self.device)
        self.uploader = Uploader(self.device, self.api)
        self.downloader = Downloader(self.device, self.api)
        self.cuda = self.api is not None  # the asynchronous branch: copy streams, events, the finisher thread
        self.compute_stream = self.api.stream() if self.cuda else None
        if self.cuda:
            # Anything the backend prepared on the default stream (ChromaBackend.key_cbcr) is ready before our first
            # kernel reads it: one wait, at start.
            ready = self.api.event()
            ready.record(self.api.current_stream())
            self.api.wait(self.compute_stream, ready)
        self._rr = 0
        self._downloads: queue.Queue = queue.Queue(maxsize=2)
        self._warm = self.device.type == "cuda" if warm is None else warm
        self._warmed = threading.Event()
        self._worker = threading.Thread(target=self._run, name="rmbg-engine", daemon=True)
        self._worker.start()
        self._warmed.wait()  # in the worker: its device, its compute stream
        if self.cuda:
            self._finisher = threading.Thread(target=self._finish_loop, name="rmbg-engine-dl", daemon=True)
            self._finisher.start()

    def open_stream(self, *, live: bool, options: StreamOptions | None = None, max_in_flight: int | None = None,
                    on_result: Callable[[Result], None] | None = None, background_source=None,
                    pixel_format: str = "rgb24", spec: YUVSpec | None = None,
                    background_image: np.ndarray | None = None) -> Stream:
        """`background_image`: the decoded pixels of an image background in `options` (else decoded here)."""
        n = max_in_flight or (2 if live else 2 * self.max_batch)
        s = Stream(self, live, n, options or StreamOptions(), on_result, background_source, pixel_format, spec,
                   background_image)
        with self.cond:
            if self.closed:
                raise RuntimeError("engine is closed")
            self.streams.append(s)
        return s

    def _detach(self, s: Stream) -> None:
        with self.cond:
            s.closed = True
            s.pending.clear()
            # A closed stream keeps nothing big: its owner may live on a while (a session is freed by the cyclic
            # GC), and at 1080p the smoothing state alone is 16 MB. The callback goes too: it points back there.
            s.on_result = None
            s.smoother = TemporalSmoother()
            s.backgrounds = BackgroundCache()
            if s in self.streams:
                self.streams.remove(s)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            for s in self.streams:
                s.closed = True
            self.cond.notify_all()
        self._worker.join()
        if self.cuda:
            self._downloads.put(None)
            self._finisher.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def stats(self) -> dict:
        with self.cond:
            return {"streams": len(self.streams), "batches": self.batches, "frames": self.frames,
                    "last_batch_size": self.last_batch_size,
                    "dropped": sum(s.dropped for s in self.streams)}

    # -- worker
    def _ready(self, s: Stream) -> bool:
        return bool(s.pending) and (not s.live or s.processing < s.max_in_flight)

    def _collect(self) -> list[tuple[Stream, _Item]] | None:
        with self.cond:
            self.cond.wait_for(lambda: self.closed or any(self._ready(s) for s in self.streams))
            if self.closed:
                return None
            # Wait a little for a fuller batch, unless every stream already has a frame waiting.
            deadline = time.monotonic() + self.max_wait
            while True:
                ready = [s for s in self.streams if self._ready(s)]
                count = sum(len(s.pending) if not s.live else 1 for s in ready)
                left = deadline - time.monotonic()
                if count >= self.max_batch or len(ready) == len(self.streams) or left <= 0 or self.closed:
                    break
                self.cond.wait(left)
            batch: list[tuple[Stream, _Item]] = []
            streams = self.streams[self._rr:] + self.streams[:self._rr]
            self._rr = (self._rr + 1) % max(1, len(self.streams))
            progress = True
            while progress and len(batch) < self.max_batch:
                progress = False
                for s in streams:
                    if len(batch) == self.max_batch or not self._ready(s):
                        continue
                    if s.live:
                        item = s.pending.pop()
                        s.dropped += len(s.pending)
                        s.pending.clear()
                    else:
                        item = s.pending.popleft()
                    s.processing += 1
                    item.options, item.image = s.options, s.image
                    batch.append((s, item))
                    progress = True
            self.cond.notify_all()  # producers blocked on back-pressure may go on
            return batch

    def _run(self) -> None:
        self._start()
        while (batch := self._collect()) is not None:
            if not batch:  # the streams that were ready closed while it waited for a fuller batch
                continue
            try:
                if self.cuda:
                    with self.api.use(self.compute_stream):
                        self._process(batch)
                else:
                    self._process(batch)
            except Exception as exc:  # a failing batch must not take the engine (and every session) down
                log.exception("engine batch failed")
                for s, _ in batch:
                    # Its smoothing state may hold this batch's half-updated alpha, or none of its frame.
                    s.smoother = TemporalSmoother()
                    s._deliver(exc)
            # Not held while waiting for the next one: an idle engine keeps no frames (6 MB each at 1080p) and no
            # closed streams alive.
            del batch

    def _start(self) -> None:
        """The worker's first steps: its device, then the warm-up; the constructor waits for them, whatever
        happens."""
        try:
            if self.cuda:
                self.api.enter_thread()
            if self._warm:
                with self.api.use(self.compute_stream) if self.cuda else contextlib.nullcontext():
                    warm_up(self.backend, batch_sizes(self.max_batch))
        except Exception:  # the real batches will raise it again, per batch, where the streams see it
            log.exception("engine warm-up failed")
        finally:
            self._warmed.set()

    @torch.inference_mode()
    def _process(self, batch: list[tuple[Stream, _Item]]) -> None:
        """One batch through its stages: upload, group, network, smoothing and rendering, download."""
        frames = self._upload(batch)
        try:
            groups = self._group(batch, frames)
            self._infer(groups)
            outputs: list = [None] * len(batch)
            for g in groups:
                self._render(batch, g, outputs)
        finally:
            # Also when a stage raised: the next upload into this buffer must wait for what was queued reading it.
            self.uploader.release()
        self._download(batch, outputs)

    def _upload(self, batch: list[tuple[Stream, _Item]]) -> list:
        """Each item's frame on the device: RGB uint8 (H,W,3), or uint8 (Y, U, V) planes; and each background
        `_host_backgrounds` lists, into `item.background_dev` as float (1,3,h,w). One copy on the upload stream:
        the worker never waits for a host->device copy of its own."""
        arrays = []
        for s, item in batch:
            arrays.extend(item.frame if s.yuv else [item.frame])
        extra = self._host_backgrounds(batch)
        dev = iter(self.uploader.upload(arrays + [a for _, a in extra]))
        frames = [tuple(next(dev) for _ in range(3)) if s.yuv else next(dev) for s, _ in batch]
        for item, _ in extra:
            item.background_dev = to_float(next(dev))
        return frames

    @staticmethod
    def _host_backgrounds(batch: list[tuple[Stream, _Item]]) -> list[tuple[_Item, np.ndarray]]:
        """The host backgrounds to upload with the batch: each image-background item's decoded image while its
        stream has none prepared at the frame's size (once per stream and size), else its video frame, if any."""
        out, seen = [], set()
        for s, item in batch:
            o = item.options
            if o.background.kind == "image" and item.image is not None:
                h, w = (item.frame[0] if s.yuv else item.frame).shape[:2]
                if render.needs_background(o) and (id(s), h, w) not in seen and s.backgrounds.missing(o, h, w):
                    seen.add((id(s), h, w))
                    out.append((item, item.image.rgb))
            elif item.background is not None:
                out.append((item, item.background))
        return out

    def _group(self, batch: list[tuple[Stream, _Item]], frames: list) -> list[_Group]:
        """Frames of one layout and size go through the network, smoothing and upsampling as one batch: on the
        CPU the per-op overhead (and, in the server, the GIL) costs more than the pixels at these sizes."""
        rows_of: dict[tuple, list[int]] = {}
        for k, ((s, item), f) in enumerate(zip(batch, frames)):
            key = (tuple(f[0].shape), item.spec) if s.yuv else (tuple(f.shape), None)
            rows_of.setdefault(key, []).append(k)
        groups = []
        for (shape, spec), rows in rows_of.items():
            size = self.backend.input_size(*shape[:2])  # per frame size: a dynamic model keeps the aspect
            if spec is not None:
                y, uv = to_planes([frames[k] for k in rows])
                # Backends without a resolution work at the chroma planes' size.
                groups.append(_Group(rows, (y, uv), yuv_to_rgb(y, uv, spec, size or tuple(uv.shape[-2:]))))
            else:
                frame = torch.cat([to_float(frames[k]) for k in rows])
                groups.append(_Group(rows, (frame,), resize(frame, size) if size is not None else frame))
        return groups

    def _infer(self, groups: list[_Group]) -> None:
        """Sets each group's alpha: one network call when every group's input has the same size."""
        if len(groups) > 1 and len({tuple(g.small.shape[-2:]) for g in groups}) == 1:
            alphas = self.backend(torch.cat([g.small for g in groups])).split([len(g.rows) for g in groups])
        else:
            alphas = [self.backend(g.small) for g in groups]
        for g, a in zip(groups, alphas):
            g.alpha = a

    def _render(self, batch: list[tuple[Stream, _Item]], g: _Group, outputs: list) -> None:
        """Smooths and upsamples the group's alpha and renders its rows into `outputs` (format, {name: tensor})."""
        smoothing = [batch[k][1].options.smoothing for k in g.rows]
        a = smooth_streams([batch[k][0].smoother for k in g.rows], g.alpha, g.small, smoothing)
        a_full = self._upsample(a, g.planes[0])
        a_half = None
        if len(g.planes) == 2:
            a_half = a if a.shape[-2:] == g.planes[1].shape[-2:] else half(a_full)
        # Streams with the same options are composited together too; image and video backgrounds are per
        # stream (their own file or frame), so those render one by one.
        renders: dict = {}
        for j, k in enumerate(g.rows):
            o = batch[k][1].options
            key = (o.background, o.image, o.alpha, o.mask_view, o.decontaminate)
            renders.setdefault(key if o.background.kind not in render.PER_STREAM else j, []).append(j)
        for rows in renders.values():
            s, item = batch[g.rows[rows[0]]]
            fmt, out = render.render(tuple(_take(p, rows) for p in g.planes), _take(a_full, rows),
                                     None if a_half is None else _take(a_half, rows), item, s.backgrounds)
            for n, j in enumerate(rows):
                outputs[g.rows[j]] = (fmt, {name: t[n] for name, t in out.items()})

    def _download(self, batch: list[tuple[Stream, _Item]], outputs: list) -> None:
        """Copies the outputs to the host and delivers them: now on the CPU, from the finisher thread on CUDA."""
        flat = [t for _, out in outputs for t in out.values()]
        event, hosts = self.downloader.download(flat)
        with self.cond:
            self.batches += 1
            self.frames += len(batch)
            self.last_batch_size = len(batch)
        if event is None:
            self._finish(batch, outputs, hosts)
        else:
            self._downloads.put((event, batch, outputs, hosts))

    def _upsample(self, alpha: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
        size = tuple(frame.shape[-2:])
        if alpha.shape[-2:] == size:
            return alpha
        if self.backend.guided:
            return composite.guided_upsample(alpha, frame, self.guided_radius, self.guided_eps)
        # The chroma keyer's alpha comes from the 4:2:0 chroma planes: it has no finer edges to recover.
        if (alpha.shape[-2] * 2, alpha.shape[-1] * 2) == size:
            return upsample2x(alpha)
        return F.interpolate(alpha, size=size, mode="bilinear", align_corners=False)

    def _finish(self, batch, outputs, hosts) -> None:
        hosts = iter(hosts)
        now = time.monotonic()
        for (s, item), (fmt, out) in zip(batch, outputs):
            got = {k: next(hosts).numpy() for k in out}
            item.delivered = True
            try:
                s._deliver(Result(item.index, item.pts, item.meta, got.get("image"), got.get("alpha"), item.submitted,
                                  now, fmt))
            except Exception:  # the stream's on_result: its bug must not cost the other streams their results
                log.exception("on_result failed")

    def _finish_loop(self) -> None:
        self.api.enter_thread()
        while (job := self._downloads.get()) is not None:
            event, batch, outputs, hosts = job
            try:
                event.synchronize()
                self._finish(batch, outputs, hosts)
            except Exception as exc:  # dead, this thread would fill the queue and hang the worker and close()
                log.exception("engine download failed")
                for s, item in batch:
                    if not item.delivered:  # one whose on_result raised was delivered
                        s._deliver(exc)
