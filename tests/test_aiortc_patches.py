"""aiortc / aioice internals that `server/aiortc_patches.py` relies on: these fail when upstream changes them."""

from __future__ import annotations

import asyncio
import inspect

import aioice.ice
from aiortc import rtcrtpreceiver, rtcrtpsender
from aiortc.codecs import vpx
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import MediaStreamError

from rmbg_stream.server import aiortc_patches


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_installed_aiortc_and_aioice_are_the_versions_the_patches_were_written_for():
    assert aiortc_patches.check_versions() == []


def test_aioice_still_gathers_host_addresses_through_get_host_addresses():
    assert params(aioice.ice.get_host_addresses) == ["use_ipv4", "use_ipv6"]
    assert "get_host_addresses(" in inspect.getsource(aioice.ice.Connection)  # looked up at call time


def test_jitter_buffer_internals_the_marker_buffer_reads_are_still_there():
    assert params(JitterBuffer.__init__) == ["self", "capacity", "prefetch", "is_video"]
    assert params(JitterBuffer._remove_frame) == ["self", "sequence_number"]
    jb = JitterBuffer(16, is_video=True)
    assert {"_packets", "_origin", "_capacity"} <= set(vars(jb)) and jb.capacity == 16
    assert params(jb.remove) == ["count"]
    receiver = inspect.getsource(rtcrtpreceiver.RTCRtpReceiver)
    assert "packet._data = depayload(" in receiver  # each packet's payload, which the buffer joins into a frame
    # The receiver builds its buffer from its own module's name, which the patch replaced on import.
    assert "JitterBuffer(" in receiver
    assert rtcrtpreceiver.JitterBuffer is aiortc_patches._jitter_buffer


def test_vp8_encoder_still_keeps_its_libvpx_context_in_codec_and_senders_look_up_get_encoder():
    source = inspect.getsource(vpx.Vp8Encoder)
    assert "self.codec = " in source and "self.codec.options" in source
    assert params(rtcrtpsender.get_encoder) == ["codec"]
    assert "get_encoder(" in inspect.getsource(rtcrtpsender.RTCRtpSender)


def test_remote_track_queue_holds_frames_and_none_at_the_end():
    async def main():
        track = rtcrtpreceiver.RemoteStreamTrack(kind="video")
        assert isinstance(track._queue, asyncio.Queue)
        for item in ["a", "b"]:
            track._queue.put_nowait(item)
        assert list(aiortc_patches.newer_frames(track)) == ["a", "b"]
        track._queue.put_nowait(None)
        try:
            list(aiortc_patches.newer_frames(track))
        except MediaStreamError:
            return
        raise AssertionError("the end of the track was not raised")

    asyncio.run(main())
