#!/usr/bin/env python
"""Network-only speed of BiRefNet (random weights): latency, fps and peak memory as one JSON object.

    python scripts/bench_model.py --backbone swin_v1_l --size 1024 --batch 1 --precision fp16 --device cuda
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
from rmbg_stream.models import BACKBONES, BiRefNet


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="swin_v1_l", choices=BACKBONES)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()

    device = pick_device(args.device)
    dtype = pick_dtype(args.precision, device)
    backend = BiRefNetBackend(BiRefNet(args.backbone), (args.size, args.size), device, dtype)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    for _ in range(args.warmup):
        backend(x)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        backend(x)
        sync(device)
        times.append(time.perf_counter() - t0)
    per_batch = statistics.median(times)
    result = {
        "backbone": args.backbone,
        "size": args.size,
        "batch": args.batch,
        "precision": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "latency_ms_per_batch": round(per_batch * 1e3, 2),
        "latency_ms_per_frame": round(per_batch * 1e3 / args.batch, 2),
        "fps": round(args.batch / per_batch, 2),
        "iters": args.iters,
    }
    if device.type == "cuda":
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
