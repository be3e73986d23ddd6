"""The engine: one per process, owns the backend and the device, serves many streams.

A stream is one video source. Live streams are latest-frame-wins (frames that wait while newer
ones arrive are dropped and counted); file streams are lossless and in order, with back-pressure
on `submit` instead of drops. One worker thread gathers frames from all streams into batches,
runs preprocess -> network -> temporal smoothing -> upsampling -> composite on the device, and
hands results back; on CUDA a second thread waits for the downloads so the worker never blocks
on the GPU.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import composite
from .filters import half, upsample2x
from .preprocess import resize
from .smoothing import TemporalSmoother, smooth_streams
from .transfer import Downloader, Uploader
from .yuv import YUVSpec, i420_planes, pack_i420, rgb_to_yuv, spec_of, to_planes, yuv_to_rgb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamOptions:
    """Frozen: `Stream.set_options` swaps in a new one, so a reference taken under the lock is a snapshot."""

    background: composite.Background = field(default_factory=lambda: composite.parse_background("transparent"))
    smoothing: float = 0.5
    image: bool = True  # return the composited frame
    alpha: bool = False  # return the alpha (H x W uint8)
    mask_view: bool = False  # the returned image shows the mask instead
    decontaminate: bool = False  # re-estimate edge colours so the old background does not bleed


@dataclass
class Result:
    index: int
    pts: Any
    meta: Any
    image: np.ndarray | None  # uint8, laid out as `format` says
    alpha: np.ndarray | None  # H x W, uint8
    submitted: float
    done: float
    # rgb24: H x W x 3; rgba: H x W x 4; yuv420p: (3H/2, W) I420; yuva420p: the same, transparent, with `alpha`
    # as its alpha plane.
    format: str = "rgb24"

    @property
    def latency(self) -> float:
        return self.done - self.submitted


@dataclass
class _Item:
    index: int
    frame: np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]  # RGB, or 4:2:0 (Y, U, V) planes
    pts: Any
    meta: Any
    submitted: float
    spec: YUVSpec | None = None  # 4:2:0 streams: the frame's matrix and range
    background: np.ndarray | None = None  # this frame's video-background frame, if any
    background_dev: torch.Tensor | None = None
    # The stream's options when the worker collected the frame (under the lock): everything downstream (grouping,
    # smoothing, the render and the background it loads) reads only this, so a frame never mixes two settings.
    options: StreamOptions | None = None


def as_rgb(frame) -> np.ndarray:
    """uint8 H x W x 3 RGB from a numpy array (RGB or RGBA) or an av.VideoFrame."""
    if hasattr(frame, "to_ndarray"):
        return frame.to_ndarray(format="rgb24")
    a = np.asarray(frame)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected a uint8 H x W x 3 RGB frame, got {a.dtype} {a.shape}")
    return a[:, :, :3]


def to_float(hwc: torch.Tensor) -> torch.Tensor:
    """uint8 H x W x 3 -> float (1,3,H,W) in 0..1, contiguous: ops that broadcast an alpha or a colour over a
    channels-last view of the frame run ~10x slower on the CPU."""
    return hwc.permute(2, 0, 1).unsqueeze(0).contiguous().float().mul_(1 / 255)


_END = object()


class Stream:
    """Frames in `pixel_format`: "rgb24" (H x W x 3 arrays, or av.VideoFrames converted) or "yuv420p" ((3H/2, W)
    I420 arrays or av.VideoFrames, even sizes; results come back as I420 too, in the frame's own matrix and
    range, or `spec` for arrays)."""

    def __init__(self, engine: Engine, live: bool, max_in_flight: int, options: StreamOptions,
                 on_result: Callable[[Result], None] | None, background_source=None, pixel_format: str = "rgb24",
                 spec: YUVSpec | None = None):
        if pixel_format not in ("rgb24", "yuv420p"):
            raise ValueError(f"pixel_format must be rgb24 or yuv420p, got {pixel_format!r}")
        self.engine = engine
        self.live = live
        self.yuv = pixel_format == "yuv420p"
        self.spec = spec or YUVSpec()
        self.max_in_flight = max(1, max_in_flight)
        self.options = options
        self.background_source = background_source  # .read(): next H x W x 3 uint8 frame of a video background
        self.on_result = on_result
        self.results: queue.Queue = queue.Queue()
        self.pending: deque[_Item] = deque()
        self.processing = 0
        self.waiting = 0  # file streams: submitted and not yet taken by the consumer
        self.smoother = TemporalSmoother()
        self.submitted = self.dropped = self.delivered = 0
        self.closed = self.ended = False
        self.error: BaseException | None = None
        # The last image background prepared for each layout, keyed by what it was made from, so a stale entry just
        # misses after an options change. Only the worker fills them, reading them once into a local; closing the
        # stream drops them.
        self._bg_rgb: tuple[tuple, torch.Tensor] | None = None
        self._bg_yuv: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    # -- producer side
    def submit(self, frame, pts=None, meta=None, timeout: float | None = None, spec: YUVSpec | None = None) -> bool:
        """Queue a frame. Live: never blocks, drops the oldest waiting frame. File: blocks while
        `max_in_flight` frames are waiting for the consumer; returns False on timeout. `spec`: the matrix and
        range of an I420 array (av.VideoFrames say their own; default the stream's)."""
        if self.yuv:
            planes = frame if isinstance(frame, tuple) else i420_planes(frame)
            item = _Item(0, planes, pts, meta, time.monotonic(), spec or spec_of(frame) or self.spec)
        else:
            item = _Item(0, as_rgb(frame), pts, meta, time.monotonic())
        if self.background_source is not None:
            item.background = self.background_source.read()
        with self.engine.cond:
            if self.closed or self.ended:
                raise RuntimeError("stream is closed")
            if not self.live and not self.engine.cond.wait_for(
                    lambda: self.waiting < self.max_in_flight or self.closed, timeout):
                return False
            item.index = self.submitted
            self.submitted += 1
            if self.live:
                while len(self.pending) >= self.max_in_flight:
                    self.pending.popleft()
                    self.dropped += 1
            else:
                self.waiting += 1
            self.pending.append(item)
            self.engine.cond.notify_all()
        return True

    def end(self) -> None:
        """No more frames: `get` returns None once every submitted frame has come back."""
        with self.engine.cond:
            self.ended = True
            if not self.pending and not self.processing:
                self.results.put(_END)
            self.engine.cond.notify_all()

    def set_options(self, **changes) -> None:
        """Frames collected from now on use the new options; frames already in a batch keep theirs."""
        with self.engine.cond:
            self.options = replace(self.options, **changes)

    # -- consumer side
    def get(self, timeout: float | None = None) -> Result | None:
        """The next result in order; None after `end()` once all are out. Raises the engine's error."""
        try:
            r = self.results.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no result within the timeout") from None
        if r is _END:
            self.results.put(_END)
            return None
        if isinstance(r, BaseException):
            raise RuntimeError(f"engine failed on this stream: {r}") from r
        if not self.live:
            with self.engine.cond:
                self.waiting -= 1
                self.engine.cond.notify_all()
        return r

    def close(self) -> None:
        self.engine._detach(self)

    def stats(self) -> dict:
        return {"submitted": self.submitted, "dropped": self.dropped, "delivered": self.delivered,
                "pending": len(self.pending), "processing": self.processing}

    # -- engine side (worker thread)
    def _deliver(self, result: Result | BaseException) -> None:
        with self.engine.cond:
            self.processing -= 1
            if isinstance(result, Result):
                self.delivered += 1
            finished = self.ended and not self.pending and not self.processing
            self.engine.cond.notify_all()  # a live stream may be ready again now that `processing` went down
            if self.closed:
                return
            on_result = self.on_result
        if on_result is not None and isinstance(result, Result):
            on_result(result)
            if not self.live:
                with self.engine.cond:
                    self.waiting -= 1
                    self.engine.cond.notify_all()
        else:
            if self.live:
                # A slow consumer must not make live results pile up: keep only the newest few.
                while self.results.qsize() >= self.max_in_flight:
                    try:
                        self.results.get_nowait()
                    except queue.Empty:
                        break
                    with self.engine.cond:  # it was counted as delivered: each frame is counted once
                        self.delivered -= 1
                        self.dropped += 1
            self.results.put(result)
        if finished:
            self.results.put(_END)

    def _background(self, H: int, W: int, device, item: _Item) -> torch.Tensor | None:
        """The item's image or video background as RGB (1,3,H,W), or None."""
        bg = item.options.background
        if bg.kind == "video" and item.background is not None:
            return composite.fit_background(item.background_dev, H, W)
        if bg.kind == "image":
            key = (bg.path, H, W)
            cached = self._bg_rgb
            if cached is None or cached[0] != key:
                from ..media.images import load_rgb  # the shared loader: pixel limit, 16-bit grey, EXIF

                img = load_rgb(bg.path, label=f"background image {bg.path}")
                cached = self._bg_rgb = (key, composite.prepare_background(img, H, W, device))
            return cached[1]
        return None

    @staticmethod
    def _fill(o: StreamOptions, planes: list[tuple[torch.Tensor, torch.Tensor]], colours: list,
              backgrounds: list) -> list:
        """The background step of options `o` for each (planes, alpha at their size) pair: RGB is one pair, 4:2:0
        two (luma, chroma). `colours` and `backgrounds` give each pair its background colour values (0..255) and
        image."""
        kind = o.background.kind
        out = []
        for (x, alpha), colour, bg in zip(planes, colours, backgrounds):
            fg = composite.decontaminate(x, alpha) if o.decontaminate else x
            if kind == "color":
                out.append(composite.composite_color(fg, alpha, colour))
            elif kind in ("image", "video"):
                out.append(fg if bg is None else composite.composite_image(fg, alpha, bg))
            elif kind == "blur":
                out.append(composite.composite_blur(x, alpha, o.background.strength, fg=fg))
            elif kind == "transparent":
                out.append(fg)  # the alpha goes with it
            else:  # "none": the original frame
                out.append(x)
        return out

    def _render(self, frame: torch.Tensor, alpha: torch.Tensor, item: _Item) -> tuple[str, dict[str, torch.Tensor]]:
        """Frames (B,3,H,W) of streams with this stream's options (B > 1 only without image/video backgrounds)
        -> (format, {"image": (B,H,W,C) uint8, "alpha": (B,H,W) uint8}), with `item`'s options."""
        o = item.options
        kind = o.background.kind
        out = {}
        fmt = "rgb24"
        if o.image:
            if o.mask_view:
                img = alpha.expand(-1, 3, -1, -1)
            else:
                bg = self._background(*frame.shape[-2:], frame.device, item) if kind in ("image", "video") else None
                (img,) = self._fill(o, [(frame, alpha)], [o.background.color], [bg])
                if kind == "transparent":
                    img, fmt = composite.to_rgba(img, alpha), "rgba"
            out["image"] = composite.to_uint8(img).permute(0, 2, 3, 1).contiguous()
        if o.alpha:
            out["alpha"] = composite.to_uint8(alpha)[:, 0]
        return fmt, out

    def _render_yuv(self, y: torch.Tensor, uv: torch.Tensor, alpha: torch.Tensor, alpha_half: torch.Tensor,
                    item: _Item) -> tuple[str, dict[str, torch.Tensor]]:
        """The same as `_render` on 4:2:0 planes: luma with the full alpha, chroma with the half-size one; the
        image is (B,3H/2,W) I420."""
        o = item.options
        out = {}
        fmt = "yuv420p"
        spec = item.spec
        kind = o.background.kind
        if o.image:
            if o.mask_view:
                lo, hi = spec.black_white()
                y_out, uv_out = alpha * (hi - lo) + lo, torch.full_like(uv, 128 / 255)
            else:
                c = spec.color(o.background.color) if kind == "color" else (None,) * 3
                bg = self._background_yuv(*y.shape[-2:], y.device, item) if kind in ("image", "video") else None
                y_out, uv_out = self._fill(o, [(y, alpha), (uv, alpha_half)], [c[:1], c[1:]], bg or [None, None])
                fmt = "yuva420p" if kind == "transparent" else fmt
            out["image"] = pack_i420(y_out, uv_out)
        if o.alpha or (o.image and kind == "transparent" and not o.mask_view):
            out["alpha"] = composite.to_uint8(alpha)[:, 0]
        return fmt, out

    def _background_yuv(self, H: int, W: int, device, item: _Item) -> tuple[torch.Tensor, torch.Tensor] | None:
        bg = item.options.background
        if bg.kind == "image":
            key = (bg.path, H, W, item.spec)
            cached = self._bg_yuv
            if cached is None or cached[0] != key:
                cached = self._bg_yuv = (key, rgb_to_yuv(self._background(H, W, device, item), item.spec))
            return cached[1]
        rgb = self._background(H, W, device, item)
        return None if rgb is None else rgb_to_yuv(rgb, item.spec)


class Engine:
    def __init__(self, backend, *, max_batch: int = 4, max_wait_ms: float = 4.0, guided_radius: int = 2,
                 guided_eps: float = 1e-4):
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
        self.uploader = Uploader(self.device)
        self.downloader = Downloader(self.device)
        self.cuda = self.device.type == "cuda"
        self.compute_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._rr = 0
        self._downloads: queue.Queue = queue.Queue(maxsize=2)
        self._worker = threading.Thread(target=self._run, name="rmbg-engine", daemon=True)
        self._worker.start()
        if self.cuda:
            self._finisher = threading.Thread(target=self._finish_loop, name="rmbg-engine-dl", daemon=True)
            self._finisher.start()

    def open_stream(self, *, live: bool, options: StreamOptions | None = None, max_in_flight: int | None = None,
                    on_result: Callable[[Result], None] | None = None, background_source=None,
                    pixel_format: str = "rgb24", spec: YUVSpec | None = None) -> Stream:
        n = max_in_flight or (2 if live else 2 * self.max_batch)
        s = Stream(self, live, n, options or StreamOptions(), on_result, background_source, pixel_format, spec)
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
            s._bg_rgb = s._bg_yuv = None
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
                    item.options = s.options
                    batch.append((s, item))
                    progress = True
            self.cond.notify_all()  # producers blocked on back-pressure may go on
            return batch

    def _run(self) -> None:
        while (batch := self._collect()) is not None:
            if not batch:  # the streams that were ready closed while it waited for a fuller batch
                continue
            try:
                if self.cuda:
                    with torch.cuda.stream(self.compute_stream):
                        self._process(batch)
                else:
                    self._process(batch)
            except Exception as exc:  # a failing batch must not take the engine (and every session) down
                log.exception("engine batch failed")
                for s, _ in batch:
                    s._deliver(exc)
            # Not held while waiting for the next one: an idle engine keeps no frames (6 MB each at 1080p) and no
            # closed streams alive.
            del batch

    @torch.inference_mode()
    def _process(self, batch: list[tuple[Stream, _Item]]) -> None:
        arrays, extra = [], []
        for s, item in batch:
            arrays.extend(item.frame if s.yuv else [item.frame])
            if item.background is not None:
                extra.append(item.background)
        dev = iter(self.uploader.upload(arrays + extra))
        frames = [tuple(next(dev) for _ in range(3)) if s.yuv else next(dev) for s, _ in batch]
        for _, item in batch:
            if item.background is not None:
                item.background_dev = to_float(next(dev))
        # Frames of one layout and size go through the network, smoothing and upsampling as one batch: on the
        # CPU the per-op overhead (and, in the server, the GIL) costs more than the pixels at these sizes.
        groups: dict[tuple, list[int]] = {}
        for k, ((s, item), f) in enumerate(zip(batch, frames)):
            key = (tuple(f[0].shape), item.spec) if s.yuv else (tuple(f.shape), None)
            groups.setdefault(key, []).append(k)
        work = []  # per group: row indices into the batch, full-size planes, network input, alpha once known
        for (shape, spec), idx in groups.items():
            size = self.backend.input_size(*shape[:2])  # per frame size: a dynamic model keeps the aspect
            alpha = None
            if spec is not None:
                y, uv = to_planes([frames[k] for k in idx])
                planes = (y, uv)
                if size is None and hasattr(self.backend, "key_chroma"):
                    # The chroma keyer reads the chroma planes as they are; smoothing only needs the luma.
                    small, alpha = half(y), self.backend.key_chroma(uv, spec)
                else:
                    # Backends without a resolution work at the chroma planes' size.
                    small = yuv_to_rgb(y, uv, spec, size or tuple(uv.shape[-2:]))
            else:
                frame = torch.cat([to_float(frames[k]) for k in idx])
                planes = (frame,)
                small = resize(frame, size) if size is not None else frame
            work.append([idx, planes, small, alpha])
        todo = [w for w in work if w[3] is None]
        if len(todo) > 1 and len({tuple(w[2].shape[-2:]) for w in todo}) == 1:
            for w, a in zip(todo, self.backend(torch.cat([w[2] for w in todo])).split([len(w[0]) for w in todo])):
                w[3] = a
        else:
            for w in todo:
                w[3] = self.backend(w[2])
        outputs: list = [None] * len(batch)
        for idx, planes, small, a in work:
            smoothing = [batch[k][1].options.smoothing for k in idx]
            a = smooth_streams([batch[k][0].smoother for k in idx], a, small, smoothing)
            a_full = self._upsample(a, planes[0])
            a_half = None
            if len(planes) == 2:
                a_half = a if a.shape[-2:] == planes[1].shape[-2:] else half(a_full)
            # Streams with the same options are composited together too; image and video backgrounds are per
            # stream (their own file or frame), so those render one by one.
            renders: dict = {}
            for j, k in enumerate(idx):
                o = batch[k][1].options
                key = (o.background, o.image, o.alpha, o.mask_view, o.decontaminate)
                renders.setdefault(key if o.background.kind not in ("image", "video") else j, []).append(j)
            for rows in renders.values():
                s, item = batch[idx[rows[0]]]
                consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
                sel = slice(rows[0], rows[0] + len(rows)) if consecutive else torch.tensor(rows)
                if a_half is not None:
                    fmt, out = s._render_yuv(planes[0][sel], planes[1][sel], a_full[sel], a_half[sel], item)
                else:
                    fmt, out = s._render(planes[0][sel], a_full[sel], item)
                for n, j in enumerate(rows):
                    outputs[idx[j]] = (fmt, {name: t[n] for name, t in out.items()})
        self.uploader.release()
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
        if getattr(self.backend, "guided", True):
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
            s._deliver(Result(item.index, item.pts, item.meta, got.get("image"), got.get("alpha"), item.submitted, now,
                              fmt))

    def _finish_loop(self) -> None:
        while (job := self._downloads.get()) is not None:
            event, batch, outputs, hosts = job
            event.synchronize()
            self._finish(batch, outputs, hosts)
