#!/usr/bin/env python
"""Network-only speed of BiRefNet (random weights): latency, fps and peak memory as one JSON object.

    python scripts/bench_model.py --backbone swin_v1_l --size 1024 --batch 1 --precision fp16 --device cuda
    python scripts/bench_model.py --backbone swin_v1_t --resolution 1024x576 1024x1024 --device cpu --iters 3

Several `--resolution` sizes (W x H) are timed in one run, one iteration of each in turn, so a machine
whose speed drifts (other processes, clocks) weighs on every size alike; `ratio_to_last` compares each
size's median latency with the last size's.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import torch

from rmbg_stream.device import pick_device, pick_dtype
from rmbg_stream.engine.backends import BiRefNetBackend
from rmbg_stream.engine.setup import parse_resolution
from rmbg_stream.models import BACKBONES, BiRefNet


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sizes(backend: BiRefNetBackend, inputs: list[torch.Tensor], warmup: int, iters: int) -> list[list[float]]:
    """Seconds per batch for each input, the inputs taking turns."""
    for _ in range(warmup):
        for x in inputs:
            backend(x)
    sync(backend.device)
    if backend.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(backend.device)
    times: list[list[float]] = [[] for _ in inputs]
    for _ in range(iters):
        for x, row in zip(inputs, times):
            t0 = time.perf_counter()
            backend(x)
            sync(backend.device)
            row.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="swin_v1_l", choices=BACKBONES)
    ap.add_argument("--size", type=int, default=1024, help="square input side (when --resolution is not given)")
    ap.add_argument("--resolution", nargs="+", default=None, metavar="N|WxH",
                    help="one or more input sizes, multiples of 32, timed alternately in one run")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()

    try:
        sizes = [parse_resolution(r) for r in args.resolution or [args.size]]
    except ValueError as exc:
        ap.error(str(exc))
    device = pick_device(args.device)
    dtype = pick_dtype(args.precision, device)
    backend = BiRefNetBackend(BiRefNet(args.backbone), sizes[0], device, dtype)
    inputs = [torch.rand(args.batch, 3, h, w, device=device) for h, w in sizes]
    times = time_sizes(backend, inputs, args.warmup, args.iters)
    per_batch = [statistics.median(t) for t in times]
    runs = [{
        "resolution": f"{w}x{h}",
        "latency_ms_per_batch": round(t * 1e3, 2),
        "latency_ms_per_frame": round(t * 1e3 / args.batch, 2),
        "fps": round(args.batch / t, 2),
        "ratio_to_last": round(t / per_batch[-1], 3),
    } for (h, w), t in zip(sizes, per_batch)]
    result = {
        "backbone": args.backbone,
        "batch": args.batch,
        "precision": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "iters": args.iters,
        **(runs[0] if len(runs) == 1 else {"sizes": runs}),
    }
    if device.type == "cuda":
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
