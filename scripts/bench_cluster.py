"""`transcode --cluster` against one process: the same folder of clips and one long clip, three ways.

    python scripts/bench_cluster.py [--size 640x360] [--clips 3] [--frames 300] [--long-frames 2400]

Runs single process, `--cluster` with 1 worker (2 CPUs) and with 2 workers (1 CPU each) on a local Ray
instance with 2 CPUs, `--model chroma`, smoothing 0.5, and prints one JSON object with two figures for each:

- `fps`: all frames over the command's wall time, everything included (the workers' start: a process, torch and
  the model, about 2-4 s on two cores). Ray's own start is timed apart, once (`ray_start_s`).
- `steady_fps`: all frames over the wall time less the start-up: for the cluster the command's `startup_s` (until
  the first worker had its model loaded), for one process the time outside its files (engine start, probes).
  This is Ray's per-frame overhead, what a long batch job sees.

Imports both sides share (torch, torchvision) are loaded before the first run, so neither pays them alone; the
load average (`uptime`'s 1-minute figure) before each run is reported, as the cores may be shared. Clips are
generated with PyAV (green screen, moving box, keyframe every second); the long clip is cut into --segment-seconds
segments when there are two workers (one worker takes it whole).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import av

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rmbg_stream.models  # noqa: E402,F401  (torchvision: imported by every run's command line, see above)
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


def timed(argv: list[str]) -> tuple[float, dict]:
    """(wall seconds, the command's --json report)."""
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        rc = main([*argv, "--json"])
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(argv)}")
    return time.perf_counter() - t0, json.loads(out.getvalue().strip().splitlines()[-1])


def figures(frames: int, wall: float, report: dict) -> dict:
    """fps everything included, and without the start-up (see the module docstring)."""
    startup = report.get("startup_s")
    if startup is None:  # one process: the time outside its files
        startup = wall - sum(f["seconds"] for f in report["files"])
    return {"fps": round(frames / wall, 2), "steady_fps": round(frames / (wall - startup), 2),
            "wall_s": round(wall, 2), "startup_s": round(startup, 2), "load_after": round(os.getloadavg()[0], 2)}


def main_bench() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--clips", type=int, default=3)
    # A batch job's sizes: 10 s clips and an 80 s one in four 20 s segments (about 15 s a run on two cores).
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--long-frames", type=int, default=2400)
    ap.add_argument("--segment-seconds", type=float, default=20.0)
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
        results = {}
        for name, argv in runs.items():
            load = round(os.getloadavg()[0], 2)
            results[name] = figures(total, *timed(argv)) | {"load_before": load}
        ray.shutdown()
    one = results["single"]

    def ratio(name: str, key: str) -> float:
        return round(results[name][key] / one[key], 3)

    print(json.dumps({"size": a.size, "frames": total, "files": a.clips + 1, "ray_start_s": round(ray_start, 2),
                      "runs": results, "ratio_1_worker": ratio("cluster_1_worker", "fps"),
                      "ratio_2_workers": ratio("cluster_2_workers", "fps"),
                      "steady_ratio_1_worker": ratio("cluster_1_worker", "steady_fps"),
                      "steady_ratio_2_workers": ratio("cluster_2_workers", "steady_fps")}))


if __name__ == "__main__":
    main_bench()
