"""Camera mode from a generated clip (paced like a camera) to a file, and the missing-device messages."""

import os
import subprocess
import sys
import time
from fractions import Fraction

import av
import numpy as np
import pytest

from rmbg_stream.camera import CameraError, Capture, open_output, run
from rmbg_stream.engine.backends import ChromaBackend

GREEN = (0, 177, 64)


def make_clip(path, n=45, fps=30, w=160, h=96):
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps, options={"crf": "12", "preset": "ultrafast"})
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            img = np.empty((h, w, 3), np.uint8)
            img[:] = GREEN
            img[24:72, 20 + i:70 + i] = (210, 40, 40)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            out.mux(s.encode(frame))
        out.mux(s.encode())


def test_clip_to_file_is_paced_and_keyed(tmp_path):
    import torch

    make_clip(tmp_path / "in.mp4")
    t0 = time.monotonic()
    summary = run(lambda: ChromaBackend(torch.device("cpu")), str(tmp_path / "in.mp4"), str(tmp_path / "out.mp4"),
                  "#0000ff", 0.0, None, None, quiet=True)
    elapsed = time.monotonic() - t0
    assert elapsed >= 44 / 30 * 0.95  # real time, not as fast as the decoder can go
    assert summary["frames_in"] == 45
    assert summary["frames_out"] + summary["dropped"] == 45 and summary["frames_out"] >= 36
    with av.open(str(tmp_path / "out.mp4")) as c:
        frames = [(f.time, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    assert len(frames) == summary["frames_out"]
    times = [t for t, _ in frames]
    assert times == sorted(times) and times[-1] == pytest.approx(44 / 30, abs=0.04)
    for t, img in frames[::5]:
        i = round(t * 30)
        assert np.abs(img[5:15, 5:15].astype(int) - (0, 0, 255)).max() <= 12  # background is the new colour
        assert np.abs(img[40:56, 30 + i:60 + i].astype(int) - (210, 40, 40)).max() <= 12  # person unchanged


def test_missing_virtual_camera_says_how_to_get_one():
    with pytest.raises(CameraError, match="modprobe v4l2loopback"):
        open_output("vcam", 64, 48, 30, transparent=False)


def test_missing_camera_and_cli_exit_code(tmp_path):
    with pytest.raises(CameraError, match="no camera at /dev/video9"):
        Capture("/dev/video9", None, None)
    proc = subprocess.run([sys.executable, "-m", "rmbg_stream", "camera", "--input", "/dev/video9", "--output",
                           str(tmp_path / "o.mp4"), "--model", "chroma"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no camera at /dev/video9")
    assert not (tmp_path / "o.mp4").exists()
    make_clip(tmp_path / "in.mp4", n=3)
    proc = subprocess.run([sys.executable, "-m", "rmbg_stream", "camera", "--input", str(tmp_path / "in.mp4"),
                           "--output", "vcam", "--model", "chroma"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "v4l2loopback" in proc.stderr.splitlines()[-1]


def test_camera_without_a_model_on_the_cpu_runs_selfie_and_says_so(tmp_path):
    make_clip(tmp_path / "in.mp4", n=6, w=162, h=98)  # not multiples of 4 (H.264 4:2:0 needs even), not square
    proc = subprocess.run([sys.executable, "-m", "rmbg_stream", "camera", "--input", str(tmp_path / "in.mp4"),
                           "--output", str(tmp_path / "out.mp4"), "--device", "cpu", "--background", "#0000ff"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("rmbg-stream: --device cpu, so live video runs --model selfie") and "--model NAME" in first
    with av.open(str(tmp_path / "out.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert frames and frames[0].shape == (98, 162, 3)
    # No person in the clip: the selfie network calls all of it background, the new colour.
    assert np.abs(frames[-1][5:93, 5:157].astype(int) - (0, 0, 255)).mean() < 30
