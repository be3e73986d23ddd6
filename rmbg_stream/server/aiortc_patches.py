"""Every patch to aiortc / aioice internals, each with its reason; `check_versions` guards them.

Written for and tested with aiortc 1.16 and aioice 0.13 (`WRITTEN_FOR`); other versions log a warning on import,
and `tests/test_aiortc_patches.py` fails when a private name or signature relied on here changes upstream.

- `keep_media_on_loopback`: replaces `aioice.ice.get_host_addresses(use_ipv4, use_ipv6)`.
- `MarkerJitterBuffer`: overrides `JitterBuffer._remove_frame` and reads `_packets`, `_origin`, `_capacity` and
  `RtpPacket._data`; installed into `aiortc.rtcrtpreceiver.JitterBuffer` on import.
- `CleanVp8Encoder`: wraps the `codec` attribute of `aiortc.codecs.vpx.Vp8Encoder`; installed into
  `aiortc.rtcrtpsender.get_encoder` by `use_clean_vp8_encoder`.
- `newer_frames`: reads the private `_queue` (an `asyncio.Queue`, None at the end) of aiortc's remote track.
  The public `MediaRelay().subscribe(track, buffered=False)` keeps only the newest frame too, but says nothing
  of the frames it drops, and the session counts each one (`skipped`, in its stats and metrics).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from importlib.metadata import version

from aiortc import rtcrtpreceiver, rtcrtpsender
from aiortc.codecs import vpx
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpreceiver import RemoteStreamTrack

log = logging.getLogger(__name__)

# package -> [lowest, first not checked) major.minor versions these patches were written for and tested with
WRITTEN_FOR = {"aiortc": ((1, 16), (1, 17)), "aioice": ((0, 13), (0, 14))}


def check_versions() -> list[str]:
    """One line per installed package outside `WRITTEN_FOR` (logged as a warning on import); [] when all fit."""
    problems = []
    for package, (low, high) in WRITTEN_FOR.items():
        installed = version(package)
        major_minor = tuple(int(p) for p in installed.split(".")[:2])
        if not low <= major_minor < high:
            problems.append(f"{package} {installed} is outside {'.'.join(map(str, low))} .. "
                            f"{'.'.join(map(str, high))} (exclusive), the versions rmbg_stream.server.aiortc_patches "
                            "was written for: run tests/test_aiortc_patches.py")
    return problems


def newer_frames(track: MediaStreamTrack) -> Iterator:
    """Takes the frames already waiting in a remote track's queue, oldest first; raises MediaStreamError at the
    track's end. A track without that queue (not aiortc's remote track) has none."""
    queue = track._queue if isinstance(track, RemoteStreamTrack) else None  # the private queue: see above
    while queue is not None and not queue.empty():
        frame = queue.get_nowait()
        if frame is None:
            raise MediaStreamError
        yield frame


def keep_media_on_loopback() -> None:
    """Gather only 127.0.0.1 as the ICE host candidate in this process.

    aioice skips loopback and offers every other interface, so a server bound to 127.0.0.1 would still send
    media over the machine's network addresses. Bound to loopback, it keeps media there too.
    """
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"] if use_ipv4 else []


class MarkerJitterBuffer(JitterBuffer):
    """aiortc's video jitter buffer, but a frame leaves on its last packet (the RTP marker bit).

    The stock one releases a frame only when the first packet of the next frame arrives, which adds a whole frame
    interval (33 ms at 30 fps, more for slower cameras) to every frame the server receives.
    """

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        packets = []
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self._capacity]
            if packet is None:
                return None  # a gap: wait for the missing packet, as the stock buffer does
            if packets and packet.timestamp != packets[0].timestamp:
                break  # the next frame has begun, so this one is complete even without a marker
            packets.append(packet)
            if packet.marker:
                break
        else:
            return None
        self.remove(len(packets))
        return JitterFrame(data=b"".join(p._data for p in packets), timestamp=packets[0].timestamp)


def _jitter_buffer(capacity: int, prefetch: int = 0, is_video: bool = False) -> JitterBuffer:
    if is_video and prefetch == 0:
        return MarkerJitterBuffer(capacity, prefetch, is_video)
    return JitterBuffer(capacity, prefetch, is_video)


def use_marker_jitter_buffer() -> None:
    """Receivers in this process use `MarkerJitterBuffer` for video (done on import, as the server wants it)."""
    if rtcrtpreceiver.JitterBuffer is not JitterBuffer or not hasattr(JitterBuffer, "_remove_frame"):
        log.warning("aiortc's JitterBuffer is not the one MarkerJitterBuffer was written for: stock buffer kept")
        return
    rtcrtpreceiver.JitterBuffer = _jitter_buffer  # the receiver looks the class up in its own module


class _Vp8Context:
    """A libvpx encoder context that takes aiortc's options with the temporal denoiser off."""

    def __init__(self, ctx):
        object.__setattr__(self, "_ctx", ctx)

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def __setattr__(self, name, value):
        if name == "options":
            value = {**value, "noise-sensitivity": "0"}
        setattr(self._ctx, name, value)


class CleanVp8Encoder(vpx.Vp8Encoder):
    """aiortc's VP8 encoder without libvpx's temporal denoiser (aiortc sets noise-sensitivity 4, for cameras).

    What the server sends is composited output, not sensor noise: the denoiser only smears it and costs time
    (640x480 on one core: libvpx alone 1.8 -> 0.85 ms a frame, aiortc's whole encode 2.5 -> 1.8 ms).
    """

    @property
    def codec(self):
        return self._codec

    @codec.setter
    def codec(self, ctx):
        self._codec = None if ctx is None else _Vp8Context(ctx)


def _get_encoder(codec):
    if codec.mimeType.lower() == "video/vp8":
        return CleanVp8Encoder()
    return _stock_get_encoder(codec)


_stock_get_encoder = rtcrtpsender.get_encoder


def use_clean_vp8_encoder() -> None:
    """Senders in this process encode VP8 with `CleanVp8Encoder` (the server's; its peers keep their own)."""
    rtcrtpsender.get_encoder = _get_encoder  # the sender looks it up in its own module


for _problem in check_versions():
    log.warning(_problem)
use_marker_jitter_buffer()
