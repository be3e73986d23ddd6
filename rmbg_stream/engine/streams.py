"""Flow control: streams, their queues, dropping and back-pressure; the frames and results they carry.

A stream is one video source. Live streams are latest-frame-wins (frames that wait while newer ones arrive are
dropped and counted); file streams are lossless and in order, with back-pressure on `submit` instead of drops.
All counters and queues are guarded by the engine's condition (`engine.cond`); results go back through
`Stream.results` (a `queue.Queue`) or the stream's `on_result` callback, called on the engine's thread.
"""

from __future__ import annotations

import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .background import Background, parse_background
from .render import BackgroundCache
from .smoothing import DEFAULT_STRENGTH, TemporalSmoother
from .yuv import YUVSpec, i420_planes, spec_of

if TYPE_CHECKING:
    from .engine import Engine


@dataclass(frozen=True)
class StreamOptions:
    """Frozen: `Stream.set_options` swaps in a new one, so a reference taken under the lock is a snapshot."""

    background: Background = field(default_factory=lambda: parse_background("transparent"))
    smoothing: float = DEFAULT_STRENGTH
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
    # The background the worker uploaded for this frame, float (1,3,h,w) 0..1: its video-background frame, or its
    # stream's image when the stream's `BackgroundCache` had none prepared at this frame's size.
    background_dev: torch.Tensor | None = None
    # The stream's options when the worker collected the frame (under the lock): everything downstream (grouping,
    # smoothing, the render and the background it loads) reads only this, so a frame never mixes two settings.
    options: StreamOptions | None = None
    image: HostImage | None = None  # the decoded image of an image background in `options`, taken with them
    delivered: bool = False  # CUDA: handed to `Stream._deliver` by the finisher thread


def as_rgb(frame) -> np.ndarray:
    """uint8 H x W x 3 RGB from a numpy array (RGB or RGBA) or an av.VideoFrame."""
    if hasattr(frame, "to_ndarray"):
        return frame.to_ndarray(format="rgb24")
    a = np.asarray(frame)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected a uint8 H x W x 3 RGB frame, got {a.dtype} {a.shape}")
    return a[:, :, :3]


@dataclass(frozen=True, eq=False)
class HostImage:
    """An image background decoded on the host: RGB (H, W, 3) uint8, and the path it came from."""

    path: str
    rgb: np.ndarray


def host_image(bg: Background, current: HostImage | None, pixels: np.ndarray | None = None) -> HostImage | None:
    """The decoded pixels of `bg` when it is an image: `pixels` (uint8 RGB H x W x 3) when the caller decoded
    them, `current` when it holds that path already, else decoded now, in the caller's thread. Decoding in the
    engine's worker would stall every stream's frames while it runs (about 70 ms for a noisy 1920x1080 JPEG or PNG
    on this project's two-core test machine)."""
    if bg.kind != "image":
        return None
    if pixels is not None:
        return HostImage(bg.path, as_rgb(pixels))
    if current is not None and current.path == bg.path:
        return current
    from ..media.images import load_rgb  # the shared loader: pixel limit, 16-bit grey, EXIF

    return HostImage(bg.path, load_rgb(bg.path, label=f"background image {bg.path}"))


_END = object()


class Stream:
    """Frames in `pixel_format`: "rgb24" (H x W x 3 arrays, or av.VideoFrames converted) or "yuv420p" ((3H/2, W)
    I420 arrays or av.VideoFrames, even sizes; results come back as I420 too, in the frame's own matrix and
    range, or `spec` for arrays). An image background is decoded when the stream opens or its options change, in
    that caller's thread (`host_image`); `background_image` passes its pixels when the caller has them."""

    def __init__(self, engine: Engine, live: bool, max_in_flight: int, options: StreamOptions,
                 on_result: Callable[[Result], None] | None, background_source=None, pixel_format: str = "rgb24",
                 spec: YUVSpec | None = None, background_image: np.ndarray | None = None):
        if pixel_format not in ("rgb24", "yuv420p"):
            raise ValueError(f"pixel_format must be rgb24 or yuv420p, got {pixel_format!r}")
        # Changed only together with `options`, under the engine's lock.
        self.image = host_image(options.background, None, background_image)
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
        # Only the worker fills it; closing the stream drops it.
        self.backgrounds = BackgroundCache()

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

    def set_options(self, *, background_image: np.ndarray | None = None, **changes) -> None:
        """Frames collected from now on use the new options; frames already in a batch keep theirs. A new image
        background is decoded first, here (`host_image`; `background_image`: its pixels, decoded by the caller):
        one that does not decode raises and changes nothing."""
        bg = changes.get("background")
        image = host_image(bg, self.image, background_image) if bg is not None else None
        with self.engine.cond:
            self.options = replace(self.options, **changes)
            if bg is not None:
                self.image = image

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
        if not self.live:  # a failed frame was taken too: it must not hold back-pressure forever
            with self.engine.cond:
                self.waiting -= 1
                self.engine.cond.notify_all()
        if isinstance(r, BaseException):
            raise RuntimeError(f"engine failed on this stream: {r}") from r
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
            try:
                on_result(result)
            finally:  # a callback that raises still took the frame: back-pressure must let the next one in
                if not self.live:
                    with self.engine.cond:
                        self.waiting -= 1
                        self.engine.cond.notify_all()
        else:
            if self.live:
                # A slow consumer must not make live results pile up: keep only the newest few.
                while self.results.qsize() >= self.max_in_flight:
                    try:
                        old = self.results.get_nowait()
                    except queue.Empty:
                        break
                    with self.engine.cond:  # it was counted as delivered: each frame is counted once
                        self.delivered -= isinstance(old, Result)
                        self.dropped += 1
            self.results.put(result)
        if finished:
            self.results.put(_END)
