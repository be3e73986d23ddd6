"""Decode the first video stream of a file in a thread: upright RGB frames with their original timestamps.

Rotation (the display matrix, or an old-style ``rotate`` tag) is applied here, so everything downstream (the
model, backgrounds, PNG sequences) sees frames the right way up and outputs need no rotation metadata.
Timestamps are never renumbered: each frame keeps its own ``pts`` in the stream's ``time_base``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ..engine.yuv import i420_planes, spec_of
from ..tuning import cores
from .worker import END, Worker

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
                  ".flv", ".wmv", ".3gp", ".ogv", ".gif", ".y4m"}


def io_threads() -> int:
    """Threads for each decoder, encoder and converter: half the cores, so that with a CPU engine (the
    bottleneck there) file I/O never crowds out the model's own threads. Of this process's share of the cores
    (`tuning.limit_cores`: a cluster worker's), not the whole machine's."""
    return max(1, cores() // 2)


class MediaError(Exception):
    """An input that cannot be used; the message is one line meant for the user."""


@dataclass(frozen=True)
class VideoInfo:
    path: str
    width: int  # after rotation
    height: int
    time_base: Fraction
    rate: Fraction | None  # average frame rate; the timestamps are what count
    frames: int  # frame count from the container, 0 if unknown (progress estimate only)
    duration: float | None  # seconds
    rotation: int  # counter-clockwise degrees applied to the stored pixels (0, 90, 180, 270)
    color_range: int  # AVColorRange of the source: 0 unspecified, 1 limited (tv), 2 full (pc)
    colorspace: int  # AVColorSpace
    color_primaries: int
    color_trc: int
    sample_aspect_ratio: Fraction | None
    codec: str
    index: int  # the stream's index in the container


@dataclass
class Frame:
    image: np.ndarray | tuple  # H x W x 3 uint8 RGB, upright; or (Y, U, V) 4:2:0 planes when the reader is `yuv`
    pts: int  # in VideoInfo.time_base
    time: float  # seconds


def open_input(path: str | Path) -> av.container.InputContainer:
    """av.open with the reasons a user can act on turned into one-line MediaErrors."""
    p = Path(path)
    if not p.exists():
        raise MediaError(f"{p}: no such file")
    if p.is_dir():
        raise MediaError(f"{p}: is a folder")
    try:
        return av.open(str(p), metadata_errors="replace")
    except av.error.InvalidDataError:
        raise MediaError(f"{p}: not a media file, or truncated (no readable header)") from None
    except av.error.FFmpegError as exc:
        raise MediaError(f"{p}: cannot open ({_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__


def display_rotation(frame: av.VideoFrame, stream) -> int:
    """Counter-clockwise degrees (0, 90, 180, 270) a player turns this stream's frames by."""
    deg = frame.rotation
    if not deg:
        tag = stream.metadata.get("rotate")  # clockwise degrees, written by older muxers
        try:
            deg = -int(float(tag)) if tag else 0
        except ValueError:
            deg = 0
    turned = round(deg / 90) * 90
    if turned != deg:
        log.warning("rotation of %s degrees rounded to %s", deg, turned)
    return turned % 360


def upright(image: np.ndarray, rotation: int) -> np.ndarray:
    """The frame turned counter-clockwise by `rotation` degrees, as players display it."""
    if not rotation:
        return image
    return np.ascontiguousarray(np.rot90(image, rotation // 90))


def expected_end(stream, container) -> tuple[float, bool] | None:
    """(seconds at which the container says the video ends, whether that is the video's own end): the stream's
    duration (MP4, MOV) or DURATION tag (Matroska, WebM), else the whole file's, which is the longest stream's;
    None when the file does not say."""
    tb = stream.time_base or Fraction(1, 90000)
    start = float(stream.start_time * tb) if stream.start_time is not None else 0.0
    if stream.duration:
        return start + float(stream.duration * tb), True
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration") or ""
    parts = tag.split(":")
    if len(parts) == 3:
        try:
            return start + int(parts[0]) * 3600 + int(parts[1]) * 60 + float(parts[2]), True
        except ValueError:
            pass
    if container.duration:
        return (container.start_time or 0) / 1e6 + container.duration / 1e6, False
    return None


def shortfall(path: str, stream, container, decoded: int, last_pts: int | None) -> str | None:
    """What is missing when `decoded` frames, the last at `last_pts`, fall short of the frame count or the
    duration the container gives; None when they do not (or it gives neither).

    The slack is one frame interval plus 50 ms: the last frame's own duration is not stored, and the ten real clips
    in ../shared/media end within that of what their containers say (fire2.mp4, variable rate, ends its last
    frame's 0.1 s before its stream duration)."""
    if stream.frames and decoded < stream.frames - 1:
        return f"decoded {decoded} of the {stream.frames} frames the container lists"
    expected = expected_end(stream, container)
    if expected is None or last_pts is None:
        return None
    end, own = expected
    rate = stream.average_rate or stream.guessed_rate
    step = float(1 / rate) if rate else 0.1
    got = float(last_pts * (stream.time_base or Fraction(1, 90000))) + step
    if got >= end - step - 0.05 or (not own and _others_end(path, stream.index) >= end - step - 0.05):
        return None
    return f"the video stops at {got:.2f} s of the {end:.2f} s the container gives ({decoded} frames)"


def _others_end(path: str, video_index: int) -> float:
    """Where the file's other streams end, in seconds: audio running on past the video accounts for a whole-file
    duration the video falls short of. Only asked when the video ends early; demuxes without decoding."""
    last = 0.0
    try:
        with av.open(path, metadata_errors="replace") as c:
            for p in c.demux():
                if p.pts is not None and p.stream.index != video_index and p.time_base:
                    last = max(last, float((p.pts + (p.duration or 0)) * p.time_base))
    except av.error.FFmpegError:
        pass  # a cut file can end mid-packet: what was read counts
    return last


class VideoReader:
    """Iterate over `Frame`s; decoding and RGB conversion run in a background thread.

    The first frame is decoded in the constructor, so a file that cannot be decoded at all fails before any
    output is created. Any later decode error, including a truncated file, ends the iteration with MediaError.
    """

    def __init__(self, path: str | Path, queue_size: int = 8, prefer_yuv: bool = False, allow_truncated: bool = False):
        """`prefer_yuv`: hand out the decoder's 4:2:0 planes untouched (no RGB conversion) when the video is 8-bit
        4:2:0 with even sizes and no rotation; `yuv` and `spec` say whether that happened.

        A file that ends before its container says it should (a cut download) ends the iteration with MediaError;
        with `allow_truncated` the frames that could be read are kept, and `truncated` says what was missing."""
        self.path = str(path)
        self.allow_truncated = allow_truncated
        self.truncated: str | None = None
        self.container = open_input(path)
        videos = [s for s in self.container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
        if not videos:
            self.container.close()
            raise MediaError(f"{path}: no video stream")
        self.stream = stream = videos[0]
        stream.thread_type = "AUTO"
        stream.thread_count = io_threads()
        self._step = None
        self._last_pts: int | None = None
        self.decoded = 0
        self._frames = self._decode()
        try:
            first = next(self._frames, None)
        except BaseException:
            self.container.close()
            raise
        if first is None:
            self.container.close()
            raise MediaError(f"{path}: the video stream has no decodable frames")
        self.rotation = rotation = display_rotation(first, stream)
        h, w = (first.height, first.width) if rotation in (0, 180) else (first.width, first.height)
        sar = stream.sample_aspect_ratio
        if sar and rotation in (90, 270):
            sar = 1 / sar
        tb = stream.time_base or Fraction(1, 90000)
        rate = stream.average_rate or stream.guessed_rate
        duration = float(stream.duration * tb) if stream.duration else (
            self.container.duration / 1e6 if self.container.duration else None)
        frames = stream.frames or (round(duration * rate) if duration and rate else 0)
        self.info = VideoInfo(
            path=self.path, width=w, height=h, time_base=tb, rate=rate, frames=frames, duration=duration,
            # yuvj formats are full range whatever the tag says.
            rotation=rotation, color_range=2 if first.format.name.startswith("yuvj") else int(first.color_range),
            colorspace=int(first.colorspace),
            color_primaries=int(first.color_primaries), color_trc=int(first.color_trc),
            sample_aspect_ratio=sar, codec=stream.codec_context.name, index=stream.index,
        )
        self.yuv = (prefer_yuv and first.format.name in ("yuv420p", "yuvj420p") and rotation == 0
                    and first.width % 2 == 0 and first.height % 2 == 0)
        self.spec = spec_of(first)
        self._first = self._convert(first)
        self._worker = Worker("rmbg-decode", self._run, queue_size)

    def _decode(self):
        """av.VideoFrames in presentation order; corrupt data raises MediaError (or, once frames have been read
        and truncation is allowed, ends them with `truncated` set)."""
        try:
            for packet in self.container.demux(self.stream):
                if packet.is_corrupt:
                    where = f" at {float(packet.pts * packet.time_base):.2f} s" if packet.pts is not None else ""
                    self._cut_short(f"truncated or corrupt video data{where}")
                    return
                yield from packet.decode()
        except av.error.FFmpegError as exc:
            self._cut_short(f"decode error after {self.decoded} frames ({_reason(exc)})")

    def _cut_short(self, why: str) -> None:
        """The video ends early: an error, or with `allow_truncated` (and a frame to keep) a warning."""
        if not (self.allow_truncated and self.decoded):
            raise MediaError(f"{self.path}: {why}" + ("; --allow-truncated keeps the frames before it"
                                                      if self.decoded else ""))
        self.truncated = why
        log.warning("%s: %s; keeping the %d frames before it", self.path, why, self.decoded)

    def _check_complete(self) -> None:
        """After the last frame: the frame count and duration the container gives must have been reached."""
        why = shortfall(self.path, self.stream, self.container, self.decoded, self._last_pts)
        if why is not None:
            self._cut_short(f"truncated: {why}")

    def _convert(self, frame: av.VideoFrame) -> Frame:
        pts = frame.pts if frame.pts is not None else frame.dts
        if pts is None or (self._last_pts is not None and pts <= self._last_pts):
            # No usable timestamp (raw streams, broken files): continue at the average rate. The only place a
            # timestamp is made up; warned once because it changes timing.
            if self._step is None:
                rate = self.stream.average_rate or self.stream.guessed_rate or Fraction(25)
                self._step = max(1, round(1 / (rate * (self.stream.time_base or Fraction(1, 90000)))))
                log.warning("%s: missing or repeated timestamps, assuming a constant frame rate", self.path)
            pts = 0 if self._last_pts is None else self._last_pts + self._step
        self._last_pts = pts
        self.decoded += 1
        tb = frame.time_base or self.stream.time_base or Fraction(1, 90000)
        if self.yuv:
            # A stream can change format mid-way; i420_planes converts such frames.
            return Frame(i420_planes(frame), pts, float(pts * tb))
        # The frame's own colour range and matrix drive the conversion (full-range phone video stays right).
        rgb = frame.to_ndarray(format="rgb24", threads=io_threads())
        return Frame(upright(rgb, self.rotation), pts, float(pts * tb))

    def _run(self, worker: Worker) -> None:
        """The decode thread: frames into the queue, then END; an error goes to the consumer after the frames."""
        if not worker.put(self._first):
            return
        for frame in self._frames:
            if worker.stopped or not worker.put(self._convert(frame)):
                return
        if self.truncated is None:
            self._check_complete()
        worker.put(END)

    def __iter__(self):
        yield from self._worker.items()  # ends early, without an error, when closed under us

    def close(self) -> None:
        self._worker.stop()
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
