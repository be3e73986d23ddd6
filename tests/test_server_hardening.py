"""The server against hostile and odd input (issue 10): bodies that arrive slowly or chunked, JSON nested deeper than
any parser's stack, malformed Host headers, a port in use, tokens in the access log, lower-case `bearer`, and
exception reprs in error messages. Each test feeds the exact input and checks what the client gets, and that the
server keeps serving with no session left behind."""

from __future__ import annotations

import asyncio
import io
import json
import socket

import numpy as np
import pytest
from aiohttp import ClientSession
from aiortc import RTCSessionDescription
from PIL import Image

from rmbg_stream.server.app import MANAGER
from tests.test_server import CYAN, RtcCamera, WsCamera, assert_clean, near, run, serve, settle

DEEP = "[" * 20_000 + "]" * 20_000  # 40 kB: inside every message limit, far past Python's recursion limit


async def raw_http(url: str, head: str, pieces: list[bytes], pause: float = 0.2) -> tuple[int, dict]:
    """One request over a plain socket: the head, then each piece of the body in its own TCP segment after a pause.
    Returns the status and the JSON body of the answer."""
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
    return int(status_line.split()[1]), json.loads(body) if body else {}


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
