#!/usr/bin/env python
"""Per-stage timings of the engine's path on the CPU, one JSON object: where a frame's milliseconds go.

    python scripts/bench_stages.py --sizes 640x480,1280x720,641x479 --threads 1,2
    python scripts/bench_stages.py --compare /tmp/old      # the same stages of another checkout, side by side

Each stage is the engine's own call (engine.to_float, preprocess.resize, smoothing.smooth_streams,
composite.guided_upsample, render.render_rgb / render_yuv, yuv.to_planes / yuv_to_rgb), in the order `Engine`
runs them on one frame (batch 1), timed with a wall clock per call; the figure is the median over --iters frames
after --warmup. RGB frames take the rgb24 path (files, image, WebSocket), 4:2:0 ones the yuv420p path (WebRTC,
transcode of 4:2:0 files; even sizes only, as the engine requires). Render stages include the conversion to the
uint8 output (RGB(A) or packed I420) that is downloaded.

The network is `load_backend("selfie", "cpu")` when that model exists, else a stand-in with the same contract
(256x256 RGB in, alpha (B,1,256,256) out, guided=True): a few convolutions whose cost is not the point here.

`--compare DIR` runs this script in subprocesses alternately against DIR's `rmbg_stream` (e.g. a
`git worktree add /tmp/old HEAD~3`) and this checkout's, --rounds times each, and reports both with the ratio
new / old per stage (medians over the rounds): on a shared machine only ratios measured side by side mean much.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT.parent / "shared" / "media" / "chaplin.mp4"
KINDS = ("blur", "color", "image", "transparent")  # background kinds rendered, one stage each
NET = (256, 256)
CLOCKS = ("wall", "cpu", "faults")


class StandIn(torch.nn.Module):
    """The backend contract at 256x256 without the selfie model: three small convolutions and a sigmoid."""

    name, resolution, guided = "stand-in", NET, True

    def __init__(self):
        super().__init__()
        self.device, self.dtype = torch.device("cpu"), torch.float32
        gen = torch.Generator().manual_seed(0)
        self.weights = [torch.randn(8, 3, 3, 3, generator=gen) * 0.3, torch.randn(8, 8, 3, 3, generator=gen) * 0.2,
                        torch.randn(1, 8, 3, 3, generator=gen) * 0.2]

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        return NET

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.conv2d(x - 0.5, self.weights[0], stride=2, padding=1).relu_()
        x = torch.nn.functional.conv2d(x, self.weights[1], padding=1).relu_()
        x = torch.nn.functional.conv2d(x, self.weights[2], padding=1)
        return torch.nn.functional.interpolate(x, size=NET, mode="bilinear").mul_(4).sigmoid_()


def make_backend(kind: str):
    """`kind` "auto": the selfie network where this checkout has it, else the stand-in; "standin": the stand-in."""
    import importlib.util

    if kind == "auto" and importlib.util.find_spec("rmbg_stream.models.selfie") is not None:
        from rmbg_stream.engine.setup import load_backend

        return load_backend("selfie", "cpu")
    return StandIn()


def source_frames(h: int, w: int, n: int = 2) -> list[np.ndarray]:
    """`n` consecutive RGB uint8 frames at h x w: chaplin.mp4's (people, real edges) when present, else noise."""
    import cv2

    if MEDIA.exists():
        import av

        with av.open(str(MEDIA)) as c:
            frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(30 + n), c.decode(video=0))][-n:]
        return [np.ascontiguousarray(cv2.resize(f, (w, h), interpolation=cv2.INTER_LINEAR)) for f in frames]
    rng = np.random.default_rng(0)
    base = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 3)
    return [np.roll(base, 4 * i, axis=1) for i in range(n)]


def i420(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BT.601 limited-range (Y, U, V) uint8 planes of an even-sized RGB frame."""
    from rmbg_stream.engine.yuv import YUVSpec, rgb_to_yuv

    t = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    y, uv = rgb_to_yuv(t, YUVSpec())
    y, uv = (p.mul(255).round().clamp(0, 255).to(torch.uint8).numpy() for p in (y, uv))
    return y[0, 0], uv[0, 0], uv[0, 1]


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Clock:
    """Per named stage: wall-clock ms, the process's CPU ms (all threads; on a shared machine it counts less of
    the time spent waiting for a core) and minor page faults (fresh memory the kernel maps in: a few us each)."""

    def __init__(self):
        self.ms: dict[str, list[tuple[float, float, int]]] = {}
        self.on = False

    def __call__(self, name: str, fn, *args):
        f0, c0, t0 = _faults(), time.process_time(), time.perf_counter()
        out = fn(*args)
        if self.on:
            wall, cpu = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
            self.ms.setdefault(name, []).append((wall, cpu, _faults() - f0))
        return out

    def medians(self) -> dict[str, dict[str, float]]:
        return {k: {clock: round(statistics.median(r[i] for r in v), 3) for i, clock in enumerate(CLOCKS)}
                for k, v in self.ms.items()}


def options(kind: str):
    from rmbg_stream.engine.background import Background
    from rmbg_stream.engine.streams import StreamOptions

    bg = {"blur": Background("blur", strength=0.5), "color": Background("color", color=(0, 255, 0)),
          "image": Background("image", path="bench.png"), "transparent": Background("transparent")}[kind]
    return StreamOptions(background=bg, smoothing=0.5)


def rgb_frame(clock: Clock, ctx: dict, host: np.ndarray) -> None:
    from rmbg_stream.engine import composite, render
    from rmbg_stream.engine.engine import to_float
    from rmbg_stream.engine.preprocess import resize
    from rmbg_stream.engine.smoothing import smooth_streams

    up = ctx["uploader"]
    frame = clock("upload", lambda: to_float(up.upload([host])[0]))
    small = clock("resize", resize, frame, NET)
    alpha = clock("network", ctx["backend"], small)
    a = clock("smoothing", smooth_streams, [ctx["smoother"]], alpha, small, [0.5])
    a_full = clock("guided", composite.guided_upsample, a, frame, 2, ctx["eps"])
    for kind in KINDS:
        bg = ctx["bg_rgb"] if kind == "image" else None
        clock(f"render_{kind}", render.render_rgb, frame, a_full, options(kind), bg)


def yuv_frame(clock: Clock, ctx: dict, planes) -> None:
    from rmbg_stream.engine import composite, render
    from rmbg_stream.engine.filters import half
    from rmbg_stream.engine.smoothing import smooth_streams
    from rmbg_stream.engine.yuv import to_planes, yuv_to_rgb

    spec = ctx["spec"]
    dev = ctx["uploader"].upload(list(planes))
    y, uv = clock("yuv_upload", to_planes, [tuple(dev)])
    small = clock("yuv_resize", yuv_to_rgb, y, uv, spec, NET)
    alpha = clock("yuv_network", ctx["backend"], small)
    a = clock("yuv_smoothing", smooth_streams, [ctx["smoother_yuv"]], alpha, small, [0.5])
    a_full = clock("yuv_guided", composite.guided_upsample, a, y, 2, ctx["eps"])
    a_half = clock("yuv_half_alpha", half, a_full)
    for kind in KINDS:
        bg = ctx["bg_yuv"] if kind == "image" else None
        clock(f"yuv_render_{kind}", render.render_yuv, y, uv, a_full, a_half, options(kind), spec, bg)


def bench_size(h: int, w: int, threads: int, iters: int, warmup: int, backend) -> dict:
    from rmbg_stream.engine.composite import prepare_background
    from rmbg_stream.engine.smoothing import TemporalSmoother
    from rmbg_stream.engine.transfer import Uploader
    from rmbg_stream.engine.yuv import YUVSpec, rgb_to_yuv

    torch.set_num_threads(threads)
    hosts = source_frames(h, w)
    bg_img = np.ascontiguousarray(source_frames(h + 40, w + 60, 1)[0][::-1])
    bg_rgb = prepare_background(bg_img, h, w)
    even = h % 2 == 0 and w % 2 == 0
    ctx = {"backend": backend, "uploader": Uploader(torch.device("cpu")), "smoother": TemporalSmoother(),
           "smoother_yuv": TemporalSmoother(), "eps": 1e-4, "spec": YUVSpec(), "bg_rgb": bg_rgb,
           "bg_yuv": rgb_to_yuv(bg_rgb, YUVSpec()) if even else None}
    yuv = [i420(f) for f in hosts] if even else []
    clock = Clock()
    with torch.inference_mode():
        for i in range(warmup + iters):
            clock.on = i >= warmup
            rgb_frame(clock, ctx, hosts[i % len(hosts)])
            if yuv:
                yuv_frame(clock, ctx, yuv[i % len(yuv)])
    return clock.medians()


def steady_malloc() -> None:
    """Frees a 24 MB block, as a process that has handled a large frame has: glibc then serves blocks below that
    from its heap (mmap threshold 24 MB, trim threshold 48 MB) and the stages are timed without page faults."""
    block = torch.empty(24 << 20, dtype=torch.uint8)
    block.fill_(0)
    del block


def measure(args) -> dict:
    """In this process: every size and thread count of `args`."""
    if args.malloc == "steady":
        steady_malloc()
    backend = make_backend(args.backend)
    out = {}
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.lower().split("x"))
        for t in (int(v) for v in args.threads.split(",")):
            out[f"{w}x{h}/t{t}"] = bench_size(h, w, t, args.iters, args.warmup, backend)
    return {"backend": getattr(backend, "name", type(backend).__name__), "results": out}


def child(root: Path, args, size: str, backend: str) -> dict:
    """`measure` for one size in a fresh process importing `root`'s rmbg_stream."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--sizes", size, "--threads", args.threads,
           "--iters", str(args.iters), "--warmup", str(args.warmup), "--backend", backend, "--malloc", args.malloc]
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def run(args) -> dict:
    """Each size in its own process: glibc's mmap threshold follows the largest blocks a process has freed, so an
    earlier, larger size would spare a later one its page faults (a live server sees one size)."""
    results, backend = {}, None
    for size in args.sizes.split(","):
        got = child(ROOT, args, size, args.backend)
        results.update(got["results"])
        backend = got["backend"]
    return {"backend": backend, "results": results}


def compare(args) -> dict:
    """Alternate old / new processes, size by size; per stage and clock the median over rounds of each, and
    new / old. Both run the stand-in network unless --backend says otherwise (the old checkout may lack selfie)."""
    roots = {"old": Path(args.compare).resolve(), "new": ROOT}
    backend = "standin" if args.backend == "auto" else args.backend
    rounds: dict[str, list[dict]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for name, root in roots.items():
            merged = {}
            for size in args.sizes.split(","):
                merged.update(child(root, args, size, backend)["results"])
            rounds[name].append(merged)
    table = {}
    for key, stages in rounds["new"][0].items():
        table[key] = {}
        for stage in stages:
            row = {}
            for clock in CLOCKS:
                old = statistics.median(r[key][stage][clock] for r in rounds["old"] if stage in r[key])
                new = statistics.median(r[key][stage][clock] for r in rounds["new"])
                row[clock] = {"old": round(old, 3), "new": round(new, 3), "ratio": round(new / max(old, 1e-6), 3)}
            table[key][stage] = row
    return {"compare": {"old": str(roots["old"]), "new": str(ROOT), "rounds": args.rounds, "backend": backend},
            "results": table}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="640x480,1280x720,641x479", help="W x H, comma-separated")
    p.add_argument("--threads", default="1,2", help="torch.set_num_threads values, comma-separated")
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compare", help="another checkout's root: time both, alternating")
    p.add_argument("--rounds", type=int, default=3, help="with --compare: rounds per checkout")
    p.add_argument("--backend", choices=("auto", "standin"), default="auto",
                   help="auto: the selfie network when present (--compare: the stand-in for both)")
    p.add_argument("--malloc", choices=("steady", "fresh"), default="steady",
                   help="steady: glibc's mmap threshold raised first (no page faults); fresh: as a new process")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    report = compare(args) if args.compare else run(args)
    report["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                         "torch": torch.__version__, "note": "shared 2-core VM: compare ratios, not ms"}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
