"""Real clients of `rmbg-stream serve` on loopback, shared by bench_live.py, flood.py and soak.py.

`Server` runs `python -m rmbg_stream serve ...` as a subprocess (its memory and CPU time are its own) and reads its
RSS, /healthz and /metrics. `RtcClient` is an aiortc camera sending a synthetic green-screen clip whose frames carry
their number (so each processed frame that comes back gives a latency), or real footage (`Footage`, for a real
network: the green screen has no person in it, and a person segmenter calls all of it background, stamp included)
stamped with big blocks that survive any background; `WsClient` speaks the WebSocket protocol of
`rmbg_stream/server/websocket.py` (JPEG frames after a 16-byte header; the reply echoes the client's timestamp, so
each reply gives a latency too). Both can leave politely (`close`) or abruptly (`kill`: the socket is torn down with
no goodbye, as when a browser tab crashes).
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import av
import cv2
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpSender, RTCSessionDescription

from rmbg_stream.server.frames import video_frame
from rmbg_stream.server.synthetic import CLOCK, GreenScreen, SyntheticTrack, read_stamp
from rmbg_stream.server.websocket import JPEG, pack, unpack

CHAPLIN = Path(__file__).resolve().parents[2] / "shared" / "media" / "chaplin.mp4"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_stats(pid: int) -> tuple[float, float]:
    """(RSS in MiB, CPU seconds) of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return rss, cpu


def thread_names(pid: int) -> dict[int, str]:
    """Python's names of a process's threads by native id, from `py-spy dump` (pip install py-spy); empty without
    it. /proc only says "python" for each: CPython 3.11 gives its threads no OS-level names."""
    try:
        dump = subprocess.run(["py-spy", "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(m[1]): m[2] for m in re.finditer(r'^Thread (\d+) \(\w+\): "([^"]*)"', dump, re.M)}


def thread_cpu(pid: int, names: dict[int, str]) -> dict[str, float]:
    """CPU seconds of a process's threads so far, summed by `names` (`thread_names`) with trailing digits dropped
    (asyncio_0, asyncio_1 -> asyncio); threads not named there are "native" (onnxruntime's pool, codec threads)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:  # the thread ended meanwhile
            continue
        name = names.get(int(task), "native").rstrip("0123456789_-: ") or "?"
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


# Where the engine's worker spends its time: the first of these functions on a sample's stack names its stage.
ENGINE_STAGES = (("smooth_streams", "smoothing"), ("Engine._upsample", "upsampling"), ("render (", "composite"),
                 ("Engine._infer", "network"), ("Engine._group", "preprocess (colour, resize)"),
                 ("Engine._upload", "upload"), ("Engine._download", "download and hand-off"),
                 ("Engine._collect", "waiting for frames"))


def profile(pid: int, seconds: float, out: str) -> subprocess.Popen:
    """py-spy sampling the process for `seconds` (100 Hz, every thread, without pausing it) into `out` (raw)."""
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
                             "--rate", "100", "--threads", "--nonblocking", "--format", "raw", "--output", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarise_profile(path: str) -> dict:
    """Shares of a raw py-spy profile (`profile`): samples per thread (names without their digits), and the engine
    worker's by stage (`ENGINE_STAGES`). py-spy samples threads that run Python or hold no lock; native work that
    released the GIL (onnxruntime, libvpx) shows in the frame that called it."""
    threads: dict[str, int] = {}
    stages: dict[str, int] = {}
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            n = int(n)
            total += n
            name = re.sub(r"^thread \(\d+\): ", "", stack.split(";", 1)[0]).rstrip("0123456789_-: ") or "?"
            threads[name] = threads.get(name, 0) + n
            if name == "rmbg-engine":
                stage = next((label for fn, label in ENGINE_STAGES if fn in stack), "other")
                stages[stage] = stages.get(stage, 0) + n
    engine = sum(stages.values())

    def share(counts: dict[str, int], of: int) -> dict[str, float]:
        return {k: round(100 * v / of, 1) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])} if of else {}

    return {"samples": total, "percent_by_thread": share(threads, total),
            "engine_percent_by_stage": share(stages, engine)}


def pct(values: list[float], q: float) -> float | None:
    """The q-quantile of latencies in seconds, in ms; None without values."""
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)


def parse_metrics(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def histogram_quantile(m: dict, name: str, q: float) -> float | None:
    """Upper bound (ms) of the bucket holding the q-quantile, as Prometheus' histogram_quantile would bound it."""
    total = m.get(f"{name}_count", 0)
    buckets = sorted((float(k.split('le="')[1].rstrip('"}')), v) for k, v in m.items()
                     if k.startswith(f"{name}_bucket") and "+Inf" not in k)
    for le, count in buckets:
        if total and count >= q * total:
            return round(le * 1000, 1)
    return None


class Server:
    """`serve` in a subprocess on a free loopback port: `async with Server(...) as srv` waits for /healthz."""

    def __init__(self, model: str = "chroma", device: str = "cpu", args: list[str] = (), cmd: list[str] | None = None,
                 env: dict | None = None, startup_timeout: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [*(cmd or [sys.executable, "-m", "rmbg_stream"]), "serve", "--host", "127.0.0.1",
                    "--port", str(self.port), "--model", model, "--device", device, *args]
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Server:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=self.env)
        self.http = aiohttp.ClientSession()
        try:
            deadline = time.monotonic() + self.startup_timeout
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited: {self.proc.stderr.read().strip()}")
                try:
                    async with self.http.get(f"{self.url}/healthz") as r:
                        if r.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not come up")
                await asyncio.sleep(0.2)
        except BaseException:
            await self.__aexit__()
            raise

    async def __aexit__(self, *exc) -> None:
        await self.http.close()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def stats(self) -> tuple[float, float]:
        return proc_stats(self.proc.pid)

    def rss(self) -> float:
        return round(self.stats()[0], 1)

    async def health(self) -> dict:
        async with self.http.get(f"{self.url}/healthz") as r:
            return await r.json()

    async def metrics(self) -> dict:
        async with self.http.get(f"{self.url}/metrics") as r:
            return parse_metrics(await r.text())

    async def wait_idle(self, timeout: float = 10) -> int:
        """Sessions left once every client has gone (waits up to `timeout` for them to be cleaned up)."""
        deadline = time.monotonic() + timeout
        while (left := (await self.health())["sessions"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return left


class Footage:
    """Real footage as a camera's frames: I420 (3H/2, W) uint8, each frame of `path` once (a clip that repeats frames,
    as chaplin.mp4 repeats every third, would make two sends of one picture), cropped to the aspect of W x H and
    scaled to it. Decoded once and shared by every camera that plays it.

    `stamp(n)` is frame n % len with its number in BITS blocks of BLOCK_W x BLOCK_H across the top, the bits in one
    row and inverted below them. The blocks are large against the background blur (sigma at most 4 % of the short
    side, 19 px at 480 high; 10 px at the default strength): whether the network keeps them as foreground or the
    server blurs them, replaces them with a colour (then they are lost) or keeps the original, the centre of each
    block stays on its side of mid-grey under blur and VP8, so `read` gets the number back."""

    BITS, BLOCK_W, BLOCK_H, TOP = 12, 48, 40, 0

    def __init__(self, path: Path, width: int, height: int):
        if width < self.BITS * self.BLOCK_W or height < 4 * self.BLOCK_H or width % 2 or height % 2:
            raise ValueError(f"footage frames need a width >= {self.BITS * self.BLOCK_W} and a height >= "
                             f"{4 * self.BLOCK_H}, both even")
        self.w, self.h = width, height
        self.x0 = (width - self.BITS * self.BLOCK_W) // 2
        self.frames = self._load(Path(path))

    def _load(self, path: Path) -> list[np.ndarray]:
        out, last = [], None
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                rgb = frame.to_ndarray(format="rgb24")
                if last is not None and np.abs(rgb.astype(np.int16) - last).mean() < 0.5:
                    continue  # a repeated frame
                last = rgb.astype(np.int16)
                out.append(cv2.cvtColor(self._fit(rgb), cv2.COLOR_RGB2YUV_I420))
        if not out:
            raise ValueError(f"{path}: no video frames")
        return out

    def _fit(self, rgb: np.ndarray) -> np.ndarray:
        """The centre of `rgb` at the aspect of W x H, scaled to W x H."""
        h, w = rgb.shape[:2]
        if w * self.h > h * self.w:  # wider than wanted: crop the sides
            cw = h * self.w // self.h
            rgb = rgb[:, (w - cw) // 2 : (w - cw) // 2 + cw]
        else:
            ch = w * self.h // self.w
            rgb = rgb[(h - ch) // 2 : (h - ch) // 2 + ch]
        return cv2.resize(rgb, (self.w, self.h), interpolation=cv2.INTER_AREA)

    def stamp(self, n: int) -> np.ndarray:
        f = self.frames[n % len(self.frames)].copy()
        bits = [(n >> (self.BITS - 1 - i)) & 1 for i in range(self.BITS)]
        top, bw, bh = self.TOP, self.BLOCK_W, self.BLOCK_H
        for i, b in enumerate(bits):
            x = self.x0 + i * bw
            f[top : top + bh, x : x + bw] = 235 if b else 16
            f[top + bh : top + 2 * bh, x : x + bw] = 16 if b else 235
        # Colourless, so that the blocks' luma is all there is to them.
        u, v = f[self.h : self.h * 5 // 4].reshape(self.h // 2, self.w // 2), f[self.h * 5 // 4 :].reshape(
            self.h // 2, self.w // 2)
        for plane in (u, v):
            plane[top // 2 : (top + 2 * bh) // 2, self.x0 // 2 : (self.x0 + self.BITS * bw) // 2] = 128
        return f

    def read(self, luma: np.ndarray) -> int | None:
        """The frame number from a processed frame's luma (H, W), or None where the check row disagrees."""
        top, bw, bh = self.TOP, self.BLOCK_W, self.BLOCK_H
        value = 0
        for i in range(self.BITS):
            x = self.x0 + i * bw + bw // 3
            a = luma[top + bh // 3 : top + 2 * bh // 3, x : x + bw // 3].mean() > 128
            b = luma[top + bh + bh // 3 : top + bh + 2 * bh // 3, x : x + bw // 3].mean() > 128
            if a == b:
                return None
            value = value << 1 | int(a)
        return value


class FootageTrack(MediaStreamTrack):
    """A camera at `fps` playing `Footage`; `sent[n]` is when frame n left (monotonic), n modulo 2**BITS."""

    kind = "video"

    def __init__(self, footage: Footage, fps: float = 30.0):
        super().__init__()
        self.footage, self.fps = footage, fps
        self.n = -1
        self.t0: float | None = None
        self.sent: dict[int, float] = {}

    async def recv(self):
        self.n += 1
        if self.t0 is None:
            self.t0 = time.monotonic()
        await asyncio.sleep(max(0.0, self.t0 + self.n / self.fps - time.monotonic()))
        n = self.n % (1 << self.footage.BITS)
        frame = video_frame(self.footage.stamp(n))
        frame.pts, frame.time_base = round(self.n * CLOCK / self.fps), fractions.Fraction(1, CLOCK)
        self.sent[n] = time.monotonic()
        return frame


class RtcClient:
    """An aiortc camera: `got` holds (arrival, frame number or None) of every processed frame that came back. It
    plays the synthetic green screen, or `footage` when given."""

    def __init__(self, index: int, width: int, height: int, fps: float, codec: str = "vp8",
                 footage: Footage | None = None):
        self.index = index
        self.track = SyntheticTrack(width, height, fps) if footage is None else FootageTrack(footage, fps)
        self.read_stamp = read_stamp if footage is None else footage.read
        self.codec = codec
        self.height = height
        self.pc = RTCPeerConnection()
        self.got: list[tuple[float, int | None]] = []
        self.reader: asyncio.Task | None = None
        self.channel = None
        self.errors: list[str] = []  # error replies on the data channel
        self.replies = 0  # other replies (ok, pong), pushed stats not counted

    async def connect(self, http: aiohttp.ClientSession, url: str, channel: bool = False) -> None:
        transceiver = self.pc.addTransceiver(self.track, direction="sendrecv")
        codecs = [c for c in RTCRtpSender.getCapabilities("video").codecs
                  if c.mimeType.lower() in (f"video/{self.codec}", "video/rtx")]
        transceiver.setCodecPreferences(codecs)
        if channel:
            self.channel = self.pc.createDataChannel("control")
            self.channel.on("message", self._on_message)

        @self.pc.on("track")
        def on_track(track):
            self.reader = asyncio.ensure_future(self.read(track))

        await self.pc.setLocalDescription(await self.pc.createOffer())
        desc = self.pc.localDescription
        async with http.post(f"{url}/offer", json={"sdp": desc.sdp, "type": desc.type}) as r:
            answer = await r.json()
            if r.status != 200:
                raise RuntimeError(f"client {self.index}: offer refused: {answer}")
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))

    def _on_message(self, message) -> None:
        reply = json.loads(message)
        if reply.get("type") == "error":
            self.errors.append(reply["error"])
        elif reply.get("type") != "stats":
            self.replies += 1

    def send_control(self, text: str) -> bool:
        """Sends a control on the data channel; False while it is not open."""
        if self.channel is None or self.channel.readyState != "open":
            return False
        self.channel.send(text)
        return True

    async def read(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except Exception:
                return
            now = time.monotonic()
            # The luma plane in place: copying whole frames here would tax the cores the server runs on.
            plane = frame.planes[0]
            luma = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[: frame.height, : frame.width]
            self.got.append((now, self.read_stamp(luma)))

    def latencies(self, start: float, end: float) -> list[float]:
        """Seconds from send to return of the frames that came back in [start, end)."""
        sent = self.track.sent
        return [t - sent[n] for t, n in self.got if start <= t < end and n is not None and n in sent and sent[n] <= t]

    def report(self, start: float, end: float) -> dict:
        sent = self.track.sent
        window = [(t, n) for t, n in self.got if start <= t < end]
        latencies = self.latencies(start, end)
        # Frames sent in the window (less a margin for those still in flight) that never came back.
        sent_in = {n for n, t in sent.items() if start <= t < end - 0.5}
        back = {n for _, n in self.got if n is not None}
        return {"fps": round(len(window) / (end - start), 1), "latency_ms_p50": pct(latencies, 0.5),
                "latency_ms_p95": pct(latencies, 0.95), "latency_ms_max": pct(latencies, 1.0),
                "sent": len(sent_in), "received": len(window), "dropped": len(sent_in - back),
                "unreadable": sum(1 for _, n in window if n is None)}

    async def close(self) -> None:
        await self.pc.close()
        if self.reader is not None:
            self.reader.cancel()

    async def kill(self) -> None:
        """Gone without a word: the media transports close, no RTCP BYE or data channel close is sent first."""
        for t in self.pc.getTransceivers():
            await t.sender.transport.transport.stop()  # the ICE transport under DTLS: packets just stop
        await self.close()


def jpeg_frames(width: int, height: int, count: int = 8, quality: int = 85) -> list[bytes]:
    """`count` different green-screen frames as JPEG (what a browser page sends over the WebSocket)."""
    src = GreenScreen(width, height)
    out = []
    for n in range(count):
        bgr = cv2.cvtColor(src.frame(n * 7), cv2.COLOR_YUV2BGR_I420)
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        out.append(buf.tobytes())
    return out


class WsClient:
    """A WebSocket client: `got` holds (arrival, latency) of each processed frame; `errors` the error replies (those
    about a frame's image carry its "seq"); `ended` is when the connection ended, by either side."""

    def __init__(self, index: int):
        self.index = index
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.session: str | None = None
        self.got: list[tuple[float, float]] = []
        self.errors: list[dict] = []
        self.replies = 0
        self.sent = 0
        self.reader: asyncio.Task | None = None
        self.ended: float | None = None

    async def connect(self, http: aiohttp.ClientSession, url: str) -> None:
        self.ws = await http.ws_connect(f"{url.replace('http', 'ws', 1)}/ws", max_msg_size=64 * 2**20)
        hello = await self.ws.receive_json(timeout=30)
        if hello.get("type") != "hello":
            raise RuntimeError(f"client {self.index}: expected hello, got {hello}")
        self.session = hello["session"]
        self.reader = asyncio.ensure_future(self.read())

    async def read(self) -> None:
        async for msg in self.ws:
            now = time.monotonic()
            if msg.type == aiohttp.WSMsgType.BINARY:
                _, _, ts, _ = unpack(msg.data)
                self.got.append((now, now - ts / 1000))
            elif msg.type == aiohttp.WSMsgType.TEXT:
                reply = msg.json()
                if reply.get("type") == "error":
                    self.errors.append(reply)
                elif reply.get("type") != "stats":
                    self.replies += 1
        self.ended = time.monotonic()

    async def send_frame(self, payload: bytes, fmt: int = JPEG) -> None:
        self.sent += 1
        await self.ws.send_bytes(pack(fmt, self.sent, time.monotonic() * 1000, payload))

    async def send_raw(self, data: bytes | str) -> None:
        await (self.ws.send_bytes(data) if isinstance(data, bytes) else self.ws.send_str(data))

    def latencies(self, start: float, end: float) -> list[float]:
        return [lat for t, lat in self.got if start <= t < end]

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)

    async def kill(self) -> None:
        """Gone without a word: the TCP connection is shut down with no WebSocket close frame."""
        sock = self.ws.get_extra_info("socket") if self.ws is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # what the kernel does for a process that dies
        if self.reader is not None:
            # The reader sees the end of the stream; the socket is then released without any close handshake.
            await asyncio.wait([self.reader], timeout=5)
            self.reader.cancel()
