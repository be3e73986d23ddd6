"""`rmbg-stream transcode` end to end on small clips made with PyAV, keyed with the chroma backend."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from rmbg_stream.cli import main
from rmbg_stream.engine.backends import create_backend
from rmbg_stream.engine.engine import Engine
from rmbg_stream.transcode import Progress, transcode

from .test_media import BOX, TB, audio_seconds, make_clip, read_video, scene, write_audio_only

W, H = 160, 96


def run(*argv: str) -> int:
    # No temporal smoothing: its motion-adaptive lag leaves a faint trail behind the moving box, which belongs to
    # the engine's tests, not to these pixel checks of the file path.
    return main(["transcode", *map(str, argv), "--model", "chroma", "--quiet", "--smoothing", "0"])


def regions(alpha: np.ndarray, margin: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(inside, outside) masks at least `margin` px from the box edge: codec- and filter-safe pixels."""
    import cv2

    k = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    inside = cv2.erode((alpha > 0).astype(np.uint8), k, borderType=cv2.BORDER_REPLICATE) > 0
    outside = cv2.erode((alpha == 0).astype(np.uint8), k, borderType=cv2.BORDER_REPLICATE) > 0
    return inside, outside


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("clips") / "green.mp4"
    make_clip(p, n=30, size=(W, H))
    return p


def test_colour_background_keeps_frames_times_audio_and_foreground(clip, tmp_path):
    out = tmp_path / "blue.mp4"
    assert run(clip, "-o", out, "--background", "#0000ff", "--crf", "1") == 0
    src, src_times, _ = read_video(clip)
    got, times, stream = read_video(out)
    assert len(got) == len(src) == 30
    assert stream.average_rate == 30
    assert np.allclose(times, src_times, atol=1e-6)
    assert abs(audio_seconds(out) - audio_seconds(clip)) < 1 / 30
    for i in (0, 15, 29):
        _, truth = scene(i, W, H)
        inside, outside = regions(truth)
        diff = np.abs(got[i].astype(int) - src[i])
        assert diff[inside].max() <= 6, "the foreground changed"
        assert np.abs(got[i][outside].astype(int) - (0, 0, 255)).max() <= 6, "the background is not blue"
    assert leftovers(tmp_path) == []


def test_default_background_is_chroma_green_for_mp4(clip, tmp_path):
    out = tmp_path / "default.mkv"
    assert run(clip, "-o", out, "--crf", "1") == 0
    got, _, _ = read_video(out)
    _, truth = scene(5, W, H)
    _, outside = regions(truth)
    assert np.abs(got[5][outside].astype(int) - (0, 177, 64)).max() <= 6


def test_variable_rate_odd_size_and_rotation(tmp_path):
    src = tmp_path / "phone.mp4"
    pts = make_clip(src, n=12, size=(161, 97), rotation=90,
                    pts=[0, 1500, 4500, 5000, 12000, 12500, 13000, 21000, 22000, 30000, 31000, 40000])
    out = tmp_path / "out.mp4"
    assert run(src, "-o", out, "--background", "white", "--crf", "1") == 0
    got, times, _ = read_video(out)
    assert np.allclose(times, [float(p * TB) for p in pts], atol=1e-6), "timestamps were renumbered"
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        assert (s.width, s.height) == (97, 161)  # rotation applied: upright pixels, exact odd size
        assert next(c.decode(s)).rotation == 0  # and no rotation left for players to apply twice
    _, truth = scene(3, 161, 97)
    truth = np.rot90(truth)
    inside, outside = regions(truth)
    assert np.abs(got[3][inside].astype(int) - BOX).max() <= 8
    assert np.abs(got[3][outside].astype(int) - 255).max() <= 6
    assert abs(audio_seconds(out) - audio_seconds(src)) < 1 / 30


def test_full_colour_range_is_kept(tmp_path):
    src = tmp_path / "full.mp4"
    make_clip(src, n=6, color_range=2, audio=False)
    out = tmp_path / "out.mp4"
    assert run(src, "-o", out, "--background", "#0000ff", "--crf", "1") == 0
    with av.open(str(out)) as c:
        assert c.streams.video[0].codec_context.color_range == 2
    got, _, _ = read_video(out)
    _, truth = scene(2, W, H)
    inside, outside = regions(truth)
    assert np.abs(got[2][inside].astype(int) - BOX).max() <= 8
    assert np.abs(got[2][outside].astype(int) - (0, 0, 255)).max() <= 6


@pytest.mark.parametrize("tags", [{}, {"color_range": 2}, {"bt709": True}], ids=["601-limited", "full", "709"])
def test_420_sources_go_through_as_planes_and_keep_their_colours(tmp_path, tags):
    """8-bit 4:2:0 in and out: no RGB conversion on the way (the reader hands out planes), and the new background
    comes out right in the source's own matrix and range, which the output keeps."""
    from rmbg_stream.media.reader import VideoReader

    src = tmp_path / "420.mp4"
    make_clip(src, n=8, size=(W, H), audio=False, pix_fmt="yuv420p", **tags)
    with VideoReader(src, prefer_yuv=True) as r:
        assert r.yuv and isinstance(next(iter(r)).image, tuple)
    out = tmp_path / "out.mp4"
    assert run(src, "-o", out, "--background", "#0000ff", "--crf", "1") == 0
    with av.open(str(out)) as c:
        cc = c.streams.video[0].codec_context
        full = tags.get("color_range") == 2
        assert cc.pix_fmt == ("yuvj420p" if full else "yuv420p")  # how FFmpeg's H.264 decoder names full range
        assert (cc.color_range == 2) == full
        assert cc.colorspace == (1 if tags.get("bt709") else 2)  # 2: unspecified, as the source
    got, times, _ = read_video(out)
    _, src_times, _ = read_video(src)
    assert times == src_times
    for i in (2, 7):
        _, truth = scene(i, W, H)
        inside, outside = regions(truth)
        assert np.abs(got[i][inside].astype(int) - BOX).max() <= 10  # the source's own 4:2:0 rounding
        assert np.abs(got[i][outside].astype(int) - (0, 0, 255)).max() <= 6


def test_mask_of_a_420_source(tmp_path):
    src = tmp_path / "420.mp4"
    make_clip(src, n=4, size=(W, H), audio=False, pix_fmt="yuv420p")
    out = tmp_path / "mask.mp4"
    assert run(src, "-o", out, "--mask", "--crf", "1") == 0
    got, _, _ = read_video(out)
    _, truth = scene(3, W, H)
    inside, outside = regions(truth)
    assert got[3][inside].min() >= 250 and got[3][outside].max() <= 5


@pytest.mark.parametrize("name, decoder", [("cut.mov", None), ("cut.webm", "libvpx-vp9"), ("frames", None)])
def test_transparent_outputs_have_alpha(clip, tmp_path, name, decoder):
    out = tmp_path / name
    assert run(clip, "-o", out) == 0  # alpha-capable output: transparent by default
    if out.is_dir():
        files = sorted(out.iterdir())
        assert [f.name for f in files[:2]] == ["frame_00001.png", "frame_00002.png"]
        from PIL import Image

        got = [np.asarray(Image.open(f)) for f in files]
    else:
        got, times, _ = read_video(out, decoder)
        _, src_times, _ = read_video(clip)
        tol = 1e-3 + 1024 / 48000 if out.suffix == ".webm" else 1e-6  # ms, shifted with the audio's priming
        assert np.allclose(times, src_times, atol=tol)
    assert len(got) == 30
    for i in (0, 17):
        assert got[i].shape == (H, W, 4)
        _, truth = scene(i, W, H)
        inside, outside = regions(truth)
        a = got[i][..., 3].astype(int)
        assert a[outside].max() <= 2 and a[inside].min() >= 253
        assert np.abs(got[i][..., :3][inside].astype(int) - BOX).max() <= 8
    assert leftovers(tmp_path) == []


def test_mask_output(clip, tmp_path):
    out = tmp_path / "mask.mp4"
    assert run(clip, "-o", out, "--mask", "--crf", "1") == 0
    got, _, _ = read_video(out)
    _, truth = scene(9, W, H)
    inside, outside = regions(truth)
    assert got[9][outside].max() <= 3 and got[9][inside].min() >= 252


def test_video_background_loops(clip, tmp_path):
    bg = tmp_path / "bg.mkv"
    with av.open(str(bg), "w") as c:  # four frames of four flat colours, smaller than the clip: cover-fitted
        s = c.add_stream("ffv1", rate=30)
        s.width, s.height, s.pix_fmt = 80, 48, "yuv444p"
        for i, col in enumerate([(250, 0, 0), (0, 0, 250), (250, 250, 0), (0, 250, 250)]):
            f = av.VideoFrame.from_ndarray(np.full((48, 80, 3), col, np.uint8), format="rgb24")
            f.pts = i
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    out = tmp_path / "out.mp4"
    assert run(clip, "-o", out, "--background", bg, "--crf", "1") == 0
    got, _, _ = read_video(out)
    for i in (0, 1, 5, 10):
        _, truth = scene(i, W, H)
        _, outside = regions(truth)
        want = [(250, 0, 0), (0, 0, 250), (250, 250, 0), (0, 250, 250)][i % 4]
        assert np.abs(np.median(got[i][outside], axis=0) - want).max() <= 6


def make_subtitled(tmp_path: Path) -> Path:
    """An .mkv with video, audio and a SubRip subtitle stream (remuxed from an .srt file)."""
    plain = tmp_path / "plain.mkv"
    make_clip(plain, n=10)
    srt = tmp_path / "subs.srt"
    srt.write_text("1\n00:00:00,000 --> 00:00:00,200\nhello\n\n")
    out = tmp_path / "subbed.mkv"
    with av.open(str(plain)) as a, av.open(str(srt)) as b, av.open(str(out), "w") as o:
        routes = {id(s): o.add_stream_from_template(s) for s in (*a.streams, *b.streams)}
        for packet in (*a.demux(), *b.demux()):
            if packet.size:
                packet.stream = routes[id(packet.stream)]
                o.mux(packet)
    return out


def test_subtitles_copied_or_dropped_with_a_warning(tmp_path, capsys):
    src = make_subtitled(tmp_path)
    out = tmp_path / "out.mkv"
    assert run(src, "-o", out, "--json") == 0
    with av.open(str(out)) as c:
        assert [s.type for s in c.streams] == ["video", "audio", "subtitle"]
        assert c.streams.subtitles[0].codec_context.codec.id == av.Codec("subrip", "r").id
    capsys.readouterr()
    out = tmp_path / "out.mp4"
    assert run(src, "-o", out, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert any(w.startswith("subtitle stream #2 (") and "dropped" in w for w in report["warnings"])
    with av.open(str(out)) as c:
        assert [s.type for s in c.streams] == ["video", "audio"]


def test_webm_reencodes_audio_to_opus(clip, tmp_path, capsys):
    out = tmp_path / "o.webm"
    assert run(clip, "-o", out, "--background", "blur", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["frames_in"] == report["frames_out"] == 30 and report["output"] == str(out)
    assert any("re-encoded as libopus" in w for w in report["warnings"])
    with av.open(str(out)) as c:
        assert c.streams.audio[0].codec_context.name == "opus"
    assert abs(audio_seconds(out) - audio_seconds(clip)) < 1 / 30


def test_reencoded_audio_keeps_its_start(tmp_path):
    src = tmp_path / "late.mkv"  # PCM audio starting 0.5 s in: WebM cannot hold PCM, so it becomes Opus
    with av.open(str(src), "w") as c:
        v = c.add_stream("libx264", rate=30)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = c.add_stream("pcm_s16le", rate=48000, layout="mono")
        for i in range(30):
            f = av.VideoFrame.from_ndarray(scene(i, 64, 48)[0], format="rgb24")
            f.pts = i
            c.mux(v.encode(f))
        c.mux(v.encode(None))
        for k in range(10):
            af = av.AudioFrame.from_ndarray(np.zeros((1, 2400), np.int16), format="s16", layout="mono")
            af.sample_rate, af.pts = 48000, 24000 + 2400 * k
            c.mux(a.encode(af))
    out = tmp_path / "o.webm"
    assert run(src, "-o", out) == 0
    with av.open(str(out)) as c:
        first = next(c.decode(audio=0))
        assert abs(float(first.pts * first.time_base) - 0.5) < 0.01
    assert abs(audio_seconds(out) - 0.5) < 1 / 30


def test_transparent_into_mp4_is_refused(clip, tmp_path, capsys):
    assert run(clip, "-o", tmp_path / "x.mp4", "--background", "transparent") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot hold transparency" in err[0]
    assert list(tmp_path.iterdir()) == []


# -- failures


def write_truncated(p: Path) -> None:
    make_clip(p.with_name("whole.mp4"), n=20)
    data = p.with_name("whole.mp4").read_bytes()
    p.write_bytes(data[: len(data) // 2])  # the index (moov) is at the end: gone


def write_cut_stream(p: Path) -> None:
    make_clip(p.with_name("fast.mp4"), n=20, faststart=True, audio=False)
    data = p.with_name("fast.mp4").read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])  # index intact, frames missing: fails while decoding


@pytest.mark.parametrize("make, message", [
    (None, "no such file"),
    (lambda p: p.write_text("just some text\n" * 100), "not a media file"),
    (write_audio_only, "no video stream"),
    (write_truncated, "not a media file, or truncated"),
    (write_cut_stream, "truncated or corrupt"),
])
def test_bad_input_gets_one_line_and_no_output(tmp_path, capsys, make, message):
    src = tmp_path / "in.mp4"
    if make is not None:
        make(src)
    out = tmp_path / "out" / "o.mp4"
    assert run(src, "-o", out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and message in err[0] and "in.mp4" in err[0]
    assert not out.exists()
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def write_noisy(path: Path, n: int = 60) -> None:
    """n frames of noise (every frame about as large, so a cut at x % keeps about x % of them) and a tone."""
    rng = np.random.default_rng(1)
    fmt = {".mp4": {"movflags": "+faststart"}}.get(path.suffix, {})  # the index up front: it survives the cut
    with av.open(str(path), "w", options=fmt) as c:
        v = c.add_stream("libx264", rate=30)
        v.width, v.height, v.pix_fmt = 96, 64, "yuv420p"
        v.options = {"qp": "0", "preset": "ultrafast"}
        a = c.add_stream("aac", rate=48000, layout="mono")
        for i in range(n):
            f = av.VideoFrame.from_ndarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), format="rgb24")
            f.pts = i
            c.mux(v.encode(f))
            af = av.AudioFrame.from_ndarray(np.full((1, 1600), 0.1, np.float32), format="fltp", layout="mono")
            af.sample_rate, af.pts = 48000, i * 1600
            c.mux(a.encode(af))
        c.mux(v.encode(None))
        c.mux(a.encode(None))


def readable_frames(path: Path) -> int:
    """Frames PyAV decodes from a file before its data runs out or goes bad."""
    n = 0
    with contextlib.suppress(av.error.FFmpegError), av.open(str(path)) as c:
        for packet in c.demux(video=0):
            if packet.is_corrupt:
                break
            n += len(packet.decode())
    return n


def packet_end_before(path: Path, size: int) -> int:
    """The byte offset where the last whole packet before `size` ends: a cut there leaves no broken packet."""
    with av.open(str(path)) as c:
        return max(p.pos + p.size for p in c.demux() if p.pos is not None and p.pos >= 0 and p.pos + p.size <= size)


@pytest.mark.parametrize("suffix, percent, clean", [
    (".mp4", 50, False), (".mp4", 50, True), (".mkv", 10, False), (".mkv", 50, False), (".mkv", 90, False),
], ids=["mp4-50", "mp4-50-between-packets", "mkv-10", "mkv-50", "mkv-90"])
def test_a_truncated_input_is_an_error_unless_allowed(tmp_path, capsys, caplog, suffix, percent, clean):
    whole, cut = tmp_path / f"whole{suffix}", tmp_path / f"cut{suffix}"
    write_noisy(whole)
    data = whole.read_bytes()
    size = len(data) * percent // 100
    cut.write_bytes(data[: packet_end_before(whole, size) if clean else size])
    kept = readable_frames(cut)
    assert 0 < kept < 60
    out = tmp_path / "out.mp4"
    assert run(cut, "-o", out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "truncated" in err[0], err
    assert "--allow-truncated" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cut.name, whole.name])  # nothing at OUTPUT

    assert run(cut, "-o", out, "--allow-truncated", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["frames_out"] == kept and any("truncated" in w for w in report["warnings"])
    assert any("truncated" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    got, _, _ = read_video(out)
    assert len(got) == kept


def test_a_whole_file_passes_the_truncation_check(tmp_path, capsys):
    src = tmp_path / "whole.mkv"
    write_noisy(src, n=30)
    assert run(src, "-o", tmp_path / "out.mp4", "--json") == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == []


def test_folder_goes_on_after_a_bad_file(clip, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.mp4").write_bytes(clip.read_bytes())
    make_clip(folder / "b.mov", n=8, size=(64, 48))
    (folder / "broken.mp4").write_text("not a video")
    (folder / "notes.txt").write_text("ignored: not a video file name")
    out = tmp_path / "out"
    assert main(["transcode", str(folder), "-o", str(out), "--model", "chroma", "--quiet", "--json",
                 "--background", "#ff00ff"]) == 1
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["a.mp4", "b.mp4"]
    assert "failed: 1 of 3 files:" in captured.err and "broken.mp4" in captured.err.splitlines()[-1]
    report = json.loads(captured.out)
    assert report["frames_out"] == 38 and [Path(f["input"]).name for f in report["failures"]] == ["broken.mp4"]
    assert len(read_video(out / "b.mp4")[0]) == 8


def test_exception_in_progress_hook_leaves_nothing(clip, tmp_path):
    out = tmp_path / "o.mov"

    def hook(done, total):
        if done == 5:
            raise KeyboardInterrupt

    with Engine(create_backend("chroma", torch.device("cpu")), max_batch=2) as engine:
        with pytest.raises(KeyboardInterrupt):
            transcode(engine, clip, out, on_frame=hook)
        assert engine.streams == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_leaves_nothing(tmp_path, sig):
    src = tmp_path / "long.mp4"
    make_clip(src, n=600, size=(320, 192), audio=False)  # several seconds of work on two cores
    out = tmp_path / "o.mp4"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rmbg_stream", "transcode", str(src), "-o", str(out),
                             "--model", "chroma", "--device", "cpu", "--quiet"], stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            parts = [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
            if parts and parts[0].stat().st_size > 0:  # the encoder has written
                break
            time.sleep(0.05)
        assert proc.poll() is None, "finished before it could be interrupted"
        proc.send_signal(sig)
        rc = proc.wait(timeout=30)
    finally:
        proc.kill()
    assert rc == 128 + sig  # 130 for Ctrl-C, 143 for a kill
    if sig == signal.SIGINT:
        assert "interrupted" in proc.stderr.read().decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4"]


def test_progress_lines_without_a_terminal():
    buf = io.StringIO()
    p = Progress("clip.mp4", 0, interval=0.0, stream=buf)
    p.update(5, 10)
    p.update(10, 10)
    p.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("clip.mp4: 5/10 frames,") and "ETA" in lines[0]
    quiet = io.StringIO()
    q = Progress("clip.mp4", 10, quiet=True, interval=0.0, stream=quiet)
    q.update(5)
    assert quiet.getvalue() == ""
