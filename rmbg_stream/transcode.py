"""`rmbg-stream transcode`: video files through the engine, audio and subtitles kept.

    decode thread (VideoReader) -> feeder -> engine file stream (lossless, in order) -> this thread
    -> encode thread (VideoWriter: temporary file, renamed onto the output when complete)

Every frame keeps its source timestamp. The engine owns the model and the device; nothing here touches them.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import av

from .engine.composite import Background, parse_background
from .engine.engine import Engine, StreamOptions
from .engine.setup import build_backend
from .engine.smoothing import DEFAULT_STRENGTH
from .media.background import LoopingVideo
from .media.reader import VIDEO_SUFFIXES, MediaError, VideoReader
from .media.writer import VideoWriter, alpha_capable, check_folder, plan
from .tuning import share_cpu

DEFAULT_COLOR = "#00b140"  # broadcast chroma green: what the output is keyed on again downstream
FORMATS = {"mp4": ".mp4", "mkv": ".mkv", "mov": ".mov", "webm": ".webm", "png": ""}


@dataclass
class Summary:
    input: str
    output: str | None
    status: str = "ok"
    frames_in: int = 0
    frames_out: int = 0
    seconds: float = 0.0
    fps: float = 0.0
    error: str | None = None
    warnings: list[str] = field(default_factory=list)


class Progress:
    """A tqdm bar on a terminal, a plain line every `interval` seconds otherwise, nothing when quiet."""

    def __init__(self, name: str, total: int, quiet: bool = False, interval: float = 5.0, stream=None):
        self.stream = stream or sys.stderr
        self.name, self.total, self.quiet, self.interval = name, total or None, quiet, interval
        self.done = 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if not quiet and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=name, unit="frame", file=self.stream, dynamic_ncols=True,
                            leave=False)

    def update(self, done: int, total: int | None = None) -> None:
        if total and not self.total:  # known once the input is open
            self.total = total
            if self.bar is not None:
                self.bar.total = total
        if self.bar is not None:
            self.bar.update(done - self.done)
        self.done = done
        now = time.monotonic()
        if self.bar is None and not self.quiet and now - self.last >= self.interval:
            self.last = now
            fps = done / max(now - self.start, 1e-9)
            if self.total:
                eta = max(self.total - done, 0) / max(fps, 1e-9)
                print(f"{self.name}: {done}/{self.total} frames, {fps:.1f} fps, ETA {eta:.0f} s", file=self.stream,
                      flush=True)
            else:
                print(f"{self.name}: {done} frames, {fps:.1f} fps", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def default_background(output: str | Path) -> Background:
    return parse_background("transparent" if alpha_capable(output) else DEFAULT_COLOR)


def transcode(engine: Engine, src: str | Path, dest: str | Path, *, background: Background | None = None,
              mask: bool = False, smoothing: float = DEFAULT_STRENGTH, decontaminate: bool = False,
              codec: str | None = None, crf: int | None = None, on_frame=None, allow_truncated: bool = False,
              open_reader=None, keep_from: int | None = None, number_from: int = 1) -> Summary:
    """One file. Raises MediaError for an unusable input (a truncated one too, unless `allow_truncated`: then
    what could be read is kept, with a warning), ValueError for an impossible output, anything else for failures
    along the way; in every case nothing is left at `dest`. `on_frame(done, total)` is called after each frame is
    handed to the encoder (progress; an exception there aborts cleanly).

    A part of a file (`cluster` segments): `open_reader(prefer_yuv)` gives a reader like VideoReader (`info`,
    `yuv`, `spec`, `decoded`, `truncated`, iteration, `close`); results before pts `keep_from` (the run-in that
    gives temporal smoothing its history) are dropped, no audio or subtitles are copied, and a PNG sequence numbers
    its frames from `number_from`."""
    src, dest = Path(src), Path(dest)
    if dest.exists() and src.exists() and dest.resolve() == src.resolve():
        raise ValueError(f"{dest}: the output would overwrite the input")
    background = background or default_background(dest)
    mode = "gray" if mask else ("rgba" if background.kind == "transparent" else "rgb")
    t0 = time.perf_counter()
    summary = Summary(str(src), str(dest))
    # Straight from the decoder's 4:2:0 planes to the encoder's when both sides are 8-bit 4:2:0: no RGB conversion
    # on the way in or out (on the CPU those two cost about as much as the chroma keyer itself).
    target = plan(dest, mode, 2, 2, codec, crf)  # an impossible output fails before any decoding
    prefer_yuv = mode == "gray" or (mode == "rgb" and target.pix_fmt == "yuv420p")
    reader = (open_reader(prefer_yuv) if open_reader is not None
              else VideoReader(src, prefer_yuv=prefer_yuv, allow_truncated=allow_truncated))
    info = reader.info
    bg_video = writer = stream = feeder = None
    committed = False
    failed: list[BaseException] = []

    def feed():
        try:
            for frame in reader:
                stream.submit(frame.image, pts=frame.pts)
        except BaseException as exc:  # raised by the consumer; after an abort it is just the closed stream
            failed.append(exc)
        finally:
            try:
                stream.end()
            except RuntimeError:
                pass

    try:
        if background.kind == "video" and not mask:
            bg_video = LoopingVideo(background.path)
        writer = VideoWriter(dest, info, mode, codec=codec, crf=crf, copy_from=None if open_reader else str(src),
                             number_from=number_from)
        options = StreamOptions(background=background, smoothing=smoothing, image=not mask, alpha=mask,
                                decontaminate=decontaminate)
        stream = engine.open_stream(live=False, options=options, background_source=bg_video,
                                    pixel_format="yuv420p" if reader.yuv else "rgb24", spec=reader.spec)
        feeder = threading.Thread(target=feed, name="rmbg-feed", daemon=True)
        feeder.start()
        done = 0
        while (r := stream.get()) is not None:
            if keep_from is not None and r.pts < keep_from:
                continue
            writer.write(r.alpha if mask else r.image, r.pts)
            done += 1
            if on_frame is not None:
                on_frame(done, info.frames)
        feeder.join()
        if failed:
            raise failed[0]
        summary.frames_in = reader.decoded
        writer.close(expected=reader.decoded)
        committed = True
        summary.frames_out = writer.written
        summary.warnings = writer.warnings + ([f"input truncated, kept what could be read: {reader.truncated}"]
                                              if reader.truncated else [])
    finally:
        # In this order: closing the stream unblocks the feeder, which is the only user of the background
        # video and the reader's frames.
        if stream is not None:
            stream.close()
        if feeder is not None:
            feeder.join()
        if writer is not None and not committed:
            writer.abort()
        if bg_video is not None:
            bg_video.close()
        reader.close()
    summary.seconds = round(time.perf_counter() - t0, 3)
    summary.fps = round(summary.frames_out / max(summary.seconds, 1e-9), 2)
    return summary


# -- command line


def input_pairs(src: Path, dest: Path, fmt: str | None) -> list[tuple[Path, Path]]:
    """(input, output) pairs: one file, or every video file of a folder into the output folder."""
    if not src.is_dir():
        if fmt is not None:
            raise ValueError("--format is for folder inputs; give the output file its extension instead")
        return [(src, dest)]
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest}: the input is a folder, so the output must be a folder too")
    files = sorted(p for p in src.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in VIDEO_SUFFIXES)
    suffix = FORMATS[fmt or "mp4"]
    stems = [p.stem for p in files]
    # Two inputs with one stem (a.mov, a.mp4) keep their whole names rather than overwrite each other.
    return [(p, dest / ((p.stem if stems.count(p.stem) == 1 else p.name) + suffix)) for p in files]


def check_video_background(bg: Background) -> None:
    """A VIDEO background must exist before the model loads (an IMAGE one is decoded by `check_background`)."""
    if bg.kind == "video" and not Path(bg.path).is_file():
        raise ValueError(f"background video not found: {bg.path}")


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C, so the temporary file is removed


def run_cli(args) -> int:
    if getattr(args, "cluster", None) is not None:
        from .cluster import run_cli as run_cluster

        return run_cluster(args)
    src, dest = Path(args.input), Path(args.output)
    fmt = getattr(args, "format", None)
    if not src.exists():
        return _fail_early(args, src, f"{src}: no such file or folder")
    pairs = input_pairs(src, dest, fmt)
    if not pairs:
        return _fail_early(args, src, f"{src}: no video files in the folder")
    backgrounds = {}
    for _, out in pairs:
        bg = parse_background(args.background) if args.background else default_background(out)
        check_video_background(bg)
        backgrounds[out] = bg
        mode = "gray" if args.mask else ("rgba" if bg.kind == "transparent" else "rgb")
        plan(out, mode, 2, 2, args.codec, args.crf)  # impossible combinations fail now, before the model loads
        check_folder(out)
    if not 0.0 <= args.smoothing <= 1.0:
        raise ValueError(f"--smoothing must be within 0..1, got {args.smoothing}")
    # Inputs that do not open are reported now: a lone bad file never waits for the model (or the hub) first.
    unreadable = {inp: s for inp, _ in pairs if (s := _probe(inp)) is not None}

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    summaries: list[Summary] = []
    t0 = time.perf_counter()
    try:
        if len(unreadable) == len(pairs):
            summaries = list(unreadable.values())
        else:
            backend = build_backend(args)
            share_cpu(backend)
            with Engine(backend, max_batch=max(1, args.batch), max_wait_ms=4) as engine:
                for i, (inp, out) in enumerate(pairs):
                    name = inp.name if len(pairs) == 1 else f"[{i + 1}/{len(pairs)}] {inp.name}"
                    summaries.append(unreadable.get(inp) or _one(engine, args, inp, out, backgrounds[out], name))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    failures = [s for s in summaries if s.status != "ok"]
    if src.is_dir() and failures:
        print(f"failed: {len(failures)} of {len(summaries)} files:", file=sys.stderr)
        for s in failures:
            print(f"  {s.input}: {s.error}", file=sys.stderr)
    if args.json:
        if src.is_dir():
            seconds = round(time.perf_counter() - t0, 3)
            frames = sum(s.frames_out for s in summaries)
            report = {"input": str(src), "output": str(dest), "status": "error" if failures else "ok",
                      "frames_in": sum(s.frames_in for s in summaries), "frames_out": frames,
                      "seconds": seconds, "fps": round(frames / max(seconds, 1e-9), 2),
                      "files": [asdict(s) for s in summaries],
                      "failures": [{"input": s.input, "error": s.error} for s in failures]}
        else:
            report = asdict(summaries[0])
        print(json.dumps(report))
    if not failures:
        return 0
    return 2 if not src.is_dir() and failures[0].status == "invalid" else 1


def _one(engine, args, inp: Path, out: Path, background: Background, name: str) -> Summary:
    progress = Progress(name, 0, quiet=args.quiet)
    try:
        s = transcode(engine, inp, out, background=background, mask=args.mask, smoothing=args.smoothing,
                      decontaminate=args.decontaminate, codec=args.codec, crf=args.crf, on_frame=progress.update,
                      allow_truncated=getattr(args, "allow_truncated", False))
    except (MediaError, ValueError, RuntimeError, OSError, av.error.FFmpegError) as exc:
        return _failed(inp, exc)
    finally:
        progress.close()
    if not args.quiet:
        print(f"{inp} -> {out}: {s.frames_out} frames in {s.seconds:.1f} s ({s.fps:.1f} fps)", file=sys.stderr)
    return s


def _failed(inp: Path, exc: BaseException) -> Summary:
    """The one line for a file that failed, printed, and its summary."""
    text = str(exc) if str(exc).startswith(str(inp)) else f"{inp}: {exc}"
    print(f"error: {text}", file=sys.stderr)
    # A bad option or output (exit 2 for a single file) rather than a bad input or a failure on the way.
    status = "invalid" if isinstance(exc, ValueError) and not isinstance(exc, av.error.FFmpegError) else "error"
    return Summary(str(inp), None, status=status, error=str(exc))


def _probe(inp: Path) -> Summary | None:
    """None when `inp` opens and its first frame decodes; else the failure, reported."""
    try:
        VideoReader(inp).close()
    except (MediaError, OSError, av.error.FFmpegError) as exc:
        return _failed(inp, exc)
    return None


def _fail_early(args, src: Path, text: str) -> int:
    print(f"error: {text}", file=sys.stderr)
    if args.json:
        print(json.dumps(asdict(Summary(str(src), None, status="error", error=text))))
    return 1
