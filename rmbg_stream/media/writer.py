"""Encode frames to a video file or a PNG sequence, in a thread, with the source's audio and subtitles.

Outputs are atomic: everything is written to a hidden temporary file (or folder) beside the target and renamed
onto it only when complete, so an interrupt or an error never leaves a partial output behind (a killed process
can leave its hidden ``.NAME.*.part``, never a truncated NAME).

Timestamps are the source's: each frame is encoded with the pts it came with, in the source stream's time base
(Matroska/WebM store milliseconds, so there they are rounded to 1 ms, and cannot start before zero: when copied
audio starts early, e.g. AAC priming, the muxer moves every stream up together). Colour range and matrix are the
source's too (limited range when the source does not say). Odd sizes are kept: H.264/H.265 4:2:0 needs even
sizes, so an odd-sized frame is encoded 4:4:4 there rather than padded or cropped (VP9 4:2:0 takes odd sizes).

`VideoWriter` is the one entry point: `plan` checks the target before anything is opened, then an encode thread
(`worker.Worker`) feeds one `Sink`, a `PngSequence` or a `ContainerSink`, and `close` renames its output into place.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image

from .i420 import i420_frame
from .reader import VideoInfo, io_threads
from .worker import Worker

log = logging.getLogger(__name__)

CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm"}
ALPHA_SUFFIXES = {".mov", ".webm"}  # plus PNG sequences
PNG_PATTERN = "frame_%05d.png"
MODE_PIX = {"rgb": "rgb24", "rgba": "rgba", "gray": "gray"}  # the engine's arrays for each mode

# (default codec, default codec when the frames have alpha, audio codec when the source's cannot be copied)
DEFAULTS = {
    "mp4": ("libx264", None, "aac"),
    "mov": ("libx264", "prores_ks", "aac"),
    "matroska": ("libx264", None, "libopus"),
    "webm": ("libvpx-vp9", "libvpx-vp9", "libopus"),
}
# Codecs a muxer takes as a stream but refuses when it writes the header ("opus only supported in MP4": FFmpeg's
# mov muxer in mov mode, which is what .mov writes), by codec name: re-encoded instead of copied.
HEADER_REFUSES = {"mov": {"opus", "flac", "truehd"}}
ALPHA_PIX = ("yuva444p10le", "yuva444p12le", "yuva420p", "yuva444p", "rgba", "bgra", "gbrap", "argb")
EVEN_PIX = ("yuv420p", "yuv422p10le", "yuv444p")
ODD_PIX = ("yuv444p", "yuv444p10le", "gbrp", "rgb24", "yuv420p")
ODD_420 = {"libvpx-vp9", "libaom-av1"}  # these round the chroma planes up, so 4:2:0 keeps odd sizes
# The swscale matrix for each AVColorSpace we can write; anything else (unspecified) uses swscale's default.
SWS_MATRIX = {1: "ITU709", 4: "FCC", 5: "ITU601", 6: "SMPTE170M", 7: "SMPTE240M", 9: "BT2020", 10: "BT2020"}


def is_png_sequence(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() or p.suffix == ""


def alpha_capable(path: str | Path) -> bool:
    return is_png_sequence(path) or Path(path).suffix.lower() in ALPHA_SUFFIXES


@dataclass
class Target:
    path: Path
    format: str | None  # muxer name; None for a PNG sequence
    codec: str | None = None
    pix_fmt: str | None = None
    options: dict = field(default_factory=dict)
    bit_rate: int | None = None
    notes: list[str] = field(default_factory=list)  # warnings for the user, given once the output is opened


def plan(path: str | Path, mode: str, width: int, height: int, codec: str | None = None,
         crf: int | None = None) -> Target:
    """Container, codec, pixel format and options for `mode` ('rgb', 'rgba' or 'gray' frames); ValueError with
    one line when the combination cannot work (e.g. transparency in an .mp4)."""
    path = Path(path)
    if is_png_sequence(path):
        return Target(path, None)
    suffix = path.suffix.lower()
    if suffix not in CONTAINERS:
        raise ValueError(f"{path}: unsupported output type {suffix!r}: use .mp4 .m4v .mov .mkv .webm, "
                         "or a folder for a PNG sequence")
    fmt = CONTAINERS[suffix]
    plain, with_alpha, _ = DEFAULTS[fmt]
    alpha = mode == "rgba"
    if codec is None:
        codec = with_alpha if alpha else plain
        if codec is None:
            raise ValueError(f"{path}: {suffix} cannot hold transparency: write .mov (ProRes 4444), .webm (VP9) "
                             "or a PNG folder, or pick a --background")
    try:
        supported = [f.name for f in av.Codec(codec, "w").video_formats or ()]
    except (av.error.FFmpegError, ValueError):
        raise ValueError(f"unknown video encoder {codec!r}") from None
    odd = (width % 2 or height % 2) and codec not in ODD_420
    wanted = ALPHA_PIX if alpha else (ODD_PIX if odd else EVEN_PIX)
    pix = next((p for p in wanted if p in supported), None)
    if pix is None:
        if alpha:
            raise ValueError(f"encoder {codec} cannot store transparency; use prores_ks (.mov) or libvpx-vp9 (.webm)")
        pix = supported[0] if supported else "yuv420p"
    target = Target(path, fmt, codec, pix)
    if odd and pix.startswith("yuv444"):
        target.notes.append(f"odd frame size {width}x{height}: encoded 4:4:4 to keep it exactly "
                            "(some players only play 4:2:0)")
    if codec in ("libx264", "libx265"):
        # 'veryfast': about half the CPU of 'fast' at the same crf, files within ~10 %. With the model on the CPU
        # every cycle the encoder takes is one the model does not get.
        target.options = {"preset": "veryfast", "crf": str(18 if crf is None else crf)}
    elif codec == "libvpx-vp9":
        target.options = {"crf": str(30 if crf is None else crf), "deadline": "good", "cpu-used": "4", "row-mt": "1"}
        target.bit_rate = 0  # constant quality: VP9 only honours crf without a bit rate
    elif codec == "prores_ks":
        target.options = {"profile": "4" if alpha else "3", "vendor": "apl0"}  # 4444 / HQ
        if crf is not None:
            target.notes.append("--crf has no effect on prores_ks")
    elif crf is not None:
        target.options = {"crf": str(crf)}
    return target


def c_strides(a: np.ndarray) -> np.ndarray:
    """`a` with C strides, which PyAV's zero-copy wraps check. numpy calls an array with a length-1 axis
    contiguous whatever that axis's stride, and torch hands out such views (a 1x1 frame: strides (4, 4, 4) for a
    (1, 1, 3) array), so np.ascontiguousarray alone lets them through."""
    a = np.ascontiguousarray(a)
    strides = tuple(int(a.itemsize * np.prod(a.shape[i + 1:])) for i in range(a.ndim))
    return a if a.strides == strides else a.copy()


def check_folder(dest: str | Path) -> None:
    """ValueError (one line) unless the folder `dest` is written in exists, or can be made, and is writable: the
    front ends call it before the model loads; the writer makes the folder later."""
    for folder in Path(dest).absolute().parents:
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"{dest}: {folder} is a file, not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ValueError(f"{dest}: cannot write in {folder} (permission denied)")
            return


def temp_beside(dest: Path, folder: bool) -> Path:
    """A new hidden name beside `dest` (same filesystem, so the final rename is atomic), created with the
    usual permissions rather than mkstemp's private ones."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = dest.parent / f".{dest.name}.{secrets.token_hex(4)}.part"
        try:
            if folder:
                tmp.mkdir()
            else:
                tmp.open("xb").close()
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {dest}")


def check_png_folder(dest: Path) -> None:
    """A PNG sequence replaces an earlier one, never a folder holding anything else."""
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest}: exists and is not a folder")
    if dest.is_dir():
        strangers = [p.name for p in dest.iterdir() if not (p.name.startswith("frame_") and p.suffix == ".png")]
        if strangers:
            raise ValueError(f"{dest}: folder holds other files ({strangers[0]}, ...); choose an empty or new folder")


class Passthrough:
    """The source's audio and subtitle streams: copied where the container takes the codec, audio re-encoded
    otherwise, anything else dropped with a warning. Packets are muxed in step with the video, so the output
    stays interleaved."""

    def __init__(self, source: str, out: av.container.OutputContainer, video_index: int, audio_codec: str,
                 warn):
        self.src = av.open(source, metadata_errors="replace")
        self.out = out
        self.routes: dict[int, tuple] = {}  # input index -> (output stream, re-encode?)
        kind = out.format.name.split(",")[0]
        for s in self.src.streams:
            if s.index == video_index:
                continue
            name = s.codec_context.name if s.codec_context is not None else (s.codec.name if s.codec else "?")
            what = f"{s.type} stream #{s.index} ({name})"
            if s.type == "video":
                warn(f"{what} dropped: only the first video stream is processed")
                continue
            if s.type not in ("audio", "subtitle"):
                warn(f"{what} dropped: {s.type} streams are not copied")
                continue
            try:
                if s.codec_context.codec.canonical_name in HEADER_REFUSES.get(kind, ()):
                    raise ValueError(f"{kind} cannot hold {name}")
                o = out.add_stream_from_template(s)
                self.routes[s.index] = (o, False)
            except (ValueError, av.error.FFmpegError):
                if s.type != "audio":
                    warn(f"{what} dropped: {kind} cannot hold {name} subtitles")
                    continue
                o = self._audio_encoder(s, audio_codec)
                self.routes[s.index] = (o, True)
                warn(f"{what} re-encoded as {audio_codec}: {kind} cannot hold {name}")
            o.metadata.update({k: v for k, v in s.metadata.items() if k.lower() in ("language", "title")})
            o.disposition = s.disposition
        self.packets = self.src.demux([self.src.streams[i] for i in self.routes]) if self.routes else iter(())
        self.pending = None

    def _audio_encoder(self, s, codec: str):
        rates = av.Codec(codec, "w").audio_rates
        rate = s.rate if not rates or s.rate in rates else 48000
        layout = s.layout.name if s.layout.nb_channels <= 2 else "stereo"
        o = self.out.add_stream(codec, rate=rate, layout=layout)
        if codec == "aac" or codec == "libopus":
            o.bit_rate = 128000 if s.layout.nb_channels <= 2 else 192000
        return o

    def pump(self, until: float | None) -> None:
        """Mux every source packet up to `until` seconds (all that is left for None)."""
        while True:
            if self.pending is None:
                self.pending = next(self.packets, None)
                if self.pending is None:
                    return
            p = self.pending
            ts = p.dts if p.dts is not None else p.pts
            if until is not None and ts is not None and float(ts * p.time_base) > until:
                return
            self.pending = None
            o, encode = self.routes[p.stream.index]
            if encode:
                for frame in p.decode():  # an empty packet flushes the decoder
                    self.out.mux(o.encode(frame))
            elif p.size:
                p.stream = o
                self.out.mux(p)

    def finish(self) -> None:
        self.pump(None)
        for o, encode in self.routes.values():
            if encode:
                self.out.mux(o.encode(None))

    def close(self) -> None:
        self.src.close()


class Sink(Protocol):
    """Where `VideoWriter`'s encode thread sends frames (`write`, then `finish` once after the last), written under
    `tmp`, a hidden name beside `path`; afterwards the caller's thread either `commit`s (rename onto `path`) or
    `discard`s (leave nothing)."""

    path: Path
    tmp: Path

    def write(self, image: np.ndarray, pts: int) -> None: ...

    def finish(self) -> None: ...

    def commit(self) -> None: ...

    def discard(self) -> None: ...


def dropped_streams(source: str, video_index: int) -> list[str]:
    """The warnings for the source's audio, subtitle and data streams, which a PNG sequence cannot hold."""
    with av.open(source, metadata_errors="replace") as src:
        return [f"{s.type} stream #{s.index} dropped: a PNG sequence has no {s.type}" for s in src.streams
                if s.index != video_index and s.type in ("audio", "subtitle", "data")]


def commit_folder(tmp: Path, path: Path) -> None:
    """Rename the finished folder `tmp` onto `path`; an earlier sequence there (checked to hold only frames) is
    swapped out, then removed."""
    if path.is_dir():
        old = temp_beside(path, folder=True)
        os.replace(path, old / "old")
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


class PngSequence:
    """A folder of frame_00001.png, frame_00002.png, ... (the order is the timestamps'; a PNG has no time). An
    earlier sequence at the target is replaced whole; a folder holding anything else is refused before anything is
    written."""

    def __init__(self, target: Target, info: VideoInfo, mode: str, copy_from: str | None,
                 warn: Callable[[str], None], number_from: int = 1):
        """`number_from`: the first frame's number (a cluster segment writes its part of the whole's numbers)."""
        self.path = target.path
        check_png_folder(self.path)
        self.tmp = temp_beside(self.path, folder=True)
        self.count = number_from - 1
        try:
            if copy_from:
                for text in dropped_streams(copy_from, info.index):
                    warn(text)
        except BaseException:
            self.discard()
            raise

    def write(self, image: np.ndarray, pts: int) -> None:
        self.count += 1
        # Level 1: several times faster than the default and only slightly larger.
        Image.fromarray(image).save(self.tmp / (PNG_PATTERN % self.count), compress_level=1)

    def finish(self) -> None:
        pass  # every frame is a finished file already

    def commit(self) -> None:
        commit_folder(self.tmp, self.path)

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class ContainerSink:
    """One video file: frames encoded with the source's timestamps and colour, and the source's audio and subtitles
    (`copy_from`) muxed in step with them."""

    def __init__(self, target: Target, info: VideoInfo, mode: str, copy_from: str | None,
                 warn: Callable[[str], None]):
        self.target, self.info, self.mode = target, info, mode
        self.path = target.path
        self.container: av.container.OutputContainer | None = None
        self.passthrough: Passthrough | None = None
        self.tmp = temp_beside(self.path, folder=False)
        try:
            self._open(copy_from, warn)
        except BaseException:
            self.discard()
            raise

    def _open(self, copy_from: str | None, warn: Callable[[str], None]) -> None:
        t, info = self.target, self.info
        self.container = out = av.open(str(self.tmp), "w", format=t.format)
        vs = out.add_stream(t.codec, rate=info.rate or 30, options=t.options)
        vs.width, vs.height, vs.pix_fmt = info.width, info.height, t.pix_fmt
        vs.thread_count = io_threads()
        # The source's time base, so every pts goes through unchanged.
        vs.time_base = info.time_base
        vs.codec_context.time_base = info.time_base
        if t.bit_rate is not None:
            vs.bit_rate = t.bit_rate
        cc = vs.codec_context
        self.color_range = info.color_range or 1  # unspecified: the limited range every decoder assumes
        cc.color_range = self.color_range
        cc.colorspace, cc.color_primaries, cc.color_trc = info.colorspace, info.color_primaries, info.color_trc
        if info.sample_aspect_ratio:
            cc.sample_aspect_ratio = info.sample_aspect_ratio
        self.video = vs
        self.sws = VideoReformatter()
        self.matrix = SWS_MATRIX.get(info.colorspace)
        if copy_from:
            self.passthrough = Passthrough(copy_from, out, info.index, DEFAULTS[t.format][2], warn)
            # Title, creation time, location...; the brand and encoder tags describe the old file, not this one.
            out.metadata.update({k: v for k, v in self.passthrough.src.metadata.items()
                                 if k.lower() not in ("major_brand", "minor_version", "compatible_brands", "encoder")})

    def write(self, image: np.ndarray, pts: int) -> None:
        i420 = self.mode == "rgb" and image.ndim == 2
        if i420:
            frame = i420_frame(image)  # from_numpy_buffer gets heights that are 2 mod 4 wrong: see media/i420.py
        else:
            # Wrap the engine's array instead of copying it (from_ndarray's copy costs as much as the conversion).
            frame = av.VideoFrame.from_numpy_buffer(c_strides(image), format=MODE_PIX[self.mode])
        if not (i420 and self.target.pix_fmt == "yuv420p"):  # I420 from the engine is in the source's matrix
            # AREA: a box filter for the 2:1 chroma decimation, better than swscale's bilinear default and cheaper.
            frame = self.sws.reformat(frame, format=self.target.pix_fmt, dst_colorspace=self.matrix,
                                      dst_color_range=self.color_range, interpolation="AREA", threads=io_threads())
        frame.pts = pts
        frame.time_base = self.info.time_base
        self.container.mux(self.video.encode(frame))
        if self.passthrough is not None:
            self.passthrough.pump(float(pts * self.info.time_base))

    def finish(self) -> None:
        """Flush the encoder (x264 holds frames back; the header can be written only now) and the source's rest."""
        self.container.mux(self.video.encode(None))
        if self.passthrough is not None:
            self.passthrough.finish()

    def commit(self) -> None:
        if self.passthrough is not None:
            self.passthrough.close()
        self.container.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        for closing in (self.passthrough, self.container):
            if closing is not None:
                try:
                    closing.close()
                except Exception:  # already failing: the temporary file goes either way
                    pass
        self.passthrough = self.container = None
        self.tmp.unlink(missing_ok=True)


class VideoWriter:
    """`write(image, pts)` frames (H x W x 3 RGB or (3H/2, W) I420 for mode "rgb", H x W x 4 RGBA, H x W grey
    uint8, per `mode`), then `close()` to finish and rename onto the target, or `abort()` to leave nothing.
    Encoding and muxing run in a thread (`Worker`) into a `PngSequence` or a `ContainerSink`, per the target; an
    error there is raised by the next `write` or by `close`."""

    def __init__(self, path: str | Path, info: VideoInfo, mode: str = "rgb", *, codec: str | None = None,
                 crf: int | None = None, copy_from: str | None = None, queue_size: int = 8, number_from: int = 1):
        """`number_from`: a PNG sequence's first frame number (1; a cluster segment starts at its place)."""
        self.info = info
        self.mode = mode
        self.target = plan(path, mode, info.width, info.height, codec, crf)
        self.path = self.target.path
        self.warnings: list[str] = []
        self.written = 0
        for note in self.target.notes:
            self._warn(note)
        self._sink: Sink
        if self.target.format is None:
            self._sink = PngSequence(self.target, info, mode, copy_from, self._warn, number_from)
        else:
            self._sink = ContainerSink(self.target, info, mode, copy_from, self._warn)
        self._worker = Worker("rmbg-encode", self._run, queue_size)

    @property
    def error(self) -> BaseException | None:
        """What failed in the encode thread, if anything."""
        return self._worker.error

    def _warn(self, text: str) -> None:
        self.warnings.append(text)
        log.warning("%s: %s", Path(self.info.path).name, text)

    def write(self, image: np.ndarray, pts: int) -> None:
        """Queue one frame (`pts` in the source's time base); waits while the queue is full."""
        self._worker.put((image, pts))

    def close(self, expected: int | None = None) -> Path:
        """Finish encoding, close the file and move it onto the target; returns the target path. With
        `expected`, a frame count other than that is an error (nothing is left at the target)."""
        try:
            self._worker.finish()
            if expected is not None and self.written != expected:
                raise RuntimeError(f"wrote {self.written} frames, expected {expected}")
            self._sink.commit()
        except BaseException:
            self._sink.discard()
            raise
        return self.path

    def abort(self) -> None:
        self._worker.stop()
        self._sink.discard()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _run(self, worker: Worker) -> None:
        """The encode thread."""
        for image, pts in worker.items():
            self._sink.write(image, pts)
            self.written += 1
        if not worker.stopped:  # END from close(), not abort()
            self._sink.finish()
