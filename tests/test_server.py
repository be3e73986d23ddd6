"""The live server on CPU with the chroma keyer: API, security, errors, WebSocket and WebRTC (aiortc) clients,
session clean-up, and bounded latency when the model is slower than the camera."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import io
import json
import re
import signal
import socket
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from aiohttp import ClientSession, WSMsgType, WSServerHandshakeError, web
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.rtp import RtpPacket
from PIL import Image
from yarl import URL

from rmbg_stream import tuning
from rmbg_stream.engine.backends import create_backend
from rmbg_stream.engine.composite import parse_background
from rmbg_stream.engine.engine import Engine
from rmbg_stream.server import aiortc_patches, frames, webrtc, websocket
from rmbg_stream.server import app as server_app
from rmbg_stream.server.app import MANAGER, Config, make_app
from rmbg_stream.server.sessions import Closed, Latest
from rmbg_stream.server.synthetic import GreenScreen, SyntheticTrack, read_stamp

# Media between the test's peers and the server stays on 127.0.0.1, as `serve --host 127.0.0.1` keeps it.
aiortc_patches.keep_media_on_loopback()

MAGENTA = (255, 0, 255)
CYAN = (0, 255, 255)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


@contextlib.asynccontextmanager
async def serve(backend=None, models: dict | None = None, **config):
    """The app on 127.0.0.1 at a free port: yields (base URL, app). `models`: {name: backend}, one engine each, as
    `serve --model A B` makes them (sessions start with the first); else `backend` (default chroma) alone."""
    backend = backend or create_backend("chroma", torch.device("cpu"))
    models = models or {backend.name: backend}
    saved = torch.get_num_threads(), sys.getswitchinterval()
    tuning.tune_server(backend.device)  # as `rmbg-stream serve` runs, put back afterwards for other tests
    engines = {name: Engine(b, max_batch=4, max_wait_ms=2) for name, b in models.items()}
    config.setdefault("background", parse_background("#ff00ff"))
    app = make_app(engines, Config(**config))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}", app
    finally:
        await runner.cleanup()
        for engine in engines.values():
            engine.close()
        torch.set_num_threads(saved[0])
        sys.setswitchinterval(saved[1])
        gc.unfreeze()


def near(px, rgb, tol=40) -> bool:
    return all(abs(int(a) - b) <= tol for a, b in zip(px, rgb))


async def settle(predicate, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def leftover_tasks(before) -> list:
    # aiohttp keeps a task per kept-alive HTTP connection; those are not sessions'.
    return [t for t in asyncio.all_tasks() - before if "RequestHandler.start" not in repr(t)]


def assert_clean(app) -> None:
    manager = app[MANAGER]
    assert manager.sessions == {}
    assert all(e.stats()["streams"] == 0 for e in manager.engines.values())


# -- WebSocket client


class WsCamera:
    """Sends the synthetic clip as JPEG at `fps`, reads the replies: stamps, round trips, background pixels."""

    def __init__(self, sock, width=640, height=480, fps=30.0):
        self.sock = sock
        self.source = GreenScreen(width, height)
        self.fps = fps
        self.sent: dict[int, float] = {}
        self.frames: list[tuple[float, int | None, tuple]] = []  # (arrival, stamp, background pixel)
        self.messages: list[dict] = []
        self.encoded = [self._jpeg(n) for n in range(30)]  # encoding up front keeps the client cheap

    def _jpeg(self, n):
        rgb = cv2.cvtColor(self.source.frame(n), cv2.COLOR_YUV2BGR_I420)
        return cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()

    async def send_frames(self, seconds):
        t0 = time.monotonic()
        n = 0
        while (now := time.monotonic()) < t0 + seconds:
            self.sent[n] = now
            await self.sock.send_bytes(websocket.pack(websocket.JPEG, n, now * 1000, self.encoded[n % 30]))
            n += 1
            await asyncio.sleep(max(0.0, t0 + n / self.fps - time.monotonic()))

    async def receive(self):
        async for msg in self.sock:
            if msg.type == WSMsgType.TEXT:
                self.messages.append(json.loads(msg.data))
            elif msg.type == WSMsgType.BINARY:
                now = time.monotonic()
                fmt, seq, ts, payload = websocket.unpack(msg.data)
                img = np.asarray(Image.open(io.BytesIO(payload)).convert("RGBA"))
                h = img.shape[0]
                stamp = read_stamp(cv2.cvtColor(img[:, :, :3], cv2.COLOR_RGB2GRAY))
                # The stamp encodes seq % 30 frames' picture, so check the echoed seq instead.
                self.frames.append((now, seq if stamp == seq % 30 else None, tuple(img[h // 2, 8])))

    def replies(self, kind):
        return [m for m in self.messages if m.get("type") == kind]


# -- pieces


def test_stacked_frame_is_colour_over_grey_alpha():
    rng = np.random.default_rng(0)
    rgb = np.repeat(np.repeat(rng.integers(0, 256, (13, 17, 3), dtype=np.uint8), 8, 0), 8, 1)  # 104 x 136
    alpha = np.repeat(np.repeat(rng.integers(0, 256, (13, 17), dtype=np.uint8), 8, 0), 8, 1)
    back = cv2.cvtColor(frames.stacked_i420(rgb, alpha), cv2.COLOR_YUV2RGB_I420)
    assert back.shape == (208, 136, 3)
    inner = (slice(2, -2), slice(2, -2))

    def centres(a):  # chroma is subsampled: compare the middle of each 8x8 block, away from its edges
        return a.reshape(13, 8, 17, 8, *a.shape[2:])[:, 2:6, :, 2:6].astype(int)

    assert np.abs(centres(back[:104]) - centres(rgb)).max() <= 6
    assert np.abs(back[104:][inner].astype(int) - alpha[inner][..., None]).max() <= 2  # grey, all channels
    odd = frames.stacked_i420(rgb[:103, :135], alpha[:103, :135])  # padded to even, not cropped
    assert odd.shape == (3 * 103, 136)
    assert (frames.video_frame(odd, width=135).width, frames.video_frame(odd, width=135).height) == (135, 206)


def test_marker_jitter_buffer_releases_a_frame_on_its_last_packet():
    jb = aiortc_patches.MarkerJitterBuffer(512, is_video=True)

    def packet(seq, ts, marker, data):
        p = RtpPacket(sequence_number=seq, timestamp=ts, marker=marker)
        p._data = data
        return jb.add(p)[1]

    assert packet(10, 100, 0, b"a") is None
    f = packet(11, 100, 1, b"b")
    assert (f.data, f.timestamp) == (b"ab", 100)  # the stock buffer would wait for packet 12
    assert packet(13, 200, 1, b"d") is None  # 12 is missing
    f = packet(12, 200, 0, b"c")
    assert (f.data, f.timestamp) == (b"cd", 200)
    assert packet(14, 300, 0, b"e") is None
    f = packet(15, 400, 1, b"f")  # no marker on 300: it ends when 400 begins
    assert (f.data, f.timestamp) == (b"e", 300)


def test_latest_keeps_only_the_newest_value():
    async def main():
        slot = Latest()
        for v in range(5):
            slot.put(v)
        assert await slot.get(0) == (4, 5)  # 0..3 were overtaken
        waiter = asyncio.ensure_future(slot.get(5))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        slot.put("new")
        assert await waiter == ("new", 6)
        other = asyncio.ensure_future(slot.get(6))
        await asyncio.sleep(0.01)
        slot.close()
        with pytest.raises(Closed):
            await other

    run(main())


# -- API, security, errors


def test_static_files_only_from_web_dir():
    async def main():
        async with serve() as (url, app), ClientSession() as http:
            for path, kind in [("/", "text/html"), ("/obs", "text/html"), ("/app.js", "javascript"),
                               ("/style.css", "text/css"), ("/stacked.js", "javascript")]:
                async with http.get(url + path) as r:
                    assert r.status == 200 and kind in r.headers["Content-Type"], path
            for path in ["/../pyproject.toml", "/%2e%2e/pyproject.toml", "/..%2fpyproject.toml", "/web/app.js",
                         "/%2e%2e%2fREADME.md", "/app.js/..", "//etc/passwd", "/.hidden"]:
                async with http.get(URL(url + path, encoded=True)) as r:  # sent as is, not normalised
                    assert r.status == 404, path
                    assert "error" in await r.json()

    run(main())


def test_healthz_and_metrics():
    async def main():
        async with serve() as (url, app), ClientSession() as http:
            async with http.get(url + "/healthz") as r:
                body = await r.json()
            assert body["status"] == "ok" and body["sessions"] == 0 and body["model"] == "chroma"
            assert body["models"] == ["chroma"]
            async with http.get(url + "/metrics") as r:
                text = await r.text()
            assert r.status == 200 and r.content_type == "text/plain"
            for name in ["rmbg_sessions{kind=\"webrtc\"} 0", "rmbg_fps_in ", "rmbg_fps_out ",
                         "rmbg_frames_dropped_total ", "rmbg_engine_batch_size ",
                         "rmbg_latency_seconds_bucket{le=\"0.1\"}", "rmbg_latency_seconds_count 0"]:
                assert name in text, name

    run(main())


def test_public_host_needs_a_token(capsys):
    args = Namespace(host="0.0.0.0", port=0, token=None, max_sessions=4, background="blur", model="chroma",
                     device="cpu", precision="auto", resolution=None, batch=4)
    assert server_app.run_cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--token" in err and "0.0.0.0" in err


def test_serve_command_starts_and_stops():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "rmbg_stream", "serve", "--model", "chroma", "--device", "cpu",
                             "--port", str(port), "--background", "#00ff00", "--max-sessions", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    async def main():
        async with ClientSession() as http:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, proc.communicate()
                with contextlib.suppress(OSError):
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                        return await r.json()
                assert time.monotonic() < deadline, "serve did not come up"
                await asyncio.sleep(0.2)

    try:
        health = run(main())
        assert health["max_sessions"] == 2 and health["model"] == "chroma" and health["device"] == "cpu"
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/" in out and "/obs" in out


def test_token_is_checked_and_server_keeps_serving():
    async def main():
        async with serve(token="s3cret") as (url, app), ClientSession() as http:
            offer = {"sdp": "v=0", "type": "offer"}
            for headers in [{}, {"Authorization": "Bearer wrong"}]:
                async with http.post(url + "/offer", json=offer, headers=headers) as r:
                    assert r.status == 401 and "token" in (await r.json())["error"]
            async with http.get(url + "/metrics") as r:
                assert r.status == 401
            with pytest.raises(WSServerHandshakeError) as e:
                await http.ws_connect(url + "/ws?token=wrong")
            assert e.value.status == 401
            async with http.get(url + "/healthz") as r:  # liveness stays open
                assert r.status == 200
            async with http.get(url + "/metrics", headers={"Authorization": "Bearer s3cret"}) as r:
                assert r.status == 200
            async with http.ws_connect(url + "/ws?token=s3cret") as sock:
                hello = await sock.receive_json(timeout=5)
                assert hello["type"] == "hello" and hello["state"]["background"] == "#ff00ff"
            assert await settle(lambda: not app[MANAGER].sessions)
            assert_clean(app)

    run(main())


def test_websocket_origin_must_match():
    async def main():
        async with serve() as (url, app), ClientSession() as http:
            with pytest.raises(WSServerHandshakeError) as e:
                await http.ws_connect(url + "/ws", headers={"Origin": "http://evil.example"})
            assert e.value.status == 403
            async with http.post(url + "/offer", json={}, headers={"Origin": "http://evil.example"}) as r:
                assert r.status == 403
            async with http.ws_connect(url + "/ws", headers={"Origin": url}) as sock:
                assert (await sock.receive_json(timeout=5))["type"] == "hello"
            # DNS rebinding: a foreign site's name pointed at 127.0.0.1 is same-origin with itself, not with us.
            rebound = {"Host": "evil.example:8080", "Origin": "http://evil.example:8080"}
            async with http.post(url + "/offer", json={}, headers=rebound) as r:
                assert r.status == 403 and "evil.example" in (await r.json())["error"]

    run(main())


def test_bad_offers_get_clear_errors():
    async def main():
        async with serve() as (url, app), ClientSession() as http:
            cases = [
                (b"not json", 400, "JSON"),
                (b"[1, 2]", 400, "JSON object"),
                (json.dumps({"sdp": "v=0"}).encode(), 400, '"type": "offer"'),
                (json.dumps({"sdp": "garbage\r\nmore garbage", "type": "offer"}).encode(), 400, "invalid SDP"),
                (json.dumps({"sdp": "v=0\r\n", "type": "offer"}).encode(), 400, ""),
                (json.dumps({"sdp": "v=0", "type": "offer", "view": "tv"}).encode(), 400, "view"),
                (json.dumps({"sdp": "v=0", "type": "offer", "view": "obs"}).encode(), 404, "no camera session"),
                (b"x" * (server_app.OFFER_LIMIT + 10), 413, "limit"),
            ]
            for body, status, words in cases:
                async with http.post(url + "/offer", data=body, headers={"Content-Type": "application/json"}) as r:
                    got = await r.json()
                    assert r.status == status, (body[:40], got)
                    assert words in got["error"], got
            # A real offer, broken; and one without video. Nothing is left behind.
            cam = RtcCamera()
            cam.pc.addTransceiver(cam.track, direction="sendrecv")
            await cam.pc.setLocalDescription(await cam.pc.createOffer())
            sdp = cam.pc.localDescription.sdp
            no_fingerprint = "\r\n".join(x for x in sdp.split("\r\n") if not x.startswith("a=fingerprint"))
            for broken in [re.sub(r"m=video \d+", "m=video nine", sdp), no_fingerprint, sdp[: sdp.index("a=ice")]]:
                async with http.post(url + "/offer", json={"sdp": broken, "type": "offer"}) as r:
                    got = await r.json()
                    assert r.status == 400 and ("invalid SDP" in got["error"] or "no video" in got["error"]), got
            await cam.pc.close()
            pc = RTCPeerConnection()
            pc.createDataChannel("control")
            await pc.setLocalDescription(await pc.createOffer())
            async with http.post(url + "/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as r:
                assert r.status == 400 and "no video" in (await r.json())["error"]
            await pc.close()
            async with http.get(url + "/healthz") as r:
                assert (await r.json())["sessions"] == 0
            assert_clean(app)

    run(main())


def test_one_session_too_many_is_refused():
    async def main():
        async with serve(max_sessions=1) as (url, app), ClientSession() as http:
            first = await http.ws_connect(url + "/ws")
            assert (await first.receive_json(timeout=5))["type"] == "hello"
            with pytest.raises(WSServerHandshakeError) as e:
                await http.ws_connect(url + "/ws")
            assert e.value.status == 503
            async with http.post(url + "/offer", json={"sdp": "v=0", "type": "offer"}) as r:
                assert r.status == 503 and "server full" in (await r.json())["error"]
            async with http.get(url + "/metrics") as r:
                assert "rmbg_sessions_refused_total 2" in await r.text()
            await first.close()
            assert await settle(lambda: not app[MANAGER].sessions)
            async with http.ws_connect(url + "/ws") as again:
                assert (await again.receive_json(timeout=5))["type"] == "hello"
        assert_clean(app)

    run(main())


def test_oversized_and_malformed_socket_messages():
    async def main():
        async with serve() as (url, app), ClientSession() as http:
            async with http.ws_connect(url + "/ws") as sock:
                await sock.receive_json(timeout=5)
                await sock.send_bytes(websocket.pack(websocket.JPEG, 1, 0, b"\0" * (websocket.FRAME_LIMIT + 1)))
                assert "over the" in (await sock.receive_json(timeout=5))["error"]
                await sock.send_bytes(b"short")
                assert "header" in (await sock.receive_json(timeout=5))["error"]
                await sock.send_bytes(websocket.pack(websocket.JPEG, 2, 0, b"not a jpeg"))
                assert "cannot decode" in (await sock.receive_json(timeout=5))["error"]
                for text, words in [("{", "not JSON"), ('{"type": "warp"}', "unknown control"),
                                    ('{"type": "background", "value": "/etc/passwd.png"}', "upload an image"),
                                    ('{"type": "background", "value": "plaid"}', "invalid background"),
                                    ('{"type": "smoothing", "value": 7}', "0 to 1"),
                                    ('{"type": "background", "image": "data:image/png;base64,bm90IGFuIGltYWdl"}',
                                     "not an image")]:
                    await sock.send_str(text)
                    assert words in (await sock.receive_json(timeout=5))["error"], text
                # Still serving: a good frame comes back processed.
                cam = WsCamera(sock)
                await sock.send_bytes(websocket.pack(websocket.JPEG, 7, 0, cam.encoded[7]))
                while (msg := await sock.receive(timeout=10)).type != WSMsgType.BINARY:
                    pass
                assert websocket.unpack(msg.data)[1] == 7

    run(main())


def test_websocket_webp_and_transparent_replies():
    async def main():
        async with serve() as (url, app), ClientSession() as http:
            async with http.ws_connect(url + "/ws") as sock:
                await sock.receive_json(timeout=5)
                rgb = cv2.cvtColor(GreenScreen(320, 240).frame(5), cv2.COLOR_YUV2BGR_I420)
                webp = cv2.imencode(".webp", rgb, [cv2.IMWRITE_WEBP_QUALITY, 90])[1].tobytes()

                async def round_trip(seq):
                    await sock.send_bytes(websocket.pack(websocket.WEBP, seq, 12.5, webp))
                    while (msg := await sock.receive(timeout=10)).type != WSMsgType.BINARY:
                        pass
                    fmt, got_seq, ts, payload = websocket.unpack(msg.data)
                    assert (got_seq, ts) == (seq, 12.5)
                    return fmt, Image.open(io.BytesIO(payload))

                fmt, img = await round_trip(1)
                assert fmt == websocket.WEBP and img.format == "WEBP" and img.mode == "RGB"
                assert near(img.getpixel((8, 120)), MAGENTA)
                await sock.send_str(json.dumps({"type": "background", "value": "transparent"}))
                for seq in range(2, 30):  # until a frame processed after the switch comes back
                    fmt, img = await round_trip(seq)
                    if img.mode == "RGBA":
                        break
                assert fmt == websocket.WEBP and img.mode == "RGBA"
                assert img.getpixel((8, 120))[3] < 30 and img.getpixel((100, 30))[3] > 225

    run(main())


def test_upload_background():
    async def main():
        async with serve(upload_limit=200_000) as (url, app), ClientSession() as http:
            async with http.ws_connect(url + "/ws") as sock:
                session = (await sock.receive_json(timeout=5))["session"]
                buf = io.BytesIO()
                Image.new("RGB", (64, 48), CYAN).save(buf, "PNG")
                endpoint = f"{url}/session/{session}/background"
                async with http.post(endpoint, data=b"GIF89a not really") as r:
                    assert r.status == 400 and "not an image" in (await r.json())["error"]
                async with http.post(endpoint, data=b"\0" * 300_000) as r:
                    assert r.status == 413 and "limit" in (await r.json())["error"]
                async with http.post(f"{url}/session/nope/background", data=buf.getvalue()) as r:
                    assert r.status == 404
                async with http.post(endpoint, data=buf.getvalue()) as r:
                    assert r.status == 200 and (await r.json())["state"]["background"] == "upload"
                cam = WsCamera(sock)
                reader = asyncio.ensure_future(cam.receive())
                await cam.send_frames(1.0)
                await settle(lambda: len(cam.frames) > 5)
                assert near(cam.frames[-1][2], CYAN)
                await sock.send_str(json.dumps({"type": "background", "value": "none"}))
                await sock.send_str(json.dumps({"type": "background", "value": "upload"}))
                await settle(lambda: len(cam.replies("ok")) == 2)
                assert cam.replies("ok")[-1]["state"]["background"] == "upload"
                reader.cancel()

    run(main())


# -- streaming


@pytest.mark.slow
@pytest.mark.serial
def test_websocket_stream_holds_20_fps_with_the_chosen_background():
    async def main():
        async with serve() as (url, app), ClientSession() as http:
            async with http.ws_connect(url + "/ws") as sock:
                cam = WsCamera(sock)
                reader = asyncio.ensure_future(cam.receive())
                await cam.send_frames(1.0)  # warm-up
                start = time.monotonic()
                await cam.send_frames(10.0)
                end = time.monotonic()
                await sock.send_str(json.dumps({"type": "ping", "t": 42}))
                await settle(lambda: cam.replies("pong"))
                reader.cancel()
            window = [f for f in cam.frames if start <= f[0] < end]
            fps = len(window) / (end - start)
            assert fps >= 20, fps
            assert all(near(px, MAGENTA) for _, _, px in window)
            latencies = sorted(t - cam.sent[n] for t, n, _ in window if n is not None)
            assert len(latencies) > 0.9 * len(window)  # the stamps survive the round trip
            assert latencies[int(0.95 * len(latencies))] < 0.5
            assert cam.replies("pong")[0]["t"] == 42
            stats = cam.replies("stats")[-1]
            assert stats["fps_in"] > 20 and stats["latency_ms_p50"] is not None
            assert await settle(lambda: not app[MANAGER].sessions)
            assert_clean(app)

    run(main())


class SlowBackend:
    """The chroma keyer behind a 100 ms network: far slower than a 30 fps camera."""

    def __init__(self):
        self.inner = create_backend("chroma", torch.device("cpu"))
        self.device, self.resolution, self.name = self.inner.device, None, "slow"
        self.guided = self.inner.guided

    def input_size(self, h, w):
        return None

    def __call__(self, x):
        time.sleep(0.1)
        return self.inner(x)


def test_latency_stays_bounded_when_the_model_is_slow():
    async def main():
        async with serve(backend=SlowBackend()) as (url, app), ClientSession() as http:
            async with http.ws_connect(url + "/ws") as sock:
                cam = WsCamera(sock, 320, 240)
                reader = asyncio.ensure_future(cam.receive())
                await cam.send_frames(4.0)
                await asyncio.sleep(0.5)
                reader.cancel()
                session = next(iter(app[MANAGER].sessions.values()))
                dropped = session.dropped()
            late = [t - cam.sent[n] for t, n, _ in cam.frames if n is not None and t - cam.sent[0] > 2]
            assert late and max(late) < 0.5, max(late)  # no queue builds up: later frames are not later
            assert dropped > 40  # ~120 sent, ~35 processed

    run(main())


# -- WebRTC


class RtcCamera:
    """A camera (`view` None: sends the synthetic clip, with a data channel) or an OBS view (`channel`: with a data
    channel too, for the stats)."""

    def __init__(self, codec="vp8", width=320, height=240, view=None, session=None, channel=False):
        self.pc = RTCPeerConnection()
        self.wants_channel = view is None or channel
        self.track = SyntheticTrack(width, height, 30) if view is None else None
        self.codec, self.view, self.session = codec, view, session
        self.frames: list[tuple[float, int, int, np.ndarray]] = []  # (arrival, width, height, I420)
        self.messages: list[dict] = []
        self.channel = None
        self.reader = None

    async def connect(self, http, url, **extra):
        if self.view is None:
            t = self.pc.addTransceiver(self.track, direction="sendrecv")
        else:
            t = self.pc.addTransceiver("video", direction="recvonly")
        if self.wants_channel:
            self.channel = self.pc.createDataChannel("control")
            self.channel.on("message", lambda m: self.messages.append(json.loads(m)))
        caps = RTCRtpSender.getCapabilities("video").codecs
        t.setCodecPreferences([c for c in caps if c.mimeType.lower() in (f"video/{self.codec}", "video/rtx")])
        self.pc.on("track", lambda track: setattr(self, "reader", asyncio.ensure_future(self._read(track))))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        body = {"sdp": self.pc.localDescription.sdp, "type": "offer", **extra}
        if self.view:
            body.update(view=self.view, session=self.session)
        async with http.post(url + "/offer", json=body) as r:
            answer = await r.json()
            assert r.status == 200, answer
        await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        return answer

    async def _read(self, track):
        with contextlib.suppress(Exception):
            while True:
                f = await track.recv()
                self.frames.append((time.monotonic(), f.width, f.height, f.to_ndarray()))

    def send(self, msg):
        self.channel.send(json.dumps(msg))

    async def close(self):
        await self.pc.close()
        if self.reader:
            self.reader.cancel()


def rgb_at(i420, w, h, x, y):
    return cv2.cvtColor(i420, cv2.COLOR_YUV2RGB_I420)[y, x]


@pytest.mark.parametrize("codec", ["vp8", "h264"])
def test_webrtc_round_trip_controls_and_clean_up(codec):
    async def main():
        async with serve() as (url, app), ClientSession() as http:
            tasks_before = asyncio.all_tasks()
            cam = RtcCamera(codec)
            answer = await cam.connect(http, url)
            assert f"{'VP8' if codec == 'vp8' else 'H264'}/90000" in answer["sdp"]
            assert await settle(lambda: len(cam.frames) >= 20, 15)
            _, w, h, i420 = cam.frames[-1]
            assert (w, h) == (320, 240)
            assert near(rgb_at(i420, w, h, 8, h // 2), MAGENTA)
            assert read_stamp(i420[:h]) is not None
            assert await settle(lambda: cam.channel.readyState == "open")
            cam.send({"type": "background", "value": "#00ffff"})
            cam.send({"type": "smoothing", "value": 0})
            cam.send({"type": "nonsense"})
            assert await settle(lambda: len([m for m in cam.messages if m["type"] in ("ok", "error")]) == 3)
            n = len(cam.frames)
            assert await settle(lambda: len(cam.frames) > n + 10, 10)
            _, w, h, i420 = cam.frames[-1]
            assert near(rgb_at(i420, w, h, 8, h // 2), CYAN)
            assert [m["type"] for m in cam.messages if m["type"] != "stats"] == ["ok", "ok", "error"]
            cam.send({"type": "pause", "value": True})
            await asyncio.sleep(0.5)
            n = len(cam.frames)
            await asyncio.sleep(0.5)
            assert len(cam.frames) <= n + 1  # paused: nothing new is processed
            await cam.close()
            # The peer is gone: its session, engine stream, peer connection and tasks must all go too.
            assert await settle(lambda: not app[MANAGER].sessions, 10)
            assert_clean(app)
            assert await settle(lambda: not leftover_tasks(tasks_before), 5), leftover_tasks(tasks_before)
            gc.collect()
            assert not [o for o in gc.get_objects() if type(o) is webrtc.ResultTrack]

    run(main())


def test_transparent_session_and_obs_view_get_colour_over_alpha():
    async def main():
        async with serve() as (url, app), ClientSession() as http:
            cam = RtcCamera()
            session = (await cam.connect(http, url))["session"]
            assert await settle(lambda: cam.channel.readyState == "open")
            obs = RtcCamera(view="obs")  # no session named: follows the newest camera
            await obs.connect(http, url)
            assert await settle(lambda: len(obs.frames) >= 5, 15)
            _, w, h, i420 = obs.frames[-1]
            assert (w, h) == (320, 480)  # colour on top, alpha below
            luma = i420[:h]
            assert luma[240 + 120, 8] < 30  # background: alpha 0
            assert luma[240 + 30, 100] > 225  # the stamp, always foreground: alpha 1
            assert near(rgb_at(i420, w, h, 8, 120), (0, 177, 64), 30)  # straight colour: still key green
            assert read_stamp(luma[:240]) is not None
            # The camera page itself gets the same layout when it picks transparent.
            cam.send({"type": "background", "value": "transparent"})
            n = len(cam.frames)
            assert await settle(lambda: len(cam.frames) > n + 10 and cam.frames[-1][2] == 480, 10)
            assert {s.kind for s in app[MANAGER].sessions.values()} == {"webrtc", "viewer"}
            # The view ends with its camera session.
            await cam.close()
            assert await settle(lambda: not app[MANAGER].sessions, 10)
            await obs.close()
            assert session not in app[MANAGER].sessions
            assert_clean(app)

    run(main())


def test_offer_that_never_connects_is_cleaned_up(monkeypatch):
    monkeypatch.setattr(webrtc, "CONNECT_TIMEOUT", 1.0)

    async def main():
        async with serve() as (url, app), ClientSession() as http:
            cam = RtcCamera()
            cam.pc.addTransceiver(cam.track, direction="sendrecv")
            await cam.pc.setLocalDescription(await cam.pc.createOffer())
            async with http.post(url + "/offer", json={"sdp": cam.pc.localDescription.sdp, "type": "offer"}) as r:
                assert r.status == 200
            await cam.pc.close()  # never applies the answer
            assert len(app[MANAGER].sessions) == 1
            assert await settle(lambda: not app[MANAGER].sessions, 10)
            assert_clean(app)

    run(main())


def test_a_built_wheel_carries_the_web_page(tmp_path):
    """`serve` from a non-editable install must find the page: web/ is packaged as rmbg_stream/web."""
    root = server_app.WEB_DIR.parent
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", *isolation, "-q",
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "wheel").glob("rmbg_stream-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    code = "from rmbg_stream.server.app import WEB_DIR; print(WEB_DIR)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}).stdout.strip()
    web_dir = Path(out)
    assert web_dir.is_relative_to(tmp_path / "site"), out
    names = {p.name for p in web_dir.iterdir()}
    assert {"index.html", "app.js", "obs.html", "obs.js", "stacked.js", "style.css"} <= names


def test_server_vp8_encoder_runs_without_the_denoiser():
    """The sender's VP8 encoder gets aiortc's options with noise-sensitivity 0 and still makes a decodable stream;
    H.264 keeps aiortc's own encoder."""
    import av
    from aiortc import rtcrtpsender
    from aiortc.codecs import get_decoder
    from aiortc.jitterbuffer import JitterFrame
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters

    aiortc_patches.use_clean_vp8_encoder()  # as make_app does
    vp8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
    h264 = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=97)
    encoder = rtcrtpsender.get_encoder(vp8)
    assert isinstance(encoder, aiortc_patches.CleanVp8Encoder)
    assert not isinstance(rtcrtpsender.get_encoder(h264), aiortc_patches.CleanVp8Encoder)

    ctx = aiortc_patches._Vp8Context(av.CodecContext.create("libvpx", "w"))
    ctx.options = {"noise-sensitivity": "4", "cpu-used": "-6"}
    assert ctx._ctx.options == {"noise-sensitivity": "0", "cpu-used": "-6"}

    source = GreenScreen(320, 240)
    decoder = get_decoder(vp8)
    for n in range(3):
        frame = frames.video_frame(source.frame(n))
        frame.pts, frame.time_base = n * 3000, webrtc.VIDEO_TIME_BASE
        payloads, _ = encoder.encode(frame)
        data = b"".join(aiortc_patches.vpx.VpxPayloadDescriptor.parse(p)[1] for p in payloads)
        (out,) = decoder.decode(JitterFrame(data=data, timestamp=0))
        plane = out.planes[0]
        luma = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[: out.height, : out.width]
        assert read_stamp(luma) == n
    assert isinstance(encoder.codec, aiortc_patches._Vp8Context)
