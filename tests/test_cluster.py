"""`transcode --cluster` on a local Ray instance (2 CPUs): folders, lists, segmented long clips joined exactly,
a killed worker recovered, Ctrl-C leaving nothing behind. Small clips made with PyAV, keyed with `chroma`."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from rmbg_stream.cli import main

from .test_media import audio_seconds, make_clip, read_video

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'rmbg-stream[cluster]')")

# One worker runs every test that starts a local Ray (pytest -n: --dist loadgroup), never two at once.
pytestmark = pytest.mark.xdist_group("ray")
W, H = 162, 94  # even (x264 4:2:0 path), not multiples of 4, not square
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


def make_long(path: Path, n: int, gop: int = 15, pts: list[int] | None = None, rate: int = 30) -> list[int]:
    """A green-screen clip with a keyframe every `gop` frames (x264 with B-frames) and an audio tone."""
    return make_clip(path, n, size=(W, H), rate=rate, pts=pts, pix_fmt="yuv420p", gop=gop,
                     x264={"crf": "10", "preset": "veryfast"})


def segment_starts(path: Path, seconds: float = 1.0) -> list[int]:
    """Indices (display order) of the frames that start segments: the first keyframe at least `seconds` after
    the previous start."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        packets = [(p.pts, p.is_keyframe) for p in c.demux(s) if p.size]
    pts = sorted(p for p, _ in packets)
    cuts = [pts[0]]
    for k in sorted(p for p, key in packets if key):
        if k >= cuts[-1] + seconds / s.time_base:
            cuts.append(k)
    return [pts.index(c) for c in cuts]


def cli(*argv, cluster: bool = True) -> tuple[int, dict | None]:
    out = io.StringIO()
    extra = ["--cluster", "--cluster-workers", "2", "--segment-seconds", "1"] if cluster else []
    with contextlib.redirect_stdout(out):
        # The test's own options come last, so they win over these defaults.
        rc = main(["transcode", *extra, "--model", "chroma", "--quiet", "--json", "--crf", "0", *map(str, argv)])
    return rc, json.loads(out.getvalue().strip().splitlines()[-1]) if out.getvalue().strip() else None


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> Path:
    """Variable frame rate (a frame missing in each second), 4 s, keyframes every 15 frames: four 1 s segments."""
    p = tmp_path_factory.mktemp("long") / "long.mp4"
    steps = [0] + [6000 if i % 30 == 20 else 3000 for i in range(1, 120)]
    pts = np.cumsum(steps).tolist()
    make_long(p, 120, pts=pts)
    return p


def test_folder_and_long_clip_equal_single_process_frame_for_frame_with_smoothing_off(long_clip, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "long.mp4").write_bytes(long_clip.read_bytes())
    make_clip(folder / "short.mp4", n=12, size=(W, H), codec="libx264", pix_fmt="yuv420p")
    (folder / "broken.mp4").write_text("not a video\n" * 50)
    rc, report = cli(folder, "-o", tmp_path / "out", "--smoothing", "0")
    assert rc == 1, "the broken input fails, alone"
    assert [Path(f["input"]).name for f in report["failures"]] == ["broken.mp4"]
    ok = {Path(f["input"]).name: f for f in report["files"] if f["status"] == "ok"}
    assert ok["long.mp4"]["frames_out"] == 120 and ok["short.mp4"]["frames_out"] == 12
    assert sum(report["workers"].values()) == 132
    assert 0 < report["startup_s"] < report["seconds"]
    assert ok["long.mp4"]["seconds"] <= report["seconds"] - report["startup_s"] + 0.05, \
        "a segmented file's time starts at its first segment, not before the workers were up"
    assert hidden(tmp_path / "out") == [] and not (tmp_path / "out" / "broken.mp4").exists()

    assert cli(long_clip, "-o", tmp_path / "single.mp4", "--smoothing", "0", cluster=False)[0] == 0
    src, src_times, _ = read_video(long_clip)
    got, times, _ = read_video(tmp_path / "out" / "long.mp4")
    ref, _, _ = read_video(tmp_path / "single.mp4")
    assert len(got) == len(src) == 120 and times == src_times, "every frame and timestamp kept (VFR)"
    assert len(segment_starts(long_clip)) >= 3
    for i in range(120):  # both sides of every boundary included
        assert np.array_equal(got[i], ref[i]), f"frame {i} differs from the single-process output"
    assert abs(audio_seconds(tmp_path / "out" / "long.mp4") - audio_seconds(long_clip)) < 1 / 30


def test_smoothing_crosses_segment_boundaries_within_codec_noise_from_a_list_of_inputs(long_clip, tmp_path):
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"# one a line\n{long_clip}\n\n")
    # Default batches on both sides: smoothing does not depend on how frames fall into batches (test_engine).
    rc, report = cli(listing, "-o", tmp_path / "out", "--smoothing", "0.5")
    assert rc == 0 and report["frames_out"] == 120
    assert cli(long_clip, "-o", tmp_path / "single.mp4", "--smoothing", "0.5", cluster=False)[0] == 0
    got, times, _ = read_video(tmp_path / "out" / "long.mp4")
    ref, ref_times, _ = read_video(tmp_path / "single.mp4")
    assert times == ref_times
    cuts = segment_starts(long_clip)
    assert len(cuts) >= 3
    for i in cuts[1:]:
        for j in (i - 2, i - 1, i, i + 1, i + 2):
            assert np.abs(got[j].astype(int) - ref[j]).max() <= 2, f"frame {j} by the boundary at {i}"


def worker_pids() -> list[int]:
    """Processes Ray titled after our actor class (`ray::Worker...`)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if (d / "cmdline").read_bytes().startswith(b"ray::Worker"):
                    pids.append(int(d.name))
    return pids


def wait_for(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_a_killed_worker_is_restarted_and_its_file_retried(tmp_path):
    src = tmp_path / "clip.mp4"
    make_long(src, 600, gop=30)
    out = tmp_path / "out" / "clip.mp4"
    result = {}
    argv = (src, "-o", out, "--smoothing", "0", "--cluster-workers", "1", "--segment-seconds", "1000", "--retries", "2")
    job = threading.Thread(target=lambda: result.update(zip(("rc", "report"), cli(*argv))))
    job.start()
    assert wait_for(lambda: out.parent.exists() and hidden(out.parent)), "the worker never started writing"
    victims = worker_pids()
    assert len(victims) == 1
    os.kill(victims[0], signal.SIGKILL)
    job.join(timeout=180)
    assert result["rc"] == 0, result
    assert result["report"]["frames_out"] == 600
    got, times, _ = read_video(out)
    assert len(got) == 600
    assert hidden(out.parent) == [], "the killed attempt's temporary file is swept"


def test_ctrl_c_cancels_cluster_work_and_leaves_nothing_behind(local_ray, tmp_path):
    src = tmp_path / "clip.mp4"
    make_long(src, 900, gop=30)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "rmbg_stream", "transcode", str(src), "-o", str(out / "clip.mp4"), "--model",
           "chroma", "--quiet", "--cluster", local_ray, "--cluster-workers", "2", "--segment-seconds", "5"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: out.exists() and len(hidden(out)) >= 2), "no segment was being written"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert sorted(p.name for p in out.iterdir()) == [], "a partial output or temporary file was left"
    assert wait_for(lambda: worker_pids() == [], 20), "the workers were not stopped"


def test_cluster_without_ray_is_one_line_naming_the_extra(tmp_path):
    code = ("import sys; sys.modules['ray'] = None; from rmbg_stream.cli import main; "
            f"sys.exit(main(['transcode', {str(tmp_path)!r}, '-o', 'x.mp4', '--cluster']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: --cluster needs Ray: pip install 'rmbg-stream[cluster]'"]


def png_frames(folder: Path) -> tuple[list[str], list[np.ndarray]]:
    names = sorted(p.name for p in folder.iterdir())
    return names, [np.asarray(Image.open(folder / n)) for n in names]


def test_a_png_sequence_is_segmented_across_workers_numbered_continuously_and_equal_to_single_process(
        long_clip, tmp_path):
    out = tmp_path / "frames"
    rc, report = cli(long_clip, "-o", out, "--smoothing", "0")
    assert rc == 0 and report["frames_out"] == 120
    assert len([v for v in report["workers"].values() if v]) == 2, "the segments were shared by both workers"
    assert cli(long_clip, "-o", tmp_path / "single", "--smoothing", "0", cluster=False)[0] == 0
    names, got = png_frames(out)
    ref_names, ref = png_frames(tmp_path / "single")
    assert names == ref_names == [f"frame_{i:05d}.png" for i in range(1, 121)]
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == (H, W, 4) and np.array_equal(a, b), f"frame {i + 1} differs from the single-process one"
    assert hidden(tmp_path) == [], "segment folders and temporaries are gone"


def test_a_png_sequence_replaces_an_earlier_one_and_refuses_a_folder_of_other_files_before_any_work(
        long_clip, tmp_path):
    out = tmp_path / "frames"
    out.mkdir()
    (out / "frame_00500.png").write_bytes(b"old")
    assert cli(long_clip, "-o", out, "--smoothing", "0")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [f"frame_{i:05d}.png" for i in range(1, 121)]
    (out / "notes.txt").write_text("mine")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc, _ = cli(long_clip, "-o", out)
    assert rc == 2 and "folder holds other files (notes.txt" in err.getvalue()
    assert len(list(out.iterdir())) == 121 and hidden(tmp_path) == []


def test_one_worker_takes_a_long_file_whole_as_segments_would_only_add_run_ins_and_a_join(long_clip, tmp_path):
    from types import SimpleNamespace

    from rmbg_stream.cluster import _plan

    args = SimpleNamespace(mask=False, smoothing=0.5, decontaminate=False, codec=None, crf=None, segment_seconds=1)
    pairs = [(long_clip, tmp_path / "out.mp4")]
    backgrounds = {tmp_path / "out.mp4": "#00ff00"}
    assert [len(r.jobs) for r in _plan(args, pairs, backgrounds, "t", 1)] == [1]
    assert [len(r.jobs) for r in _plan(args, pairs, backgrounds, "t", 2)] == [4]


def test_a_workers_decoder_and_encoder_threads_follow_its_share_of_a_big_node_not_the_node(monkeypatch):
    from rmbg_stream import tuning
    from rmbg_stream.media.reader import io_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert io_threads() == 32, "one process owns the node"
    tuning.limit_cores(4)  # what Worker does with --cluster-cpus 4
    try:
        assert tuning.cores() == 4 and io_threads() == 2
    finally:
        tuning.limit_cores(None)
    assert io_threads() == 32
