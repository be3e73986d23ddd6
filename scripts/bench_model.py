#!/usr/bin/env python
"""Network-only speed of BiRefNet (random weights): latency, fps and peak memory as one JSON object.

    python scripts/bench_model.py --backbone swin_v1_l --size 1024 --batch 1 --precision fp16 --device cuda
    python scripts/bench_model.py --backbone swin_v1_t --resolution 1024x576 1024x1024 --device cpu --iters 3
    python scripts/bench_model.py --backbone swin_v1_t --size 512 --device cpu --compare --iters 3
    python scripts/bench_model.py --model selfie --batch 4 --compare eager compile onnx litert

Several `--resolution` sizes (W x H) are timed in one run, one iteration of each in turn, so a machine
whose speed drifts (other processes, clocks) weighs on every size alike; `ratio_to_last` compares each
size's median latency with the last size's.

`--runtime R` (eager, compile, onnx; engine/runtimes.py) times one runtime; `--compare` times several
(default: all three, plus `eager_cl`, eager in channels_last) against each other, alternating batch by
batch, on the same weights (random, seeded: every runtime builds the same network) and the same inputs. Each
runtime runs in its own worker process, so `peak_rss_mb` is that process's RSS high-water mark
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`: it includes compiling, for `compile`), and on CUDA
`peak_memory_mb` is `torch.cuda.max_memory_allocated`. The ONNX graph is exported in a process of its own
first: `export_s` and `export_peak_rss_mb` are that process's. `setup_s` is the time from building the
backend to the end of the first batch of every size (compile: the compilation itself).

`--model selfie|selfie-landscape` times MediaPipe's selfie segmenter (trained weights, from the shipped .tflite) at
its own size instead of BiRefNet; its runtimes include `litert`: the original .tflite under ai-edge-litert's
interpreter (the test extra), given the same frames as NHWC arrays, with as many threads as torch. Its input has
batch 1, so a batch of N is N calls, as an application using it would make; the NCHW -> NHWC copy is timed with
it. `ratio_to_litert` then compares every runtime's latency with litert's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rmbg_stream.device import pick_device, pick_dtype
from rmbg_stream.engine.setup import parse_resolution
from rmbg_stream.models import BACKBONES, BiRefNet

RUNTIMES = ("eager", "compile", "onnx", "eager_cl", "litert")
SEED = 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
    return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def network(cfg: dict) -> torch.nn.Module:
    if cfg.get("model"):
        from rmbg_stream.models.selfie import load_selfie

        return load_selfie(cfg["model"])[0]
    torch.manual_seed(SEED)  # the same random weights in every process
    return BiRefNet(cfg["backbone"]).eval()


class Litert:
    """The .tflite file under ai-edge-litert's interpreter, called like a backend: (B,3,h,w) 0..1 -> (B,1,h,w)."""

    def __init__(self, model: str):
        from ai_edge_litert.interpreter import Interpreter

        from rmbg_stream.models.selfie import SELFIE_MODELS

        self.it = Interpreter(model_path=str(SELFIE_MODELS[model].path), num_threads=torch.get_num_threads())
        self.it.allocate_tensors()
        self.inp, self.out = self.it.get_input_details()[0]["index"], self.it.get_output_details()[0]["index"]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.permute(0, 2, 3, 1).contiguous().numpy()
        masks = []
        for frame in frames:
            self.it.set_tensor(self.inp, frame[None])
            self.it.invoke()
            masks.append(torch.from_numpy(self.it.get_tensor(self.out)[..., 0].copy()))
        return torch.stack(masks)


def make_backend(runtime: str, cfg: dict, onnx_path: str | None):
    """The backend of `runtime` for the benchmark's network (cfg: backbone, sizes, device, precision)."""
    from rmbg_stream.engine.backends import NetworkBackend
    from rmbg_stream.engine.runtimes import OnnxBackend

    device = torch.device(cfg["device"])
    if runtime == "onnx":
        return OnnxBackend(onnx_path, device)
    if runtime == "litert":
        return Litert(cfg["model"])
    dtype = pick_dtype(cfg["precision"], device)
    extra = {}
    if cfg.get("model"):
        from rmbg_stream.models.selfie import load_selfie

        extra = {"name": cfg["model"], "io": load_selfie(cfg["model"])[1].io, "multiple": 16}
    backend = NetworkBackend(network(cfg), cfg["sizes"][0], device, dtype,
                             runtime="eager" if runtime == "eager_cl" else runtime, **extra)
    if runtime == "eager_cl":
        backend.model.to(memory_format=torch.channels_last)
    return backend


def inputs(cfg: dict, channels_last: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 1)
    xs = [torch.rand(cfg["batch"], 3, h, w, generator=g).to(cfg["device"]) for h, w in cfg["sizes"]]
    return [x.contiguous(memory_format=torch.channels_last) for x in xs] if channels_last else xs


def worker(conn, runtime: str, cfg: dict, onnx_path: str | None) -> None:
    """Builds one runtime, then times one batch per size on each "run" message; "stop" returns its peak memory."""
    device = torch.device(cfg["device"])
    t0 = time.perf_counter()
    backend = make_backend(runtime, cfg, onnx_path)
    xs = inputs(cfg, runtime == "eager_cl")
    for x in xs:
        backend(x)
    sync(device)
    conn.send({"setup_s": round(time.perf_counter() - t0, 2)})
    for _ in range(cfg["warmup"] - 1):
        for x in xs:
            backend(x)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    conn.send("ready")
    while conn.recv() == "run":
        times = []
        for x in xs:
            t = time.perf_counter()
            backend(x)
            sync(device)
            times.append(time.perf_counter() - t)
        conn.send(times)
    conn.send(peak(device))


def export_worker(conn, cfg: dict, path: str) -> None:
    from rmbg_stream.export import export_network

    h, w = cfg["sizes"][0]
    meta = {"source": "bench"}
    if cfg.get("model"):
        from rmbg_stream.models.selfie import load_selfie

        io = load_selfie(cfg["model"])[1].io
        meta |= {"network": "selfie", "input_range": io.input_range, "output": io.output}
    result = export_network(network(cfg), Path(path), (h, w), None, meta)
    conn.send({"export_s": round(result.seconds, 2), "deform_conv_nodes": result.deform_nodes,
               "export_peak_rss_mb": peak(torch.device("cpu"))["peak_rss_mb"]})


def run_export(ctx, cfg: dict, path: str) -> dict:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=export_worker, args=(child, cfg, path))
    proc.start()
    info = parent.recv()
    proc.join()
    return info


def compare(runtimes: list[str], cfg: dict) -> dict[str, dict]:
    """Per runtime: setup, export (onnx), per-size median latency and fps, peak memory; runs alternate."""
    ctx = mp.get_context("spawn")
    results: dict[str, dict] = {r: {} for r in runtimes}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = os.path.join(tmp, "net.onnx")
        if "onnx" in runtimes:
            if len(cfg["sizes"]) > 1:
                raise SystemExit("error: --runtime onnx times one --resolution at a time (the graph's size is fixed)")
            results["onnx"].update(run_export(ctx, cfg, onnx_path))
        procs = {}
        for r in runtimes:  # one at a time: setups (compiling, exporting) do not overlap each other's timing
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(child, r, cfg, onnx_path))
            proc.start()
            results[r].update(parent.recv())
            assert parent.recv() == "ready"
            procs[r] = (proc, parent)
        times = {r: [[] for _ in cfg["sizes"]] for r in runtimes}
        for _ in range(cfg["iters"]):
            for r, (_, conn) in procs.items():
                conn.send("run")
                for row, t in zip(times[r], conn.recv()):
                    row.append(t)
        for r, (proc, conn) in procs.items():
            conn.send("stop")
            results[r].update(conn.recv())
            proc.join()
    for r in runtimes:
        results[r]["sizes"] = summarise(cfg, [statistics.median(t) for t in times[r]])
    return results


def summarise(cfg: dict, per_batch: list[float]) -> list[dict]:
    return [{
        "resolution": f"{w}x{h}",
        "latency_ms_per_batch": round(t * 1e3, 2),
        "latency_ms_per_frame": round(t * 1e3 / cfg["batch"], 2),
        "fps": round(cfg["batch"] / t, 3),
        "ratio_to_last": round(t / per_batch[-1], 3),
    } for (h, w), t in zip(cfg["sizes"], per_batch)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="swin_v1_l", choices=BACKBONES)
    ap.add_argument("--model", default=None, choices=["selfie", "selfie-landscape"],
                    help="time this trained network at its own size instead of BiRefNet (random weights)")
    ap.add_argument("--size", type=int, default=1024, help="square input side (when --resolution is not given)")
    ap.add_argument("--resolution", nargs="+", default=None, metavar="N|WxH",
                    help="one or more input sizes, multiples of 32, timed alternately in one run")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--runtime", default="eager", choices=RUNTIMES, help="the runtime timed (default: %(default)s)")
    ap.add_argument("--compare", nargs="*", default=None, choices=RUNTIMES, metavar="RUNTIME",
                    help="time these runtimes against each other, alternating (default with no names: all)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()

    try:
        sizes = [parse_resolution(r) for r in args.resolution or [args.size]]
    except ValueError as exc:
        ap.error(str(exc))
    if args.model:
        from rmbg_stream.models.selfie import load_selfie

        if args.resolution:
            ap.error(f"{args.model} runs at its own size: leave out --resolution")
        sizes = [load_selfie(args.model)[1].resolution]
    device = pick_device(args.device)
    dtype = pick_dtype(args.precision, device)
    runtimes = [args.runtime] if args.compare is None else (args.compare or list(RUNTIMES))
    if not args.model:
        if "litert" in runtimes:
            ap.error("litert runs the selfie network's .tflite: add --model selfie")
        runtimes = [r for r in runtimes if r != "litert"] or runtimes
    if "onnx" in runtimes and dtype != torch.float32:
        ap.error("--runtime onnx runs the fp32 graph: add --precision fp32")
    cfg = {"backbone": args.backbone, "model": args.model, "sizes": sizes, "batch": args.batch, "device": str(device),
           "precision": args.precision, "warmup": max(1, args.warmup), "iters": args.iters}
    results = compare(runtimes, cfg)
    result = {
        "network": args.model or args.backbone,
        "batch": args.batch,
        "precision": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "iters": args.iters,
    }
    if args.compare is None:
        one = results[args.runtime]
        sizes_out = one.pop("sizes")
        result.update({"runtime": args.runtime, **one})
        result.update(sizes_out[0] if len(sizes_out) == 1 else {"sizes": sizes_out})
    else:
        result["runtimes"] = results
        if "eager" in results:
            base = results["eager"]["sizes"]
            result["fps_ratio_to_eager"] = {r: [round(s["fps"] / b["fps"], 3) for s, b in zip(v["sizes"], base)]
                                            for r, v in results.items()}
        if "litert" in results:
            base = results["litert"]["sizes"]
            result["ratio_to_litert"] = {r: [round(s["latency_ms_per_batch"] / b["latency_ms_per_batch"], 3)
                                             for s, b in zip(v["sizes"], base)] for r, v in results.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
