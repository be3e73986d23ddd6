"""Sessions: one per connected client; the clients of one model feed its one engine, which batches their frames.

`serve --model A B ...` starts one engine per model (`SessionManager.engines`, the first is what a session starts
with). A session runs one model at a time and may switch (`Session.set_model`, the "model" control): its stream
is closed on the old engine and opened on the new one with the same options, background included, so only its
temporal smoothing starts again. Frames in flight on the old engine at that moment are lost (counted as dropped);
results of the old model that arrive later are discarded, so nothing sent after the control's reply comes from
the old model. The session's counters (received, sent, dropped, latency) run on across switches.

Flow control is latest-frame-wins at every hand-off, so latency stays bounded when the model is slower than the
camera: the receive side gives the engine only the newest frame (its live streams drop older waiting ones), and the
send side takes only the newest result (results overtaken while the encoder was busy are skipped and counted).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import inspect
import io
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from ..engine.composite import Background, parse_background
from ..engine.engine import Engine, Result, StreamOptions, as_rgb
from ..engine.smoothing import DEFAULT_STRENGTH
from ..engine.yuv import i420_planes, join_i420, spec_of
from ..media.images import ImageError, ImageTooLarge, load_rgb, open_image, to_rgb
from . import memory
from .frames import even_planes
from .metrics import Histogram, Meter
from .untrusted import TooDeep, error_text, loads_json

log = logging.getLogger(__name__)
# What an operator wants at the default level: sessions opened and closed, requests refused; one line each.
EVENTS = logging.getLogger("rmbg_stream.server.events")

UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
UPLOAD_MAX_PIXELS = 50_000_000  # checked on the header, before anything is decoded
BACKGROUND_MAX_SIDE = 4096  # larger uploads are scaled down: the engine fits them to the frame anyway
CONTROL_LIMIT = 64 * 1024  # a JSON control message (data URLs go over HTTP or the socket, whose limits are larger)


class Full(Exception):
    pass


class Closed(Exception):
    pass


class ControlError(ValueError):
    """A control or upload the client got wrong: the message goes back to it as is."""


@dataclass
class Tag:
    """Travels with a frame through the engine (as its meta)."""

    arrived: float  # when the server had the frame (monotonic)
    source: np.ndarray | None = None  # the input colour (RGB, or I420 for WebRTC), kept while an OBS view needs it
    size: tuple[int, int] | None = None  # (W, H) of an odd-sized 4:2:0 frame, padded to even sizes for the engine
    seq: int = 0  # WebSocket: the client's sequence number and timestamp, echoed back
    timestamp: float = 0.0
    fmt: int = 0
    generation: int = 0  # the session's model switches before this frame was submitted (`Session.current`)


class Latest:
    """Newest-value-wins hand-off to asyncio consumers: a slow consumer skips values, nothing ever queues."""

    def __init__(self):
        self.value = None
        self.version = 0
        self.closed = False
        self._waiter: asyncio.Future | None = None

    def put(self, value) -> None:
        self.value = value
        self.version += 1
        self._wake()

    def close(self) -> None:
        self.closed = True
        self.value = None  # `get` only raises Closed from now on: a last 1080p result need not stay alive
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._waiter = None

    async def get(self, seen: int):
        """The newest value once its version is past `seen`: (value, version). Raises Closed."""
        while self.version == seen and not self.closed:
            if self._waiter is None:
                self._waiter = asyncio.get_running_loop().create_future()
            # Shielded: several consumers share the future, one being cancelled must not wake the others.
            await asyncio.shield(self._waiter)
        if self.closed:
            raise Closed
        return self.value, self.version


def describe(bg: Background) -> str:
    if bg.kind == "color":
        return "#" + "".join(f"{c:02x}" for c in bg.color)
    if bg.kind == "blur":
        return f"blur:{bg.strength:g}"
    return bg.kind


def decode_upload(data: bytes, limit: int) -> Image.Image:
    """An uploaded background: size limit first, then the type from PIL's own sniffing, never the file name."""
    if len(data) > limit:
        raise ControlError(f"image of {len(data)} bytes is over the {limit} byte upload limit")
    try:
        img = open_image(io.BytesIO(data), "the uploaded image")
    except ImageTooLarge as exc:
        raise ControlError(str(exc)) from None
    except ImageError:
        raise ControlError(f"not an image: upload {', '.join(UPLOAD_FORMATS)}") from None
    if img.format not in UPLOAD_FORMATS:
        raise ControlError(f"{img.format} images are not accepted: upload {', '.join(UPLOAD_FORMATS)}")
    if img.width * img.height > UPLOAD_MAX_PIXELS:
        raise ControlError(f"image of {img.width}x{img.height} pixels is too large (at most {UPLOAD_MAX_PIXELS})")
    try:
        img = Image.fromarray(to_rgb(img, "upload"))  # the shared decoder: 16-bit grey scaled, upright
    except Exception as exc:
        raise ControlError(f"the {img.format} image is damaged: {error_text(exc)}") from None
    img.thumbnail((BACKGROUND_MAX_SIDE, BACKGROUND_MAX_SIDE))
    return img


def decode_data_url(text, limit: int) -> bytes:
    if not isinstance(text, str) or not text.startswith("data:") or ";base64," not in text:
        raise ControlError('"image" must be a data URL (data:image/...;base64,...)')
    payload = text.split(";base64,", 1)[1]
    if len(payload) > limit * 4 // 3 + 4:
        raise ControlError(f"image is over the {limit} byte upload limit")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ControlError("the data URL is not valid base64") from None


def parse_control(message, limit: int = CONTROL_LIMIT) -> dict:
    if isinstance(message, bytes):
        raise ControlError("controls are JSON text messages")
    if len(message) > limit:
        raise ControlError(f"control message of {len(message)} bytes is over the {limit} byte limit")
    try:
        msg = loads_json(message)
    except TooDeep as exc:
        raise ControlError(f"control message is {exc}") from None
    except ValueError as exc:
        raise ControlError(f"control message is not JSON: {error_text(exc)}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ControlError('a control message is a JSON object with a "type"')
    return msg


class Session:
    """One client. kind: "webrtc" or "websocket" (a camera with its own engine stream), or "viewer" (an OBS page
    that shows the output of a camera session, colour over alpha)."""

    def __init__(self, manager: SessionManager, kind: str, source: Session | None = None):
        self.id = secrets.token_urlsafe(12)
        self.kind = kind
        self.manager = manager
        self.loop = asyncio.get_running_loop()
        self.created = time.monotonic()
        self.source = source
        self.viewers: set[Session] = set()
        self.results = Latest()
        self.paused = False
        self.closed = False
        self.background = manager.background
        self.smoothing = manager.smoothing
        self.mask_view = False
        self.upload: Path | None = None
        self.upload_rgb: np.ndarray | None = None  # its pixels, decoded off the loop: the stream needs them
        self.fps_in, self.fps_out = Meter(), Meter()
        self.latency = Histogram()
        self.received = self.skipped = self.sent = self.superseded = 0
        self.size: tuple[int, int] | None = None  # (width, height) of the client's latest frame
        self.tasks: set[asyncio.Task] = set()
        self.on_close: list[Callable] = []
        self.stream = None
        self._model = manager.models[0]  # a viewer shows its source's (`model`)
        self.generation = 0  # model switches so far: results of an older one are not shown
        self.published = 0  # results of the current stream handed to `results`
        self.retired_dropped = 0  # dropped by, or lost in flight on, the streams of models switched away from
        if kind != "viewer":
            self.stream = self._open_stream(manager.engines[self._model])

    @property
    def model(self) -> str:
        """The model this session's frames go through (an OBS view: its camera session's)."""
        return self.source.model if self.source is not None else self._model

    def _open_stream(self, engine: Engine):
        options = StreamOptions(background=self.background, smoothing=self.smoothing, image=True,
                                alpha=bool(self.viewers), mask_view=self.mask_view)
        # WebRTC decodes to I420 and encodes from it: the engine works on that directly, no RGB round trip.
        return engine.open_stream(live=True, options=options, max_in_flight=2, on_result=self._on_result,
                                  pixel_format="yuv420p" if self.kind == "webrtc" else "rgb24",
                                  background_image=self._pixels(self.background))

    # -- frames in
    def arrived(self, now: float) -> None:
        """Counts a frame from the client, whether or not it gets processed."""
        self.received += 1
        self.fps_in.tick(now)

    def submit(self, frame, tag: Tag) -> None:
        """Called on the event loop with a decoded frame (av.VideoFrame or RGB array); never blocks."""
        if self.paused or self.closed:
            return
        self.size = (frame.width, frame.height) if isinstance(frame, av.VideoFrame) else frame.shape[1::-1]
        spec = None
        if self.stream.yuv:
            spec = spec_of(frame)
            if isinstance(frame, av.VideoFrame) and (frame.width % 2 or frame.height % 2):
                # The engine's 4:2:0 needs even sizes: padded here, cut back to this size when sent.
                tag.size = (frame.width, frame.height)
                pixels = even_planes(frame)
            else:
                pixels = i420_planes(frame)
            if self.viewers:
                tag.source = join_i420(pixels)
        else:
            pixels = as_rgb(frame)
            if self.viewers:
                tag.source = pixels
        tag.generation = self.generation
        self.stream.submit(pixels, pts=tag.arrived, meta=tag, spec=spec)

    def _on_result(self, result: Result) -> None:
        # The engine's thread: hop to the loop, which owns everything else.
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
            self.loop.call_soon_threadsafe(self._publish, result)

    def _publish(self, result: Result) -> None:
        # A result of a model switched away from was counted as lost at the switch (`set_model`).
        if not self.closed and self.current(result):
            self.published += 1
            self.results.put(result)

    def current(self, result: Result) -> bool:
        """Whether `result` comes from the model the session runs now: consumers skip others (a result taken before
        a switch, encoded while it happened)."""
        return result.meta.generation == self.generation

    # -- frames out
    def skipped_stale(self) -> None:
        """A result a consumer took and did not send because the model changed meanwhile (`current`)."""
        self.superseded += 1

    def sent_result(self, result: Result, skipped: int) -> None:
        """Book-keeping for a result handed to the encoder; `skipped` results were overtaken before it."""
        self.sent += 1
        self.superseded += max(0, skipped)
        self.fps_out.tick()
        latency = time.monotonic() - result.meta.arrived
        self.latency.observe(latency)
        self.manager.latency.observe(latency)

    # -- controls
    async def answer_control(self, message, limit: int = CONTROL_LIMIT) -> dict:
        """The reply to a control message as it came off the socket or data channel, whatever it holds: a fault
        in one control is an error reply, never the end of the session."""
        try:
            return await self.control(parse_control(message, limit))
        except ControlError as exc:
            return {"type": "error", "error": str(exc)}
        except Exception:
            log.exception("session %s: control failed", self.id)
            return {"type": "error", "error": "the server could not carry out this control"}

    async def control(self, msg: dict) -> dict:
        kind = msg["type"]
        if kind == "ping":
            return {"type": "pong", "t": msg.get("t")}
        if kind == "stats":
            return self.stats_message()
        if self.kind == "viewer":
            raise ControlError("an OBS view has no controls of its own; change them on the camera page")
        value = msg.get("value")
        if kind == "background":
            if "image" in msg:
                await self.upload_image(decode_data_url(msg["image"], self.manager.upload_limit))
            else:
                self.set_background(self._background(value))
        elif kind == "smoothing":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ControlError("smoothing takes a number from 0 to 1")
            self.smoothing = float(value)
            self.stream.set_options(smoothing=self.smoothing)
        elif kind == "model":
            self.set_model(value)
        elif kind in ("mask_view", "pause"):
            if not isinstance(value, bool):
                raise ControlError(f"{kind} takes true or false")
            if kind == "pause":
                self.paused = value
            else:
                self.mask_view = value
                self.stream.set_options(mask_view=value)
        else:
            raise ControlError(f"unknown control {kind!r}: expected background, smoothing, mask_view, pause, "
                               "model, ping or stats")
        return {"type": "ok", "control": kind, "state": self.state()}

    def set_model(self, name) -> None:
        """Moves the session to model `name`'s engine: a new stream there with the same options, then the old one
        closed. Its frames in flight are lost and counted as dropped: submitted, less what its engine dropped, less
        the results that were published (later ones are stale, `_publish`)."""
        engine = self.manager.engine_for(name)
        if name == self._model:
            return
        stream = self._open_stream(engine)  # first: should it fail, the session stays as it was
        old, self.stream = self.stream, stream
        old.close()
        counts = old.stats()  # final once closed: nothing is submitted to, or dropped by, a closed stream
        self.retired_dropped += counts["submitted"] - self.published
        self.generation += 1
        self.published = 0
        self._model = name
        EVENTS.info("session %s: model %s", self.id[:6], name)

    def _background(self, value) -> Background:
        if value == "upload":
            if self.upload is None:
                raise ControlError("no image uploaded in this session yet")
            return Background("image", path=str(self.upload))
        if not isinstance(value, str):
            raise ControlError('background takes a string: "#rrggbb", a colour name, "blur", "blur:0.3", '
                               '"transparent", "none" or "upload"')
        try:
            bg = parse_background(value)
        except ValueError as exc:
            raise ControlError(str(exc)) from None
        if bg.kind in ("image", "video"):
            # A path would let a client make the server open any file: images come in as uploads only.
            raise ControlError("backgrounds cannot name server files; upload an image instead")
        return bg

    def set_background(self, bg: Background) -> None:
        self.background = bg
        self.stream.set_options(background=bg, background_image=self._pixels(bg))

    def _pixels(self, bg: Background) -> np.ndarray | None:
        """The decoded pixels of image background `bg` (the upload's or the server's): the stream would decode it
        otherwise, on the event loop."""
        if bg.kind != "image":
            return None
        if self.upload is not None and bg.path == str(self.upload):
            return self.upload_rgb
        return self.manager.background_image if bg == self.manager.background else None

    async def upload_image(self, data: bytes) -> dict:
        """Checks, decodes and stores an uploaded background (off the event loop), then shows it."""
        path, rgb = await self.loop.run_in_executor(None, self.manager.save_upload, self.id, data)
        if self.closed:
            path.unlink(missing_ok=True)
            raise ControlError("the session has ended")
        old, self.upload, self.upload_rgb = self.upload, path, rgb
        self.set_background(Background("image", path=str(path)))
        if old is not None:
            self.manager.discard_upload(old)
        return {"type": "ok", "control": "background", "state": self.state()}

    def state(self) -> dict:
        bg = self.background
        name = "upload" if bg.kind == "image" and bg.path == str(self.upload) else describe(bg)
        return {"background": name, "smoothing": self.smoothing, "mask_view": self.mask_view, "paused": self.paused,
                "model": self.model}

    def dropped(self) -> int:
        engine_dropped = self.stream.stats()["dropped"] if self.stream is not None else 0
        return self.skipped + engine_dropped + self.superseded + self.retired_dropped

    def stats(self) -> dict:
        p50, p95 = self.latency.quantile(0.5), self.latency.quantile(0.95)
        return {"session": self.id, "kind": self.kind, "fps_in": round(self.fps_in.rate(), 1),
                "fps_out": round(self.fps_out.rate(), 1), "received": self.received, "sent": self.sent,
                "dropped": self.dropped(), "latency_ms_p50": None if p50 is None else round(p50 * 1000, 1),
                "latency_ms_p95": None if p95 is None else round(p95 * 1000, 1),
                "batch": self.manager.engines[self.model].stats()["last_batch_size"], "model": self.model}

    def stats_message(self) -> dict:
        return {"type": "stats", **self.stats(), "state": self.state() if self.kind != "viewer" else None}

    # -- viewers (OBS)
    def attach(self, viewer: Session) -> None:
        self.viewers.add(viewer)
        self.stream.set_options(alpha=True)

    def detach(self, viewer: Session) -> None:
        self.viewers.discard(viewer)
        if not self.viewers and self.stream is not None:
            self.stream.set_options(alpha=False)

    # -- lifetime
    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        # Closed is how a loop waiting on a hand-off learns that it is over: not a failure.
        if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), Closed):
            log.error("session %s: task failed", self.id, exc_info=task.exception())
            self.spawn(self.close())

    async def close(self) -> None:
        """Idempotent; leaves no engine stream, task or connection behind."""
        if self.closed:
            return
        self.closed = True
        self.manager._remove(self)
        if self.stream is not None:
            self.stream.close()
        self.results.close()
        me = asyncio.current_task()
        tasks = [t for t in self.tasks if t is not me]
        for t in tasks:
            t.cancel()
        for fn in self.on_close:
            try:
                r = fn()
                if inspect.isawaitable(r):
                    await r
            except Exception:
                log.exception("session %s: error while closing", self.id)
        for v in list(self.viewers):
            await v.close()
        if self.source is not None:
            self.source.detach(self)
        if self.upload is not None:
            self.manager.discard_upload(self.upload)
        await asyncio.gather(*tasks, return_exceptions=True)
        seconds = time.monotonic() - self.created
        size = "{}x{}".format(*self.size) if self.size else "no frames"
        EVENTS.info("session %s closed: %s, %s, %d frames in, %d out in %.1f s (%.1f fps), %d dropped", self.id[:6],
                    self.kind, size, self.received, self.sent, seconds, self.sent / max(seconds, 1e-9), self.dropped())
        # What the session's frames used is free now, but stays with the allocator unless handed back (memory.py).
        with contextlib.suppress(RuntimeError):  # the executor is gone: the server is shutting down
            await self.loop.run_in_executor(None, memory.trim)


class SessionManager:
    """`engines`: one per model, by the name a client uses for it (`--model` as given); sessions start with the
    first."""

    def __init__(self, engines: dict[str, Engine], *, max_sessions: int, background: Background, upload_dir: Path,
                 smoothing: float = DEFAULT_STRENGTH, upload_limit: int = 8 * 2**20):
        if not engines:
            raise ValueError("a server needs at least one model")
        self.engines = dict(engines)
        self.models = list(self.engines)
        self.max_sessions = max_sessions
        self.background = background
        # Decoded once, here, for every session's stream (never on the event loop per session, nor in the engine).
        self.background_image = load_rgb(background.path) if background.kind == "image" else None
        self.smoothing = smoothing
        self.upload_dir = Path(upload_dir)
        self.upload_limit = upload_limit
        self.sessions: dict[str, Session] = {}
        self.latency = Histogram()
        self.opened = self.refused = 0
        self.finished = {"received": 0, "sent": 0, "dropped": 0}  # totals of closed sessions

    @property
    def engine(self) -> Engine:
        """The engine of the first model, which sessions start with."""
        return self.engines[self.models[0]]

    def engine_for(self, name) -> Engine:
        """The engine of model `name`; ControlError naming the models there are."""
        if not isinstance(name, str) or name not in self.engines:
            shown = repr(name) if isinstance(name, str) else "a model name"
            raise ControlError(f"unknown model {shown[:80]}: this server runs {', '.join(self.models)} "
                               "(start it with --model NAME ... to offer others)")
        return self.engines[name]

    def check_room(self) -> None:
        if len(self.sessions) >= self.max_sessions:
            self.refused += 1
            raise Full(f"server full: all {self.max_sessions} sessions are in use, try again later")

    def open(self, kind: str, source: Session | None = None) -> Session:
        self.check_room()
        s = Session(self, kind, source)
        self.sessions[s.id] = s
        self.opened += 1
        if source is not None:
            source.attach(s)
        # Only the start of the id: the whole one lets its holder upload backgrounds and follow the camera (OBS).
        EVENTS.info("session %s opened: %s, %d of %d in use", s.id[:6], kind, len(self.sessions), self.max_sessions)
        return s

    def _remove(self, s: Session) -> None:
        if self.sessions.pop(s.id, None) is not None:
            self.finished["received"] += s.received
            self.finished["sent"] += s.sent
            self.finished["dropped"] += s.dropped()

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id) if isinstance(session_id, str) else None

    def camera(self, session_id: str | None) -> Session | None:
        """The camera session an OBS view follows: the one named, else the newest."""
        if session_id:
            s = self.get(session_id)
            return s if s is not None and s.kind != "viewer" else None
        cams = [s for s in self.sessions.values() if s.kind != "viewer"]
        return max(cams, key=lambda s: s.created) if cams else None

    def totals(self) -> dict:
        live = list(self.sessions.values())
        return {k: self.finished[k] + sum(getattr(s, k) if k != "dropped" else s.dropped() for s in live)
                for k in self.finished}

    def save_upload(self, session_id: str, data: bytes) -> tuple[Path, np.ndarray]:
        """Runs in a worker thread: decode_upload's checks, then a PNG of it; returns its path and its pixels
        (RGB (H, W, 3) uint8, for the stream)."""
        img = decode_upload(data, self.upload_limit)
        path = self.upload_dir / f"{session_id}-{secrets.token_hex(4)}.png"
        img.save(path, compress_level=1)
        return path, np.array(img)

    def discard_upload(self, path: Path) -> None:
        # Later, not now: the engine may be reading it for a batch already under way.
        asyncio.get_running_loop().call_later(5.0, lambda: path.unlink(missing_ok=True))

    async def close_all(self) -> None:
        for s in list(self.sessions.values()):
            await s.close()
