"""The WebSocket fallback (`GET /ws`), for where WebRTC cannot connect.

Binary messages are one image each, after a 16-byte header (network byte order):

    offset  size  field
    0       2     magic b"RM"
    2       1     version, 1
    3       1     format: 1 = JPEG, 2 = WebP
    4       4     sequence number (uint32), chosen by the client
    8       8     timestamp (float64), the client's clock in ms
    16      ...   the encoded image

The server answers each processed frame with the same header, echoing the sequence number and timestamp of the frame
it came from (so the client measures its round trip), in the frame's own format; transparent results always come
back as WebP with alpha. Frames are latest-wins: ones the server could not get to are dropped, and the sequence
numbers of the replies show the gaps. Text messages are JSON controls, the same as on the WebRTC data channel:

    control                                              effect
    {"type": "background", "value": V}                   V: "#rrggbb", a colour name, "blur", "blur:0.3",
                                                         "transparent", "none" (the camera as is), "upload"
    {"type": "background", "image": "data:image/..."}    an uploaded image (base64 data URL)
    {"type": "smoothing", "value": 0..1}                 temporal smoothing strength
    {"type": "mask_view" | "pause", "value": bool}       show the mask; stop processing
    {"type": "model", "value": NAME}                     run this session on NAME, one of hello's "models" (the
                                                         server's --model list); smoothing starts again, frames in
                                                         flight are dropped, no reply frame after the "ok" comes
                                                         from the old model; an unknown NAME is an error reply
    {"type": "ping", "t": T}                             -> {"type": "pong", "t": T}
    {"type": "stats"}                                    -> {"type": "stats", ...}

The server answers each control: {"type": "ok", "control": ..., "state": STATE} or {"type": "error", "error": ...};
a control that fails never ends the session. STATE is {"background", "smoothing", "mask_view", "paused", "model"}.
The first message from the server is {"type": "hello", "session": ID, "state": STATE, "models": [NAME, ...]}, and
it pushes {"type": "stats", "model": NAME, "fps_in", "fps_out", ..., "state": STATE} once a second.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
import time

import cv2
import numpy as np
from aiohttp import WSMsgType, web
from PIL import Image, UnidentifiedImageError

from .sessions import Latest, Session, SessionManager, Tag
from .untrusted import error_text

HEADER = struct.Struct("!2sBBId")
MAGIC = b"RM"
VERSION = 1
JPEG, WEBP = 1, 2
FORMATS = {JPEG: "JPEG", WEBP: "WEBP"}
FRAME_LIMIT = 4 * 2**20  # bytes in one frame message
MAX_FRAME_PIXELS = 3840 * 2160
STATS_INTERVAL = 1.0


class ProtocolError(ValueError):
    pass


def pack(fmt: int, seq: int, timestamp: float, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, VERSION, fmt, seq & 0xFFFFFFFF, timestamp) + payload


def unpack(data: bytes) -> tuple[int, int, float, bytes]:
    """(format, seq, timestamp, payload); ProtocolError on a bad header."""
    if len(data) < HEADER.size:
        raise ProtocolError(f"frame of {len(data)} bytes is shorter than the {HEADER.size}-byte header")
    magic, version, fmt, seq, ts = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"bad header: expected magic {MAGIC!r} and version {VERSION}")
    if fmt not in FORMATS:
        raise ProtocolError(f"unknown image format {fmt}: 1 = JPEG, 2 = WebP")
    return fmt, seq, ts, data[HEADER.size:]


def decode(fmt: int, payload: bytes) -> np.ndarray:
    """RGB array; the size is checked on the header before anything is decoded."""
    try:
        img = Image.open(io.BytesIO(payload))
        if img.format != FORMATS[fmt]:
            raise ProtocolError(f"the header says {FORMATS[fmt]} but the image is {img.format}")
        if img.width * img.height > MAX_FRAME_PIXELS:
            raise ProtocolError(f"frame of {img.width}x{img.height} is larger than 3840x2160")
        return np.array(img.convert("RGB"))  # a writable array: the engine wraps it as a tensor
    except ProtocolError:
        raise
    except UnidentifiedImageError:
        raise ProtocolError(f"cannot decode the {FORMATS[fmt]} frame: it is not an image") from None
    except Exception as exc:
        raise ProtocolError(f"cannot decode the {FORMATS[fmt]} frame: {error_text(exc)}") from None


def encode(fmt: int, image: np.ndarray, quality: int = 80) -> tuple[int, bytes]:
    if image.shape[2] == 4:
        fmt, code = WEBP, cv2.COLOR_RGBA2BGRA
    else:
        code = cv2.COLOR_RGB2BGR
    ext, param = (".webp", cv2.IMWRITE_WEBP_QUALITY) if fmt == WEBP else (".jpg", cv2.IMWRITE_JPEG_QUALITY)
    ok, buf = cv2.imencode(ext, cv2.cvtColor(image, code), [param, quality])
    if not ok:
        raise RuntimeError(f"could not encode a {ext} frame")
    return fmt, buf.tobytes()


async def handle(ws: web.WebSocketResponse, manager: SessionManager, session: Session) -> None:
    """Runs the socket until it closes; the caller opened the session and closes it afterwards."""
    loop = asyncio.get_running_loop()
    incoming = Latest()  # undecoded frames: latest-wins here too, so stale frames are not even decoded

    async def send_json(message: dict) -> None:
        if not ws.closed:
            await ws.send_str(json.dumps(message))

    async def decoder():
        seen = 0
        while True:
            (fmt, seq, ts, payload, arrived), version = await incoming.get(seen)
            session.skipped += version - seen - 1
            seen = version
            if session.paused:
                continue
            try:
                rgb = await loop.run_in_executor(None, decode, fmt, payload)
            except ProtocolError as exc:
                await send_json({"type": "error", "error": str(exc), "seq": seq})
                continue
            session.submit(rgb, Tag(arrived, seq=seq, timestamp=ts, fmt=fmt))

    async def sender():
        seen = skipped = 0
        while True:
            result, version = await session.results.get(seen)
            skipped += version - seen - 1 if seen else 0
            seen = version
            tag = result.meta
            fmt, data = await loop.run_in_executor(None, encode, tag.fmt, result.image)
            if not session.current(result):  # the model was switched while it was encoded
                session.skipped_stale()
                continue
            session.sent_result(result, skipped)
            skipped = 0
            if ws.closed:
                return
            await ws.send_bytes(pack(fmt, tag.seq, tag.timestamp, data))

    async def stats():
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            await send_json(session.stats_message())

    for coro in (decoder(), sender(), stats()):
        session.spawn(coro)
    await send_json({"type": "hello", "session": session.id, "state": session.state(), "models": manager.models})
    async for msg in ws:
        if msg.type == WSMsgType.BINARY:
            arrived = time.monotonic()
            session.arrived(arrived)
            if len(msg.data) > FRAME_LIMIT:
                await send_json({"type": "error", "error": f"frame of {len(msg.data)} bytes is over the "
                                                          f"{FRAME_LIMIT} byte limit"})
                continue
            try:
                fmt, seq, ts, payload = unpack(msg.data)
            except ProtocolError as exc:
                await send_json({"type": "error", "error": str(exc)})
                continue
            incoming.put((fmt, seq, ts, payload, arrived))
        elif msg.type == WSMsgType.TEXT:
            await send_json(await session.answer_control(msg.data, limit=manager.upload_limit * 4 // 3 + 1024))
        elif msg.type == WSMsgType.ERROR:
            break
    incoming.close()
