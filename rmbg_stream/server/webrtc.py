"""WebRTC sessions with aiortc: `POST /offer` takes {"sdp", "type": "offer"} and answers the same (plus "session").

A camera session sends its camera and gets the processed video back on the same transceiver; the page's data
channel carries JSON controls and stats (the table in websocket.py), "model" included. The answer also names the
session's model and the server's models ({"model": NAME, "models": [...]}). An OBS view ({"view": "obs", "session":
ID}; the newest camera session when no ID is given) receives a camera session's output as colour over alpha, stacked
in one frame twice as tall; it may open a data channel too, for the stats, with the model of the session it shows.

aiortc's receive queue is unbounded and its example transforms frames inline, so a slow model makes latency grow
without limit. Here a task takes the newest decoded frame off the track and submits it (the engine drops what it
cannot process), and the returned track hands the encoder the newest result whenever it asks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import av
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import VIDEO_TIME_BASE, MediaStreamError

from .aiortc_patches import newer_frames
from .frames import rgb_to_i420, split_rgba, stack_i420, stacked_i420, video_frame
from .sessions import Closed, Session, SessionManager, Tag
from .untrusted import error_text

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 20.0  # an answered offer whose peer never connects is given up after this long
STATS_INTERVAL = 1.0


class BadOffer(ValueError):
    pass


class NoCamera(LookupError):
    pass


def render(result, stacked: bool) -> av.VideoFrame | None:
    """A result as a frame of its source's own size (colour over alpha, twice as tall, when stacked); None when a
    stacked frame is wanted but this result has no alpha yet."""
    img, fmt, tag = result.image, result.format, result.meta
    if fmt == "rgba":
        rgb, alpha = split_rgba(img)
        return video_frame(stacked_i420(rgb, alpha), width=rgb.shape[1])
    w, h = tag.size or (None, None)  # an odd-sized camera's 4:2:0 frames are padded to even sizes for the engine
    if fmt == "yuva420p":
        return video_frame(stack_i420(img, result.alpha, h), width=w)
    if stacked:
        # The straight input colour: the camera page's background is not the OBS view's.
        if tag.source is None or result.alpha is None:
            return None  # a frame submitted before the view attached
        if fmt == "yuv420p":
            return video_frame(stack_i420(tag.source, result.alpha, h), width=w)
        return video_frame(stacked_i420(tag.source, result.alpha), width=tag.source.shape[1])
    if fmt == "yuv420p":
        return video_frame(img, w, h)
    return video_frame(rgb_to_i420(img), img.shape[1], img.shape[0])


class ResultTrack(MediaStreamTrack):
    """The processed video: each `recv` returns the newest result not sent yet, waiting if there is none."""

    kind = "video"

    def __init__(self, session: Session, origin: Session, stacked: bool = False):
        super().__init__()
        self.session = session  # whose counters this output feeds
        self.origin = origin  # whose results it shows: itself, or the camera session an OBS view follows
        self.stacked = stacked
        self.seen = 0
        self.t0: float | None = None
        self.last_pts = -1

    async def recv(self):
        skipped = 0
        while True:
            try:
                result, version = await self.origin.results.get(self.seen)
            except Closed:
                self.stop()
                raise MediaStreamError from None
            skipped += version - self.seen - 1 if self.seen else 0
            self.seen = version
            if not self.origin.current(result):  # taken from before a model switch
                self.session.skipped_stale()
                continue
            frame = render(result, self.stacked)
            if frame is not None:
                break
        # Timestamps from the send time, not the capture time: processing jitter then does not look like network
        # jitter to the browser, whose jitter buffer would grow to absorb it.
        now = time.monotonic()
        if self.t0 is None:
            self.t0 = now
        self.last_pts = max(int((now - self.t0) * VIDEO_TIME_BASE.denominator), self.last_pts + 1)
        frame.pts, frame.time_base = self.last_pts, VIDEO_TIME_BASE
        self.session.sent_result(result, skipped)
        return frame


async def pump(track, session: Session) -> None:
    """Newest camera frame -> engine, until the track ends; the session ends with it."""
    try:
        while True:
            frame = await track.recv()
            now = time.monotonic()
            session.arrived(now)
            # Frames that piled up in aiortc's queue while the loop was busy are already stale: keep the last.
            for newer in newer_frames(track):
                session.arrived(now)
                session.skipped += 1
                frame = newer
            session.submit(frame, Tag(now))
    except MediaStreamError:
        pass
    session.spawn(session.close())


def _send(channel, message: dict) -> None:
    if channel.readyState == "open":
        channel.send(json.dumps(message))


def attach_channel(channel, session: Session) -> None:
    async def answer_control(message):
        _send(channel, await session.answer_control(message))

    @channel.on("message")
    def on_message(message):
        session.spawn(answer_control(message))

    async def push_stats():
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            _send(channel, session.stats_message())

    session.spawn(push_stats())


async def watchdog(pc: RTCPeerConnection, session: Session) -> None:
    await asyncio.sleep(CONNECT_TIMEOUT)
    if pc.connectionState != "connected":
        log.info("session %s: peer never connected, closing", session.id)
        session.spawn(session.close())


async def answer(params: dict, manager: SessionManager) -> dict:
    """Raises BadOffer (400), NoCamera (404) or sessions.Full (503); the session is gone again on any error."""
    sdp, kind = params.get("sdp"), params.get("type")
    if not isinstance(sdp, str) or kind != "offer":
        raise BadOffer('expected {"sdp": "<offer SDP>", "type": "offer"}')
    manager.check_room()
    view = params.get("view")
    source = None
    if view is not None:
        if view != "obs":
            raise BadOffer('"view" can only be "obs"')
        source = manager.camera(params.get("session"))
        if source is None:
            raise NoCamera("no camera session to show yet: open the camera page first")
    if not sdp.startswith("v=0"):
        raise BadOffer("invalid SDP offer: it must start with v=0")
    # aiortc parses leniently; without these the answer would go out and the connection fail later, silently.
    for attr, what in (("a=ice-ufrag:", "ICE credentials"), ("a=fingerprint:", "DTLS fingerprint")):
        if attr not in sdp:
            raise BadOffer(f"invalid SDP offer: no {what} ({attr[:-1]})")
    session = manager.open("viewer" if source else "webrtc", source=source)
    pc = RTCPeerConnection()
    session.on_close.append(pc.close)
    videos = []

    @pc.on("track")
    def on_track(track):
        if track.kind == "video":
            videos.append(track)

    @pc.on("datachannel")
    def on_datachannel(channel):
        attach_channel(channel, session)

    @pc.on("connectionstatechange")
    async def on_state():
        log.info("session %s: connection %s", session.id, pc.connectionState)
        if pc.connectionState in ("failed", "closed"):
            session.spawn(session.close())

    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        camera = None
        for t in pc.getTransceivers():
            if camera is None and t.kind == "video" and (source is not None or t.receiver.track in videos):
                camera = t
                if source is None:
                    t.sender.replaceTrack(ResultTrack(session, session))
                    t.direction = "sendrecv"
                else:
                    t.sender.replaceTrack(ResultTrack(session, source, stacked=True))
                    t.direction = "sendonly"
            else:
                # Audio and extra cameras are refused in the answer: unread, they would queue without bound.
                t.direction = "inactive"
        if camera is None:
            raise BadOffer("the offer has no video to process (add the camera track)" if source is None
                           else "an OBS view needs a video transceiver to receive on (direction recvonly)")
        await pc.setLocalDescription(await pc.createAnswer())
        track = camera.receiver.track if source is None else None
    except BadOffer:
        await session.close()
        raise
    except Exception as exc:
        await session.close()
        raise BadOffer(f"invalid SDP offer: {error_text(exc)}") from None
    if track is not None:
        session.spawn(pump(track, session))
    session.spawn(watchdog(pc, session))
    return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "session": session.id,
            "model": session.model, "models": manager.models}
