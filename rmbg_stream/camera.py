"""`rmbg-stream camera`: a local capture through the engine to a virtual camera, a window or a file.

Capture runs on its own thread and feeds a live (latest-frame-wins) engine stream, so the output
never lags behind the room: when the network is slower than the camera, old frames are dropped,
not queued. Files and URLs are paced at their own frame rate, like a camera.
"""

from __future__ import annotations

import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from .engine.composite import parse_background
from .engine.engine import Engine, Result, StreamOptions
from .engine.setup import build_backend

VCAM_HELP = {
    "linux": "load v4l2loopback: sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label=rmbg-stream",
    "darwin": "install OBS Studio and start its Virtual Camera once",
    "win32": "install OBS Studio and start its Virtual Camera once",
}
DEVICE_FORMATS = {"linux": "v4l2", "darwin": "avfoundation", "win32": "dshow"}
DEFAULT_DEVICE = {"linux": "/dev/video0", "darwin": "0"}


class CameraError(Exception):
    """One line for the user: what is missing and how to get it."""


def _is_device(source: str) -> bool:
    return source.startswith("/dev/video") or source.startswith("video=") or source.isdigit()


class Capture:
    """Frames (RGB uint8, seconds) from a device, file or URL, in real time."""

    def __init__(self, source: str | None, fps: float | None, size: tuple[int, int] | None):
        source = source or DEFAULT_DEVICE.get(sys.platform)
        if source is None:
            raise CameraError("no default camera on this platform: pass --input video=<camera name>")
        self.source = source
        self.device = _is_device(source)
        options = {}
        if self.device:
            if size:
                options["video_size"] = f"{size[0]}x{size[1]}"
            if fps:
                options["framerate"] = str(fps)
        elif not ("://" in source or Path(source).exists()):
            raise CameraError(f"no such file: {source}")
        try:
            self.container = av.open(source, format=DEVICE_FORMATS.get(sys.platform) if self.device else None,
                                     options=options)
        except (av.error.FFmpegError, OSError) as exc:
            what = "no camera at" if self.device else "cannot open"
            raise CameraError(f"{what} {source} ({getattr(exc, 'strerror', None) or exc})") from None
        if not self.container.streams.video:
            self.container.close()
            raise CameraError(f"{source} has no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.fps = float(fps or rate or 30)
        self.width, self.height = self.stream.codec_context.width, self.stream.codec_context.height
        self.stop = threading.Event()

    def frames(self):
        start = None
        t0 = None
        for frame in self.container.decode(self.stream):
            if self.stop.is_set():
                return
            t = float(frame.time) if frame.time is not None else 0.0
            if not self.device:  # a file or URL plays at its own speed, as a camera would
                if start is None:
                    start, t0 = time.monotonic(), t
                time.sleep(max(0.0, start + (t - t0) - time.monotonic()))
            yield frame.to_ndarray(format="rgb24"), t

    def close(self) -> None:
        self.stop.set()
        self.container.close()


class VirtualCamera:
    def __init__(self, width: int, height: int, fps: float):
        import pyvirtualcam

        try:
            self.cam = pyvirtualcam.Camera(width, height, fps, fmt=pyvirtualcam.PixelFormat.RGB)
        except RuntimeError as exc:
            help_ = VCAM_HELP.get(sys.platform, VCAM_HELP["linux"])
            raise CameraError(f"no virtual camera device ({str(exc).splitlines()[0]}); to get one, {help_}") from None
        self.name = self.cam.device

    def send(self, result: Result) -> None:
        self.cam.send(np.ascontiguousarray(result.image[:, :, :3]))

    def close(self) -> None:
        self.cam.close()


HEADLESS_OPENCV = ("opencv-python-headless", "opencv-contrib-python-headless")
BROWSER_INSTEAD = "or see the result in a browser instead: `rmbg-stream serve`, then open http://127.0.0.1:8080"


def window_hint(reason: str) -> str:
    """Why no window could open, and how to get one: the headless OpenCV build (this package's own dependency)
    has no GUI at all, so say so and how to switch, rather than only "not implemented"."""
    from importlib import metadata

    for name in HEADLESS_OPENCV:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        gui = name.replace("-headless", "")
        return (f"window output needs OpenCV with GUI support, but the headless build ({name}) is installed: "
                f"switch with `pip uninstall {name}`, then `pip install {gui}`; {BROWSER_INSTEAD}")
    return f"cannot open a window ({reason}); {BROWSER_INSTEAD}"


class Window:
    def __init__(self):
        try:
            import cv2
        except ImportError:
            raise CameraError(f"window output needs OpenCV: `pip install opencv-python`; {BROWSER_INSTEAD}") from None
        self.cv2 = cv2
        try:
            cv2.namedWindow("rmbg-stream")
        except cv2.error as exc:
            raise CameraError(window_hint(str(exc).strip().splitlines()[-1][:160])) from None
        self.name = "window"

    def send(self, result: Result) -> None:
        self.cv2.imshow("rmbg-stream", result.image[:, :, 2::-1])
        if self.cv2.waitKey(1) in (27, ord("q")):
            raise KeyboardInterrupt

    def close(self) -> None:
        self.cv2.destroyAllWindows()


class FileOutput:
    """Records the processed feed; frames keep their capture time, so drops leave gaps, not speed-ups."""

    TIME_BASE = Fraction(1, 1000)

    def __init__(self, path: str, width: int, height: int, fps: float, alpha: bool):
        from .media.reader import VideoInfo
        from .media.writer import VideoWriter

        info = VideoInfo(path="camera", width=width, height=height, time_base=self.TIME_BASE,
                         rate=Fraction(fps).limit_denominator(1001), frames=0, duration=None, rotation=0,
                         color_range=0, colorspace=2, color_primaries=2, color_trc=2, sample_aspect_ratio=None,
                         codec="", index=0)
        self.writer = VideoWriter(path, info, "rgba" if alpha else "rgb")
        self.name = str(self.writer.path)
        self.last = -1

    def send(self, result: Result) -> None:
        pts = round(result.pts / self.TIME_BASE)
        if pts > self.last:
            self.writer.write(result.image, pts)
            self.last = pts

    def close(self) -> None:
        self.writer.close()


def open_output(kind: str, width: int, height: int, fps: float, transparent: bool):
    if kind == "vcam":
        if transparent:
            raise CameraError("a virtual camera has no alpha: choose a colour, image, video or blur --background")
        return VirtualCamera(width, height, fps)
    if kind == "window":
        return Window()
    from .media.writer import alpha_capable, check_folder

    if transparent and not alpha_capable(kind):
        raise CameraError(f"{kind}: transparent output needs .mov, .webm or a PNG folder")
    check_folder(kind)  # a file where its folder should be is one line here, not an OSError traceback
    return FileOutput(kind, width, height, fps, transparent)


class Status:
    """One line, rewritten in place on a terminal: fps in/out, latency, drops."""

    def __init__(self, quiet: bool = False):
        self.tty = sys.stderr.isatty()
        self.quiet = quiet
        self.t0 = self.last = time.monotonic()
        self.frames_in = self.frames_out = 0
        self.latency = 0.0

    def update(self, dropped: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.quiet or (now - self.last < (0.5 if self.tty else 5.0) and not force):
            return
        span = max(now - self.t0, 1e-6)
        line = (f"in {self.frames_in / span:5.1f} fps  out {self.frames_out / span:5.1f} fps  "
                f"latency {self.latency * 1e3:4.0f} ms  dropped {dropped}")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        self.last = now


def run(make_backend, source: str | None, output: str, background: str, smoothing: float, fps: float | None,
        size: tuple[int, int] | None, quiet: bool = False) -> dict:
    """Capture -> engine -> output until the input ends or Ctrl-C. Devices are opened before the model is
    loaded, so a missing camera or virtual camera is reported at once."""
    bg = parse_background(background)
    if bg.kind == "video":  # the live stream has no background source: it would be silently left out
        raise CameraError("camera takes no video background: use a colour, an image, blur or transparent")
    capture = Capture(source, fps, size)
    sink = engine = None
    latest: list[Result] = []
    ready = threading.Condition()
    finished = threading.Event()

    def on_result(r: Result) -> None:
        with ready:
            latest.append(r)
            ready.notify()

    status = Status(quiet)
    try:
        sink = open_output(output, capture.width, capture.height, capture.fps, bg.kind == "transparent")
        engine = Engine(make_backend(), max_batch=2, max_wait_ms=1)
        if not quiet:
            print(f"{capture.source} -> {sink.name} (Ctrl-C to stop)", file=sys.stderr)
        stream = engine.open_stream(live=True, options=StreamOptions(background=bg, smoothing=smoothing),
                                    on_result=on_result)

        def pump():
            try:
                for image, t in capture.frames():
                    stream.submit(image, pts=t)
                    status.frames_in += 1
            finally:
                finished.set()
                with ready:
                    ready.notify()

        feeder = threading.Thread(target=pump, name="rmbg-capture", daemon=True)
        feeder.start()
        while True:
            with ready:
                ready.wait_for(lambda: latest or (finished.is_set() and stream.processing == 0
                                                  and not stream.pending), timeout=0.5)
                results, latest[:] = list(latest), []
            for r in results:
                sink.send(r)
                status.frames_out += 1
                status.latency = r.latency
            status.update(stream.dropped)
            if finished.is_set() and not results and stream.processing == 0 and not stream.pending:
                break
        status.update(stream.dropped, force=True)
        return {"frames_in": status.frames_in, "frames_out": status.frames_out, "dropped": stream.dropped,
                "seconds": time.monotonic() - status.t0}
    finally:
        capture.close()
        if engine is not None:
            engine.close()
        if sink is not None:
            sink.close()
        if status.tty and not quiet:
            print(file=sys.stderr)


def run_cli(args, default_model=None) -> int:
    """`rmbg-stream camera`; ``default_model(args)`` names the model when --model was not given."""
    size = None
    if args.size:
        try:
            w, h = (int(v) for v in args.size.lower().split("x"))
            size = (w, h)
        except ValueError:
            raise ValueError(f"--size must be WxH, e.g. 1280x720, got {args.size!r}") from None
        if min(size) < 1:
            raise ValueError(f"--size must be positive, got {args.size!r}")
    if not 0.0 <= args.smoothing <= 1.0:
        raise ValueError(f"--smoothing must be within 0..1, got {args.smoothing}")
    if args.fps is not None and not args.fps > 0:
        raise ValueError(f"--fps must be above 0, got {args.fps}")

    def make_backend():
        if not args.model:
            args.model = default_model(args)
        return build_backend(args)

    try:
        run(make_backend, args.input, args.output, args.background, args.smoothing, args.fps, size)
    except CameraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    return 0
