#!/usr/bin/env python
"""Network-only vs whole-engine throughput for one model, size and batch, plus live latency; one JSON object.

    python scripts/bench_engine.py --backbone swin_v1_t --size 256 --batch 2 --device cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time

import numpy as np
import torch

from rmbg_stream.device import pick_device, pick_dtype
from rmbg_stream.engine.backends import NetworkBackend
from rmbg_stream.engine.engine import Engine, StreamOptions
from rmbg_stream.models import BACKBONES, BiRefNet


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_frames(n: int, h: int, w: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return [np.roll(base, 4 * i, axis=1) for i in range(n)]


def model_fps(backend, args, device) -> float:
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    iters = max(1, args.frames // args.batch)
    t0 = time.perf_counter()
    for _ in range(iters):
        backend(x)
    sync(device)
    return iters * args.batch / (time.perf_counter() - t0)


def engine_fps(engine, frames, options) -> float:
    stream = engine.open_stream(live=False, options=options)
    got = []

    def consume():
        while (r := stream.get()) is not None:
            got.append(r)

    t = threading.Thread(target=consume)
    t0 = time.perf_counter()
    t.start()
    for i, f in enumerate(frames):
        stream.submit(f, pts=i)
    stream.end()
    t.join()
    elapsed = time.perf_counter() - t0
    stream.close()
    assert [r.pts for r in got] == list(range(len(frames))), "file stream lost or reordered frames"
    return len(frames) / elapsed


def live_latency(engine, frames, options, fps: float) -> tuple[list[float], int]:
    lat = []
    stream = engine.open_stream(live=True, options=options, on_result=lambda r: lat.append(r.latency))
    period = 1 / fps
    t0 = time.perf_counter()
    for i, f in enumerate(frames):
        time.sleep(max(0.0, t0 + i * period - time.perf_counter()))
        stream.submit(f, pts=i)
    deadline = time.perf_counter() + 30
    while stream.delivered + stream.dropped < len(frames) and time.perf_counter() < deadline:
        time.sleep(0.01)
    dropped = stream.dropped
    stream.close()
    return lat, dropped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="swin_v1_l", choices=BACKBONES)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--frames", type=int, default=None, help="frames per measurement (default 16 CPU, 200 CUDA)")
    ap.add_argument("--frame-size", default="1280x720", help="WxH of the frames fed to the engine")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating model/engine measurements")
    args = ap.parse_args()

    device = pick_device(args.device)
    args.frames = args.frames or (200 if device.type == "cuda" else 8)
    w, h = map(int, args.frame_size.lower().split("x"))
    backend = NetworkBackend(BiRefNet(args.backbone), (args.size, args.size), device,
                              pick_dtype(args.precision, device))
    frames = synthetic_frames(args.frames, h, w)
    options = StreamOptions(background=StreamOptions().background, smoothing=0.5)

    # Alternating rounds, medians: drift in what else the machine is doing hits both sides alike.
    m_runs, e_runs = [], []
    with Engine(backend, max_batch=args.batch) as engine:
        engine_fps(engine, frames[: args.warmup * args.batch], options)  # warms the network and the engine
        for _ in range(args.rounds):
            m_runs.append(model_fps(backend, args, device))
            e_runs.append(engine_fps(engine, frames, options))
    m_fps, e_fps = statistics.median(m_runs), statistics.median(e_runs)
    # Live: one stream at 90 % of what the engine sustains, so latency is the pipeline's, not a queue's.
    with Engine(backend, max_batch=args.batch) as engine:
        lat, dropped = live_latency(engine, frames, options, 0.9 * e_fps)
    lat_ms = sorted(x * 1e3 for x in lat)
    result = {
        "backbone": args.backbone, "size": args.size, "batch": args.batch,
        "precision": str(backend.dtype).removeprefix("torch."), "frame_size": f"{w}x{h}", "frames": args.frames,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "model_fps": round(m_fps, 3),
        "model_fps_runs": [round(x, 3) for x in m_runs],
        "engine_fps_runs": [round(x, 3) for x in e_runs],
        "engine_fps": round(e_fps, 3),
        "ratio": round(e_fps / m_fps, 3),
        "latency_ms_p50": round(statistics.median(lat_ms), 1) if lat_ms else None,
        "latency_ms_p95": round(lat_ms[min(len(lat_ms) - 1, int(0.95 * len(lat_ms)))], 1) if lat_ms else None,
        "live_frames_delivered": len(lat_ms),
        "live_frames_dropped": dropped,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
