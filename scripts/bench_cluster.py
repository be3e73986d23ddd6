"""`transcode --cluster` against one process: the same folder of clips and one long clip, three ways.

    python scripts/bench_cluster.py [--size 640x360] [--clips 3] [--frames 120] [--long-frames 600]

Runs single process, `--cluster` with 1 worker (2 CPUs) and with 2 workers (1 CPU each) on a local Ray
instance with 2 CPUs, `--model chroma`, smoothing 0.5, and prints one JSON object: frames per second for each
(all frames over the command's wall time, actor start and model load included; Ray's own start is timed apart,
once) and the ratios to single process. Clips are generated with PyAV (green screen, moving box, keyframe every
second); the long clip is cut into --segment-seconds segments.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import av

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rmbg_stream.cli import main  # noqa: E402
from tests.test_media import scene  # noqa: E402


def make(path: Path, frames: int, w: int, h: int, rate: int = 30) -> None:
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=rate)
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        v.codec_context.gop_size = rate
        v.options = {"crf": "18", "preset": "veryfast"}
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(scene(i, w, h)[0], format="rgb24").reformat(format="yuv420p")
            f.pts = i
            c.mux(v.encode(f))
        c.mux(v.encode(None))


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(argv)}")
    return time.perf_counter() - t0


def main_bench() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--clips", type=int, default=3)
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--long-frames", type=int, default=600)
    ap.add_argument("--segment-seconds", type=float, default=5.0)
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for i in range(a.clips):
            make(src / f"clip{i}.mp4", a.frames, w, h)
        make(src / "long.mp4", a.long_frames, w, h)
        total = a.clips * a.frames + a.long_frames
        base = ["transcode", str(src), "--model", "chroma", "--quiet", "--smoothing", "0.5",
                "--segment-seconds", str(a.segment_seconds)]
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        ray_start = time.perf_counter() - t0
        cluster = ["--cluster", "--cluster-workers"]
        runs = {
            "single": base + ["-o", f"{tmp}/single"],
            "cluster_1_worker": base + ["-o", f"{tmp}/c1", *cluster, "1", "--cluster-cpus", "2"],
            "cluster_2_workers": base + ["-o", f"{tmp}/c2", *cluster, "2", "--cluster-cpus", "1"],
        }
        fps = {name: round(total / timed(argv), 2) for name, argv in runs.items()}
        ray.shutdown()
    print(json.dumps({"size": a.size, "frames": total, "files": a.clips + 1, "ray_start_s": round(ray_start, 2),
                      "fps": fps, "ratio_1_worker": round(fps["cluster_1_worker"] / fps["single"], 3),
                      "ratio_2_workers": round(fps["cluster_2_workers"] / fps["single"], 3)}))


if __name__ == "__main__":
    main_bench()
