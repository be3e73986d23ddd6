"""Real clients of `rmbg-stream serve` on loopback, shared by bench_live.py, flood.py and soak.py.

`Server` runs `python -m rmbg_stream serve ...` as a subprocess (its memory and CPU time are its own) and reads its
RSS, /healthz and /metrics. `RtcClient` is an aiortc camera sending a synthetic green-screen clip whose frames carry
their number (so each processed frame that comes back gives a latency); `WsClient` speaks the WebSocket protocol of
`rmbg_stream/server/websocket.py` (JPEG frames after a 16-byte header; the reply echoes the client's timestamp, so
each reply gives a latency too). Both can leave politely (`close`) or abruptly (`kill`: the socket is torn down with
no goodbye, as when a browser tab crashes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import cv2
import numpy as np
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription

from rmbg_stream.server.synthetic import GreenScreen, SyntheticTrack, read_stamp
from rmbg_stream.server.websocket import JPEG, pack, unpack


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


class RtcClient:
    """An aiortc camera: `got` holds (arrival, frame number or None) of every processed frame that came back."""

    def __init__(self, index: int, width: int, height: int, fps: float, codec: str = "vp8"):
        self.index = index
        self.track = SyntheticTrack(width, height, fps)
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
            self.got.append((now, read_stamp(luma)))

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
