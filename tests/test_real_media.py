"""The ten real clips in ../shared/media (other people's encoders: VP8/VP9 WebM with Vorbis/Opus, H.264 MP4s with
MP3/AAC, a palette GIF, a 1x1 4:4:4 file, a file with no duration) to .mp4, .mov and .webm with the defaults.

Each output keeps every frame, the size, every frame's timestamp and the audio's length, or the command refuses
with one `error:` line naming what the container cannot hold. Skipped when ../shared is not there.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import av
import numpy as np
import pytest

from rmbg_stream.cli import main

MEDIA = Path(__file__).resolve().parents[1].parent / "shared" / "media"
CLIPS = sorted(p.name for p in MEDIA.glob("*.*") if p.suffix != ".md") if MEDIA.is_dir() else []
AUDIO_SLACK = 0.03  # a re-encoded track is padded to whole codec frames: 1024 samples at 44.1 kHz are 23 ms


def video(path: Path) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """Each frame's time in seconds, and the frame sizes seen."""
    times, sizes = [], set()
    with av.open(str(path)) as c:
        for f in c.decode(video=0):
            times.append(float(f.pts * f.time_base))
            sizes.add((f.width, f.height))
    return np.array(times), sizes


def audio(path: Path) -> tuple[float, float] | None:
    """(start, end) in seconds of the first audio stream, as far as it decodes; None without audio."""
    with av.open(str(path)) as c:
        if not c.streams.audio:
            return None
        s, samples, start = c.streams.audio[0], 0, None
        with contextlib.suppress(av.error.FFmpegError):  # video_with_failing_audio.mp4: as far as it goes
            for f in c.decode(s):
                start = float(f.pts * f.time_base) if start is None and f.pts is not None else start
                samples += f.samples
        return (start or 0.0), (start or 0.0) + samples / s.rate


@pytest.mark.slow
@pytest.mark.skipif(not CLIPS, reason=f"no real clips: {MEDIA} is absent")
@pytest.mark.parametrize("name", CLIPS or ["none"])
def test_a_real_clip_goes_to_mp4_mov_and_webm_whole(name, tmp_path, capsys):
    src = MEDIA / name
    src_times, src_sizes = video(src)
    src_audio = audio(src)
    for suffix in (".mp4", ".mov", ".webm"):
        out = tmp_path / (name + suffix)
        code = main(["transcode", str(src), "-o", str(out), "--model", "chroma", "--device", "cpu", "--quiet",
                     "--json"])
        captured = capsys.readouterr()
        if code != 0:  # a refusal must be one line that says why, and leave nothing behind
            errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1 and "cannot hold" in errors[0], (suffix, captured.err)
            assert not out.exists()
            continue
        assert json.loads(captured.out)["frames_out"] == len(src_times)
        times, sizes = video(out)
        assert sizes == src_sizes, (suffix, sizes)
        assert len(times) == len(src_times), suffix
        assert np.abs(times - src_times).max() <= 0.001, suffix  # Matroska/WebM store milliseconds
        got_audio = audio(out)
        assert (got_audio is None) == (src_audio is None), suffix
        if src_audio is not None:
            assert abs(got_audio[1] - src_audio[1]) <= AUDIO_SLACK, (suffix, got_audio, src_audio)
            assert abs((got_audio[1] - got_audio[0]) - (src_audio[1] - src_audio[0])) <= AUDIO_SLACK, suffix
