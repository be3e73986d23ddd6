#!/usr/bin/env python
"""Live server under load: N synthetic WebRTC cameras at 30 fps against `rmbg-stream serve` on 127.0.0.1.

    python scripts/bench_live.py --sessions 4 --seconds 20 --model chroma --size 640x480
    python scripts/bench_live.py --model selfie --sessions 1      # real footage (chaplin.mp4), blurred background

The server runs as a subprocess (its memory and CPU time are its own); the clients run here, in one process. Each
client sends a green-screen clip (chroma) or real footage with people in it (any other model: a person segmenter
calls all of a green screen background; `--source`) whose frames carry their number as blocks, reads the number back off
every processed frame it receives and so measures the latency the server path adds to each frame: from the moment
the frame leaves the camera to the moment it is decoded back at the client (client encode, server decode, engine,
server encode, client decode, all included). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import liveclients as lc
from liveclients import RtcClient as Client

from rmbg_stream.server.aiortc_patches import keep_media_on_loopback


def source_name(args) -> str:
    """--source, else the synthetic green screen for a chroma keyer and real footage for a network."""
    return args.source or ("synthetic" if args.model.startswith("chroma") else str(lc.CHAPLIN))


def source_of(args, width: int, height: int) -> lc.Footage | None:
    """The clients' picture: None for the synthetic green screen, else the footage (decoded once, for all)."""
    if source_name(args) == "synthetic":
        return None
    if args.background.startswith("#") or args.background == "transparent":
        raise SystemExit(f"--background {args.background} covers the footage's frame-number blocks wherever the "
                         "network says background: use blur, blur:S or none with footage")
    return lc.Footage(Path(source_name(args)), width, height)


async def run(args) -> dict:
    width, height = map(int, args.size.lower().split("x"))
    if args.background is None:
        args.background = "#ff00ff" if source_name(args) == "synthetic" else "blur"
    footage = source_of(args, width, height)
    port = lc.free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [*(args.server_cmd.split() if args.server_cmd else [sys.executable, "-m", "rmbg_stream"]),
           "serve", "--host", "127.0.0.1", "--port", str(port),
           "--model", args.model, "--device", args.device, "--background", args.background,
           "--max-sessions", str(args.sessions + 1), *args.server_arg]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    clients: list[Client] = []
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + args.startup_timeout
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"server exited: {server.stderr.read().strip()}")
                try:
                    async with http.get(f"{url}/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not come up")
                await asyncio.sleep(0.2)
            rss0, _ = lc.proc_stats(server.pid)
            clients = [Client(i, width, height, args.fps, args.codec, footage) for i in range(args.sessions)]
            await asyncio.gather(*(c.connect(http, url) for c in clients))
            await asyncio.sleep(args.warmup)
            start = time.monotonic()
            load1 = os.getloadavg()[0]
            rss1, cpu1 = lc.proc_stats(server.pid)
            names = lc.thread_names(server.pid)  # every thread has started by now: the sessions are up
            threads1 = lc.thread_cpu(server.pid, names)
            spy = lc.profile(server.pid, args.seconds, args.profile) if args.profile else None
            own1 = resource.getrusage(resource.RUSAGE_SELF)
            await asyncio.sleep(args.seconds / 2)
            rss_mid, _ = lc.proc_stats(server.pid)
            await asyncio.sleep(args.seconds / 2)
            end = time.monotonic()
            load2 = os.getloadavg()[0]
            rss2, cpu2 = lc.proc_stats(server.pid)
            threads2 = lc.thread_cpu(server.pid, names)
            if spy is not None:
                spy.wait(30)
            own2 = resource.getrusage(resource.RUSAGE_SELF)
            async with http.get(f"{url}/metrics") as r:
                m = lc.parse_metrics(await r.text())
            sessions = [{"session": c.index, **c.report(start, end)} for c in clients]
            for c in clients:
                await c.close()
            # Every session must be cleaned up once its peer has gone.
            for _ in range(50):
                async with http.get(f"{url}/healthz") as r:
                    left = (await r.json())["sessions"]
                if left == 0:
                    break
                await asyncio.sleep(0.1)
    finally:
        for c in clients:
            await c.close()
        server.send_signal(signal.SIGINT)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    seconds = end - start
    fps = [s["fps"] for s in sessions]
    p95 = [s["latency_ms_p95"] for s in sessions if s["latency_ms_p95"] is not None]
    batches = m.get("rmbg_engine_batches_total", 0)
    return {
        "sessions": args.sessions, "seconds": round(seconds, 1), "size": f"{width}x{height}", "fps_sent": args.fps,
        "model": args.model, "device": args.device, "codec": args.codec, "cpus": os.cpu_count(),
        "source": "synthetic green screen" if footage is None else f"{Path(source_name(args)).name}, "
                  f"{len(footage.frames)} distinct frames", "background": args.background,
        "per_session": sessions,
        "fps_min": min(fps), "fps_mean": round(statistics.mean(fps), 1),
        "latency_ms_p50_median": statistics.median(s["latency_ms_p50"] for s in sessions if s["latency_ms_p50"]),
        "latency_ms_p95_max": max(p95) if p95 else None,
        "dropped_total": sum(s["dropped"] for s in sessions),
        "server": {
            "rss_mb_start": round(rss0, 1), "rss_mb_window_start": round(rss1, 1), "rss_mb_end": round(rss2, 1),
            "rss_growth_mb": round(rss2 - rss1, 1),
            # Allocators and codecs settle in the first seconds; a leak keeps growing in the second half too.
            "rss_growth_mb_second_half": round(rss2 - rss_mid, 1),
            "cpu_percent": round(100 * (cpu2 - cpu1) / seconds),
            # Where its CPU goes, by thread (percent of one core): rmbg-engine (preprocess, network, smoothing,
            # upsampling, composite), video-decoder (aiortc's decoders), asyncio (the executor: VP8/H.264 encoding,
            # image decoding), MainThread (the event loop: RTP, DTLS, SCTP, HTTP); onnxruntime's own pool, if any.
            "cpu_percent_by_thread": {k: round(100 * (threads2.get(k, 0) - threads1.get(k, 0)) / seconds)
                                      for k in sorted(threads2, key=lambda k: threads1.get(k, 0) - threads2[k])
                                      if threads2[k] - threads1.get(k, 0) >= 0.01 * seconds},
            "mean_batch": round(m.get("rmbg_engine_frames_total", 0) / batches, 2) if batches else None,
            "fps_in": m.get("rmbg_fps_in"), "fps_out": m.get("rmbg_fps_out"),
            "latency_ms_p50_at_most": lc.histogram_quantile(m, "rmbg_latency_seconds", 0.5),
            "latency_ms_p95_at_most": lc.histogram_quantile(m, "rmbg_latency_seconds", 0.95),
            "frames_dropped_total": int(m.get("rmbg_frames_dropped_total", 0)),
            "sessions_after_close": left,
        },
        **({"profile": lc.summarise_profile(args.profile)} if args.profile else {}),
        "client_cpu_percent": round(100 * (own2.ru_utime + own2.ru_stime - own1.ru_utime - own1.ru_stime) / seconds),
        # The machine's 1-minute load at the start and end of the window: other work on it skews every number.
        "load_avg_1m": [round(load1, 2), round(load2, 2)],
        "target_met": min(fps) >= 20 and bool(p95) and max(p95) <= 150,
        # Issue 18's goal for one session of a real network: 25 fps, p95 added latency 100 ms.
        "goal_25fps_100ms_met": min(fps) >= 25 and bool(p95) and max(p95) <= 100,
    }


def main() -> None:
    keep_media_on_loopback()  # the server (bound to 127.0.0.1) does the same: no traffic leaves loopback
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--model", default="chroma")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="640x480", help="WxH of the synthetic camera")
    p.add_argument("--fps", type=float, default=30)
    p.add_argument("--codec", default="vp8", choices=["vp8", "h264"])
    p.add_argument("--background", default=None,
                   help="the sessions' background (default: #ff00ff with the synthetic clip, blur with footage)")
    p.add_argument("--source", default=None, help="synthetic, or a video file of real footage (default: synthetic "
                   "for chroma models, else ../shared/media/chaplin.mp4)")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="sample the server with py-spy over the window into FILE (raw) and summarise it "
                        "(pip install py-spy) (default: no profile)")
    p.add_argument("--warmup", type=float, default=3, help="seconds before measuring")
    p.add_argument("--startup-timeout", type=float, default=120)
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for `serve` (repeatable)")
    p.add_argument("--server-cmd", default=None, help="command that takes the `serve ...` arguments "
                   "(default: this Python's `-m rmbg_stream`), e.g. to compare builds")
    args = p.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
