"""rmbg_stream.media on real files made with PyAV: decoding (timestamps, rotation, colour range, errors),
encoding (odd sizes, alpha, atomic output, audio kept) and looping video backgrounds."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from rmbg_stream.media.background import LoopingVideo
from rmbg_stream.media.reader import MediaError, VideoReader, upright
from rmbg_stream.media.writer import VideoWriter, plan

GREEN = (0, 177, 64)
BOX = (200, 60, 40)
TB = Fraction(1, 90000)


def box_at(i: int, w: int, h: int) -> tuple[int, int, int, int]:
    """The foreground box of frame i: rows y0:y1, cols x0:x1, moving right 2 px a frame."""
    bw, bh = max(8, w // 3), max(8, h // 2)
    x0 = 4 + (2 * i) % max(1, w - bw - 8)
    y0 = (h - bh) // 2
    return y0, y0 + bh, x0, x0 + bw


def scene(i: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame i of the green-screen clip (H x W x 3 RGB) and its true alpha (H x W, 0 or 255)."""
    f = np.empty((h, w, 3), np.uint8)
    f[:] = GREEN
    a = np.zeros((h, w), np.uint8)
    y0, y1, x0, x1 = box_at(i, w, h)
    f[y0:y1, x0:x1] = BOX
    a[y0:y1, x0:x1] = 255
    return f, a


def make_clip(path, n: int = 30, size: tuple[int, int] = (160, 96), rate: int = 30, pts: list[int] | None = None,
              audio: bool = True, rotation: int | None = None, color_range: int | None = None,
              codec: str = "libx264", pix_fmt: str | None = None, faststart: bool = False,
              bt709: bool = False, gop: int | None = None, x264: dict | None = None) -> list[int]:
    """A green-screen clip with a moving box (lossless x264 by default); returns the pts used (time base TB).
    `pts` gives irregular timestamps (variable frame rate); audio is a 440 Hz tone as long as the video.
    `gop`: a keyframe every that many frames; `x264`: the encoder's options instead of lossless."""
    w, h = size
    pts = pts if pts is not None else [round(i / rate / TB) for i in range(n)]
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as c:
        v = c.add_stream(codec, rate=rate)
        v.width, v.height = w, h
        v.pix_fmt = pix_fmt or ("yuv444p" if codec == "libx264" else "yuv420p")
        v.time_base = TB
        v.codec_context.time_base = TB
        if codec == "libx264":
            v.options = x264 or {"qp": "0", "preset": "ultrafast"}
        if gop is not None:
            v.codec_context.gop_size = gop
        if color_range is not None:
            v.codec_context.color_range = color_range
        if bt709:
            v.codec_context.colorspace = 1  # AVCOL_SPC_BT709
        if rotation is not None:
            v.set_display_rotation(rotation)
        a = None
        if audio:
            a = c.add_stream("aac", rate=48000, layout="mono")
        samples = 0
        end = float(pts[-1] * TB) + 1 / rate
        for i, p in enumerate(pts):
            img, _ = scene(i, w, h)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame = frame.reformat(format=v.pix_fmt, dst_color_range=color_range,
                                   dst_colorspace="ITU709" if bt709 else None)
            frame.pts, frame.time_base = p, TB
            c.mux(v.encode(frame))
            while a is not None and samples < min(float(p * TB) + 1 / rate, end) * 48000:
                t = (samples + np.arange(1024)) / 48000
                af = av.AudioFrame.from_ndarray((0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None],
                                                format="fltp", layout="mono")
                af.sample_rate, af.pts = 48000, samples
                c.mux(a.encode(af))
                samples += 1024
        c.mux(v.encode(None))
        if a is not None:
            c.mux(a.encode(None))
    return pts


def read_video(path, decoder: str | None = None) -> tuple[list[np.ndarray], list[float], av.video.stream.VideoStream]:
    """Decoded frames (RGB, or RGBA when the format has alpha), their times in seconds, and the stream."""
    frames, times = [], []
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        ctx = av.CodecContext.create(decoder, "r") if decoder else None  # libvpx-vp9 decodes VP9's alpha
        for packet in c.demux(s):  # the last, empty packet flushes the decoder
            for f in (ctx.decode(packet) if ctx else packet.decode()):
                fmt = "rgba" if f.format.name.startswith("yuva") else "rgb24"
                frames.append(f.to_ndarray(format=fmt))
                times.append(float(f.pts * s.time_base))
    return frames, times, s


def audio_seconds(path) -> float:
    with av.open(str(path)) as c:
        if not c.streams.audio:
            return 0.0
        s = c.streams.audio[0]
        return sum(f.samples for f in c.decode(s)) / s.rate


# -- reader


def test_reader_keeps_timestamps_and_applies_rotation(tmp_path):
    src = tmp_path / "rot.mp4"
    pts = make_clip(src, n=6, size=(161, 97), pts=[0, 3000, 9000, 10000, 30000, 31000], rotation=90)
    with VideoReader(src) as r:
        assert (r.info.width, r.info.height, r.info.rotation) == (97, 161, 90)
        frames = list(r)
    assert [f.pts for f in frames] == pts
    assert frames[0].image.shape == (161, 97, 3)
    want, _ = scene(0, 161, 97)
    assert np.abs(frames[0].image.astype(int) - upright(want, 90)).max() <= 3


def test_reader_full_range(tmp_path):
    src = tmp_path / "full.mp4"
    make_clip(src, n=3, color_range=2)
    with VideoReader(src) as r:
        assert r.info.color_range == 2
        img = next(iter(r)).image
    want, _ = scene(0, 160, 96)
    assert np.abs(img.astype(int) - want).max() <= 3  # decoded as full range, not stretched


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_text("hello, not a video\n" * 50), "not a media file"),
])
def test_reader_bad_inputs(tmp_path, make, message):
    p = tmp_path / "bad.mp4"
    make(p)
    with pytest.raises(MediaError, match=message):
        VideoReader(p)


def write_audio_only(p) -> None:
    """An mp4 with one short silent AAC track and no video."""
    with av.open(str(p), "w", format="mp4") as c:
        a = c.add_stream("aac", rate=48000, layout="mono")
        f = av.AudioFrame.from_ndarray(np.zeros((1, 4800), np.float32), format="fltp", layout="mono")
        f.sample_rate, f.pts = 48000, 0
        c.mux(a.encode(f))
        c.mux(a.encode(None))


def test_reader_audio_only(tmp_path):
    p = tmp_path / "tone.m4a"
    write_audio_only(p)
    with pytest.raises(MediaError, match="no video stream"):
        VideoReader(p)


def test_reader_truncated_raises_while_iterating(tmp_path):
    src = tmp_path / "fs.mp4"
    make_clip(src, n=40, faststart=True, audio=False, codec="libx264", pix_fmt="yuv420p")
    data = src.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(MediaError, match="truncated or corrupt|decode error"), VideoReader(cut) as r:
        for _ in r:
            pass


# -- writer


def test_plan_picks_pixel_formats():
    assert plan("a.mp4", "rgb", 160, 96).pix_fmt == "yuv420p"
    assert plan("a.mp4", "rgb", 161, 97).pix_fmt == "yuv444p"  # x264 4:2:0 needs even sizes
    assert plan("a.webm", "rgb", 161, 97).pix_fmt == "yuv420p"  # VP9 4:2:0 does not
    assert (plan("a.mov", "rgba", 160, 96).codec, plan("a.mov", "rgba", 160, 96).pix_fmt) == \
        ("prores_ks", "yuva444p10le")
    assert (plan("a.webm", "rgba", 161, 97).codec, plan("a.webm", "rgba", 161, 97).pix_fmt) == \
        ("libvpx-vp9", "yuva420p")
    assert plan("frames", "rgba", 16, 16).format is None
    with pytest.raises(ValueError, match="cannot hold transparency"):
        plan("a.mp4", "rgba", 16, 16)
    with pytest.raises(ValueError, match="unsupported output"):
        plan("a.xyz", "rgb", 16, 16)


def test_writer_abort_leaves_nothing(tmp_path):
    src = tmp_path / "in.mp4"
    make_clip(src, n=5)
    with VideoReader(src) as r:
        info = r.info
        frames = list(r)
    out = tmp_path / "out" / "x.mp4"
    w = VideoWriter(out, info, "rgb", copy_from=str(src))
    for f in frames:
        w.write(f.image, f.pts)
    w.abort()
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_writer_copies_audio_and_keeps_pts(tmp_path):
    src = tmp_path / "in.mp4"
    pts = make_clip(src, n=10, pts=[0, 3000, 6000, 15000, 18000, 30000, 33000, 36000, 60000, 63000])
    with VideoReader(src) as r:
        info = r.info
        frames = list(r)
    out = tmp_path / "out.mkv"
    with VideoWriter(out, info, "rgb", copy_from=str(src), crf=0) as w:
        for f in frames:
            w.write(f.image, f.pts)
    got, times, _ = read_video(out)
    assert len(got) == len(pts)
    # Matroska stores milliseconds and no times before zero: the muxer moves every stream up by the AAC priming
    # the copied audio starts with (1024 samples), sync kept.
    shift = 1024 / 48000
    assert np.allclose(times, [float(p * TB) + shift for p in pts], atol=1e-3)
    assert abs(audio_seconds(out) - audio_seconds(src)) < 1 / 30


def test_writer_takes_a_1x1_frame_with_the_strides_torch_gives_it(tmp_path):
    """test_video.mp4 (1x1) failed with "provided array does not have C_CONTIGUOUS rows": numpy calls a torch
    view of one pixel contiguous whatever its strides, PyAV does not."""
    import torch

    src = tmp_path / "dot.mp4"
    make_clip(src, n=3, size=(1, 1), audio=False)
    with VideoReader(src) as r:
        info = r.info
    pixel = torch.tensor([[[[200]], [[60]], [[40]]]], dtype=torch.uint8).permute(0, 2, 3, 1)[0].numpy()
    assert pixel.flags.c_contiguous and pixel.strides != (3, 3, 1)
    with VideoWriter(tmp_path / "dot-out.mp4", info, "rgb", crf=0) as w:
        for i in range(3):
            w.write(pixel, i * 3000)
    got, _, _ = read_video(tmp_path / "dot-out.mp4")
    assert len(got) == 3 and got[0].shape == (1, 1, 3)
    assert np.abs(got[0][0, 0].astype(int) - (200, 60, 40)).max() <= 6


def write_with_audio(src, codec: str, frames: int = 10, audio_start: int = 0) -> None:
    """Grey 64x48 frames at 30 fps and a third of a second of silence in `codec` from sample `audio_start`."""
    with av.open(str(src), "w") as c:
        v = c.add_stream("libx264", rate=30)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = c.add_stream(codec, rate=48000, layout="mono")
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 90, np.uint8), format="rgb24")
            f.pts = i
            c.mux(v.encode(f))
        flac = codec == "flac"
        af = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.int16 if flac else np.float32),
                                        format="s16" if flac else "flt", layout="mono")
        af.sample_rate, af.pts = 48000, audio_start
        c.mux(a.encode(af))
        c.mux(v.encode(None))
        c.mux(a.encode(None))


def copy_through_writer(src, out) -> VideoWriter:
    with VideoReader(src) as r:
        info = r.info
        frames = list(r)
    with VideoWriter(out, info, "rgb", copy_from=str(src)) as w:
        for f in frames:
            w.write(f.image, f.pts)
    return w


@pytest.mark.parametrize("codec", ["libopus", "flac"])
def test_audio_that_only_mp4_takes_is_reencoded_for_mov(tmp_path, codec):
    """no_duration.webm (Opus) to .mov failed with "Invalid argument ... returned 22": the mov muxer takes the
    stream, then refuses it when it writes the header ("opus only supported in MP4")."""
    src, out = tmp_path / "in.mkv", tmp_path / "out.mov"
    write_with_audio(src, codec)
    w = copy_through_writer(src, out)
    assert any("re-encoded as aac" in text for text in w.warnings)
    with av.open(str(out)) as c:
        assert c.streams.audio[0].codec_context.name == "aac"
    assert abs(audio_seconds(out) - audio_seconds(src)) < 0.03


def test_a_writer_failing_as_it_finishes_raises_instead_of_hanging(tmp_path, monkeypatch):
    """An error while flushing (here the header, written with the encoder's first packets) left close() waiting
    for the encoder thread forever."""
    import threading

    from rmbg_stream.media import writer

    monkeypatch.setattr(writer, "HEADER_REFUSES", {})  # FLAC is copied into .mov, and the header then fails
    src, out = tmp_path / "in.mkv", tmp_path / "out.mov"
    # Few frames (x264 holds them all until the flush) and audio after them: the header is written in the flush.
    write_with_audio(src, "flac", frames=4, audio_start=48000)
    raised: list[BaseException] = []

    def attempt():
        try:
            copy_through_writer(src, out)
        except BaseException as exc:
            raised.append(exc)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "close() hangs"
    assert raised and isinstance(raised[0], av.error.FFmpegError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mkv"]


# -- looping background


def test_looping_video_wraps_around(tmp_path):
    p = tmp_path / "bg.mp4"
    make_clip(p, n=4, audio=False)
    bg = LoopingVideo(p)
    frames = [bg.read() for _ in range(9)]
    bg.close()
    assert bg.loops == 2
    assert all(f.shape == (96, 160, 3) for f in frames)
    assert np.array_equal(frames[0], frames[4]) and np.array_equal(frames[1], frames[5])
    assert not np.array_equal(frames[0], frames[1])
