"""The server against hostile and odd input (issue 10): bodies that arrive slowly or chunked, JSON nested deeper than
any parser's stack, malformed Host headers, a port in use, tokens in the access log, lower-case `bearer`, and
exception reprs in error messages. Each test feeds the exact input and checks what the client gets, and that the
server keeps serving with no session left behind."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from aiohttp import ClientSession, WSMsgType
from aiortc import RTCSessionDescription
from PIL import Image
from yarl import URL

from rmbg_stream.server import websocket
from rmbg_stream.server.app import MANAGER
from rmbg_stream.server.untrusted import TooDeep, loads_json
from tests.test_server import CYAN, RtcCamera, WsCamera, assert_clean, near, run, serve, settle

DEEP = "[" * 20_000 + "]" * 20_000  # 40 kB: inside every message limit, far past Python's recursion limit


async def raw_http(url: str, head: str, pieces: list[bytes], pause: float = 0.2) -> tuple[int, dict | bytes]:
    """One request over a plain socket: the head, then each piece of the body in its own TCP segment after a pause.
    Returns the status and the body of the answer (parsed when it is JSON)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.write(head.replace("\n", "\r\n").encode() + b"\r\n")
    await writer.drain()
    for piece in pieces:
        await asyncio.sleep(pause)
        writer.write(piece)
        await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 30)  # Connection: close, so the answer ends at EOF
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), json.loads(body) if body.startswith(b"{") else body


def body_pieces(body: bytes, n: int, chunked: bool) -> tuple[str, list[bytes]]:
    """The body header line and the body cut into n pieces, as they go on the wire (chunk frames when chunked)."""
    cuts = np.linspace(0, len(body), n + 1).astype(int)
    parts = [body[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    if not chunked:
        return f"Content-Length: {len(body)}", parts
    framed = [b"%x\r\n%s\r\n" % (len(p), p) for p in parts]
    framed[-1] += b"0\r\n\r\n"
    return "Transfer-Encoding: chunked", framed


def noisy_png(width: int, height: int, rgb: tuple) -> bytes:
    """A real PNG of `rgb` with +-12 of noise: the noise keeps zlib from shrinking it."""
    rng = np.random.default_rng(10)
    noise = rng.integers(-12, 13, (height, width, 3))
    pixels = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


# -- bodies that arrive in pieces (item 2)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_large_background_upload_sent_slowly_in_pieces_is_read_whole(chunked):
    png = noisy_png(757, 523, CYAN)
    assert len(png) >= 500_000

    async def main():
        async with serve() as (url, app), ClientSession() as http:
            async with http.ws_connect(url + "/ws") as sock:
                session = (await sock.receive_json(timeout=5))["session"]
                length, pieces = body_pieces(png, 5, chunked)
                status, reply = await raw_http(url, f"POST /session/{session}/background HTTP/1.1\nHost: 127.0.0.1\n"
                                                    f"{length}\nConnection: close\n", pieces)
                assert status == 200, reply
                assert reply["state"]["background"] == "upload"
                stored = app[MANAGER].get(session).upload
                assert np.array_equal(np.asarray(Image.open(stored)), np.asarray(Image.open(io.BytesIO(png))))
                cam = WsCamera(sock, 320, 240)
                reader = asyncio.ensure_future(cam.receive())
                await cam.send_frames(0.5)
                assert await settle(lambda: len(cam.frames) > 3)
                reader.cancel()
                assert near(cam.frames[-1][2], CYAN)
            assert await settle(lambda: not app[MANAGER].sessions)
            assert_clean(app)

    run(main())


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_valid_offer_split_across_segments_is_answered(chunked):
    async def main():
        async with serve() as (url, app):
            cam = RtcCamera()
            cam.pc.addTransceiver(cam.track, direction="sendrecv")
            await cam.pc.setLocalDescription(await cam.pc.createOffer())
            body = json.dumps({"sdp": cam.pc.localDescription.sdp, "type": "offer"}).encode()
            length, pieces = body_pieces(body, 3, chunked)
            status, answer = await raw_http(url, f"POST /offer HTTP/1.1\nHost: 127.0.0.1\n{length}\n"
                                                 "Content-Type: application/json\nConnection: close\n", pieces)
            assert status == 200, answer
            assert answer["type"] == "answer" and answer["sdp"].startswith("v=0")
            await cam.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
            assert await settle(lambda: cam.pc.connectionState == "connected", 15)
            await cam.close()
            assert await settle(lambda: not app[MANAGER].sessions, 10)
            assert_clean(app)

    run(main())


def test_a_body_over_the_limit_is_refused_even_when_it_comes_chunked():
    async def main():
        async with serve(upload_limit=100_000) as (url, app), ClientSession() as http:
            async with http.ws_connect(url + "/ws") as sock:
                session = (await sock.receive_json(timeout=5))["session"]
                length, pieces = body_pieces(b"\0" * 150_000, 3, chunked=True)
                status, reply = await raw_http(url, f"POST /session/{session}/background HTTP/1.1\n"
                                                    f"Host: 127.0.0.1\n{length}\nConnection: close\n", pieces)
                assert status == 413 and "100000 byte limit" in reply["error"]
            assert await settle(lambda: not app[MANAGER].sessions)

    run(main())


# -- JSON nested past the parser's stack (item 8)


def test_deeply_nested_json_in_an_offer_is_a_400():
    async def main():
        async with serve() as (url, app), ClientSession() as http:
            nested_sdp = json.dumps({"type": "offer", "sdp": "x"})[:-1] + ', "view": ' + DEEP + "}"
            for body in [DEEP, "{" + '"a": {' * 5_000 + "}" * 5_001, nested_sdp]:
                async with http.post(url + "/offer", data=body, headers={"Content-Type": "application/json"}) as r:
                    got = await r.json()
                    assert r.status == 400 and "nested" in got["error"], (body[:30], got)
            async with http.get(url + "/healthz") as r:
                assert (await r.json())["sessions"] == 0
            assert_clean(app)

    run(main())


def test_deeply_nested_json_on_the_websocket_is_a_control_error_and_the_socket_stays():
    async def main():
        async with serve() as (url, app), ClientSession() as http:
            async with http.ws_connect(url + "/ws") as sock:
                await sock.receive_json(timeout=5)
                for text in [DEEP, '{"type": "ping", "t": ' + "[" * 900 + "]" * 900 + "}"]:
                    await sock.send_str(text)
                    reply = await sock.receive_json(timeout=5)
                    assert reply["type"] == "error" and "nested" in reply["error"], reply
                await sock.send_str('{"type": "ping", "t": 5}')
                assert await sock.receive_json(timeout=5) == {"type": "pong", "t": 5}
                cam = WsCamera(sock)
                await sock.send_bytes(websocket.pack(websocket.JPEG, 3, 0, cam.encoded[3]))
                while (msg := await sock.receive(timeout=10)).type != WSMsgType.BINARY:
                    pass
                assert websocket.unpack(msg.data)[1] == 3
            assert await settle(lambda: not app[MANAGER].sessions)
            assert_clean(app)

    run(main())


def test_deeply_nested_json_on_the_data_channel_is_a_control_error_and_the_session_lives():
    async def main():
        async with serve() as (url, app), ClientSession() as http:
            cam = RtcCamera()
            session = (await cam.connect(http, url))["session"]
            assert await settle(lambda: cam.channel.readyState == "open", 15)
            cam.channel.send(DEEP)
            assert await settle(lambda: [m for m in cam.messages if m["type"] == "error"])
            assert "nested" in next(m for m in cam.messages if m["type"] == "error")["error"]
            cam.send({"type": "ping", "t": 1})
            assert await settle(lambda: [m for m in cam.messages if m["type"] == "pong"])
            assert session in app[MANAGER].sessions
            n = len(cam.frames)
            assert await settle(lambda: len(cam.frames) > n + 5, 10)  # still processing
            await cam.close()
            assert await settle(lambda: not app[MANAGER].sessions, 10)
            assert_clean(app)

    run(main())


def test_json_depth_is_counted_outside_strings_only():
    inside = json.dumps({"type": "ping", "t": '[{"\\"' * 5_000})  # brackets and escaped quotes inside a string
    assert loads_json(inside)["t"].startswith('[{"')
    assert loads_json("[" * 32 + "]" * 32) == loads_json("[" * 32 + "]" * 32)
    with pytest.raises(TooDeep):
        loads_json("[" * 33 + "]" * 33)
    with pytest.raises(TooDeep):
        loads_json('{"a": "}}}", "b": ' + "[" * 40)  # not JSON either, but the depth is what is told
    big = json.dumps({"type": "background", "image": "data:image/png;base64," + "A" * 11_000_000})
    t0 = time.perf_counter()
    assert loads_json(big)["type"] == "background"
    assert time.perf_counter() - t0 < 1.0  # a large upload through a control is not scanned character by character


# -- malformed Host headers (item 9)


@pytest.mark.parametrize("token", [None, "s3cret"], ids=["no-token", "token"])
def test_a_malformed_host_header_is_a_400(token):
    async def main():
        async with serve(token=token) as (url, app):
            auth = f"Authorization: Bearer {token}\n" if token else ""
            for host in ["[::1", "127.0.0.1:99999", "[::1]:99999", "127.0.0.1:abc", "[nope]", "127.0.0.1/x",
                         "evil.example@127.0.0.1"]:
                for method, path in [("POST", "/offer"), ("GET", "/ws"), ("GET", "/metrics"),
                                     ("POST", "/session/abc/background"), ("GET", "/"), ("GET", "/healthz")]:
                    status, reply = await raw_http(url, f"{method} {path} HTTP/1.1\nHost: {host}\n{auth}"
                                                        "Content-Length: 2\nConnection: close\n", [b"{}"], 0)
                    assert status == 400 and "Host" in reply["error"], (host, path, status, reply)
            for host in ["127.0.0.1", "localhost:8080", "[::1]:80", "127.0.0.1:"]:  # well-formed ones still work
                status, reply = await raw_http(url, f"GET /metrics HTTP/1.1\nHost: {host}\n{auth}Connection: close\n",
                                               [], 0)
                assert status == 200, (host, reply)
            assert_clean(app)

    run(main())


# -- the serve command (items 11 and 13)


def serve_command(*args: str) -> subprocess.Popen:
    """`python -m rmbg_stream -v serve --model chroma --device cpu ARGS` in the background."""
    return subprocess.Popen([sys.executable, "-m", "rmbg_stream", "-v", "serve", "--model", "chroma", "--device", "cpu",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("port", ["in-use", "99999", "-1"])
def test_serve_on_a_port_it_cannot_have_says_so_in_one_line(port):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if port == "in-use":
            port = str(taken.getsockname()[1])
        out, err = (proc := serve_command("--port", port)).communicate(timeout=120)
    assert proc.returncode != 0
    assert "serving" not in out and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and port in lines[0], err


def test_the_access_log_never_shows_the_token():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = serve_command("--port", str(port), "--token", "s3cret-t0ken")
    base = f"http://127.0.0.1:{port}"

    async def main():
        async with ClientSession() as http:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, proc.communicate()
                with contextlib.suppress(OSError):
                    async with http.get(base + "/healthz") as r:
                        break
                assert time.monotonic() < deadline, "serve did not come up"
                await asyncio.sleep(0.2)
            for path in ["/?token=s3cret-t0ken", "/obs?session=x&token=s3cret-t0ken", "/metrics?tok%65n=s3cret-t0ken"]:
                async with http.get(URL(base + path, encoded=True),  # sent as written
                                    headers={"Referer": base + "/?token=s3cret-t0ken"}) as r:
                    assert r.status == 200, path
            async with http.ws_connect(base + "/ws?token=s3cret-t0ken") as sock:
                assert (await sock.receive_json(timeout=5))["type"] == "hello"

    try:
        run(main())
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert "?token=s3cret-t0ken" in out  # the banner is for the person who started it
    assert "GET /obs?session=x&token=[redacted]" in err and "GET /ws?token=[redacted]" in err  # the log is on
    assert "s3cret-t0ken" not in err, err


def test_a_bearer_token_is_taken_with_the_scheme_in_any_case():
    async def main():
        async with serve(token="s3cret") as (url, app), ClientSession() as http:
            for auth, status in [("bearer s3cret", 200), ("BEARER s3cret", 200), ("Bearer   s3cret ", 200),
                                 ("bEaReR s3cret", 200), ("Basic s3cret", 401), ("Bearers3cret", 401),
                                 ("bearer wrong", 401), ("bearer", 401)]:
                async with http.get(url + "/metrics", headers={"Authorization": auth}) as r:
                    assert r.status == status, auth
            async with http.ws_connect(url + "/ws", headers={"Authorization": "bearer s3cret"}) as sock:
                assert (await sock.receive_json(timeout=5))["type"] == "hello"
            assert await settle(lambda: not app[MANAGER].sessions)

    run(main())


def test_decode_errors_show_the_client_no_object_reprs():
    async def main():
        async with serve() as (url, app), ClientSession() as http:
            async with http.ws_connect(url + "/ws") as sock:
                session = (await sock.receive_json(timeout=5))["session"]
                errors = []
                jpeg = WsCamera(sock).encoded[0]
                for fmt, payload in [(websocket.JPEG, b"not a jpeg"), (websocket.WEBP, b"RIFF\0\0\0\0WEBPjunk"),
                                     (websocket.JPEG, jpeg[: len(jpeg) // 3]), (websocket.WEBP, jpeg)]:
                    await sock.send_bytes(websocket.pack(fmt, 1, 0, payload))
                    errors.append((await sock.receive_json(timeout=5))["error"])
                await sock.send_str(json.dumps({"type": "background", "image": "data:image/png;base64,AAAA"}))
                errors.append((await sock.receive_json(timeout=5))["error"])
                png = noisy_png(33, 17, CYAN)
                for body in [b"\x89PNG\r\n\x1a\n" + b"\0" * 40, png[: len(png) // 2], b"BM" + b"\xff" * 60]:
                    async with http.post(f"{url}/session/{session}/background", data=body) as r:
                        assert r.status == 400
                        errors.append((await r.json())["error"])
            assert errors[0].startswith("cannot decode the JPEG frame")
            for error in errors:
                assert "0x" not in error and "<" not in error and "object at" not in error, errors

    run(main())
