#!/usr/bin/env python
"""Soak and fault test: real WebRTC and WebSocket clients against `rmbg-stream serve` on loopback for a long while.

    python scripts/soak.py --sessions 4 --minutes 10 --model chroma

Half the sessions are aiortc cameras (with a data channel), half WebSocket clients sending JPEG frames. Every window
(a minute by default; `--window` shortens it for a short run) one client is killed abruptly (no goodbye: its ICE
transport or TCP socket just stops) and a new one of the same kind connects. A share of the messages are malformed
(bad headers, undecodable images, broken or hostile JSON controls, deeply nested JSON); each must be answered with an
error and must not end the session. The first window is the warm-up. At the end every client leaves, and the server
must come back to its idle state: no sessions, and as many asyncio tasks and file descriptors as before.

Prints one JSON object: RSS at the start, at the end of the warm-up and at the end (and its slope after the warm-up),
p50/p95 latency per window, fps per session, sessions/tasks/fds leaked, malformed messages sent and errors answered,
and `goals` (RSS growth after warm-up <= 5 %, p95 of the last window <= 120 % of the first, nothing leaked).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import struct
import time

from liveclients import RtcClient, Server, WsClient, jpeg_frames, pct

from rmbg_stream.server.aiortc_patches import keep_media_on_loopback
from rmbg_stream.server.websocket import HEADER, JPEG, WEBP, pack

# Malformed WebSocket messages. "sync" ones are answered at once; an undecodable image is answered when the decoder
# gets to it, and latest-wins may let a newer frame overtake it first (then it is skipped, which is not a failure).
WS_MALFORMED = {
    "short header": ("sync", b"RM\x01"),
    "bad magic": ("sync", b"XX" + bytes(HEADER.size)),
    "unknown format": ("sync", struct.pack("!2sBBId", b"RM", 1, 9, 1, 0.0) + b"\xff\xd8"),
    "not json": ("sync", "{not json"),
    "no type": ("sync", '{"value": 1}'),
    "unknown control": ("sync", '{"type": "reboot"}'),
    "bad value": ("sync", '{"type": "smoothing", "value": "a lot"}'),
    "server file": ("sync", '{"type": "background", "value": "/etc/passwd.png"}'),
    "nested json": ("sync", "[" * 100_000 + "]" * 100_000),
    "garbage jpeg": ("async", pack(JPEG, 0, 0.0, b"\xff\xd8\xff\xe0" + os.urandom(256))),
    "jpeg said webp": ("async", None),  # a real JPEG under the WebP code: filled in at start
}
RTC_MALFORMED = ["{not json", '{"type": "reboot"}', '{"type": "mask_view", "value": 3}', "[" * 100_000 + "]" * 100_000]


class Load:
    """The clients of one soak, with what each sent and got."""

    def __init__(self, args, server: Server, frames: list[bytes]):
        self.args, self.server, self.frames = args, server, frames
        self.rng = random.Random(args.seed)
        self.clients: list[dict] = []  # {"kind", "client", "start", "end", "task"}
        self.sent_bad = {"sync": 0, "async": 0}
        self.sent_by_kind: dict[str, int] = {}

    async def connect(self, kind: str) -> None:
        index = len(self.clients)
        w, h = map(int, self.args.size.split("x"))
        if kind == "webrtc":
            client = RtcClient(index, w, h, self.args.fps)
            await client.connect(self.server.http, self.server.url, channel=True)
        else:
            client = WsClient(index)
            await client.connect(self.server.http, self.server.url)
        entry = {"kind": kind, "client": client, "start": time.monotonic(), "end": None}
        entry["task"] = asyncio.ensure_future(self.drive(entry))
        self.clients.append(entry)

    async def drive(self, entry: dict) -> None:
        """WebSocket: frames at --fps, a share of them malformed. WebRTC: a control a second, a share malformed."""
        c, p = entry["client"], self.args.malformed
        period = 1 / self.args.fps if entry["kind"] == "websocket" else 1.0
        n = 0
        while True:
            await asyncio.sleep(period)
            n += 1
            if entry["kind"] == "webrtc":
                bad = self.rng.random() < p * 4  # one message a second: a larger share, for as many over a run
                message = self.rng.choice(RTC_MALFORMED) if bad else '{"type": "ping"}'
                if c.send_control(message) and bad:
                    self.count("sync", "data channel: " + message[:20])
            elif self.rng.random() < p:
                name = self.rng.choice(list(WS_MALFORMED))
                kind, message = WS_MALFORMED[name]
                await c.send_raw(message)
                self.count(kind, name)
            else:
                await c.send_frame(self.frames[n % len(self.frames)])

    def count(self, kind: str, name: str) -> None:
        self.sent_bad[kind] += 1
        self.sent_by_kind[name] = self.sent_by_kind.get(name, 0) + 1

    async def kill(self, entry: dict) -> None:
        entry["task"].cancel()
        entry["end"] = time.monotonic()
        await entry["client"].kill()

    async def leave(self, entry: dict) -> None:
        entry["task"].cancel()
        entry["end"] = entry["end"] or time.monotonic()
        await entry["client"].close()

    def live(self) -> list[dict]:
        return [e for e in self.clients if e["end"] is None]

    def latencies(self, start: float, end: float) -> list[float]:
        return [lat for e in self.clients for lat in e["client"].latencies(start, end)]

    def errors(self) -> tuple[int, int]:
        """(immediate error replies, error replies about a frame's image: those name the frame's "seq")."""
        replies = [m for e in self.clients for m in e["client"].errors]
        bad_frames = sum(1 for m in replies if isinstance(m, dict) and "seq" in m)
        return len(replies) - bad_frames, bad_frames

    def dropped_by_server(self) -> int:
        """WebSocket connections the server ended while the client was still sending."""
        return sum(1 for e in self.clients if e["kind"] == "websocket" and e["client"].ended is not None
                   and (e["end"] is None or e["client"].ended < e["end"]))


async def idle_state(server: Server) -> dict:
    m = await server.metrics()
    return {"sessions": (await server.health())["sessions"], "tasks": int(m.get("rmbg_process_asyncio_tasks", -1)),
            "fds": int(m.get("rmbg_process_open_fds", -1)), "threads": int(m.get("rmbg_process_threads", -1))}


def slope(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) samples, in MiB per minute."""
    if len(samples) < 2:
        return None
    n = len(samples)
    mt, mr = sum(t for t, _ in samples) / n, sum(r for _, r in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return round(60 * sum((t - mt) * (r - mr) for t, r in samples) / var, 2) if var else None


async def run(args) -> dict:
    w, h = map(int, args.size.split("x"))
    frames = jpeg_frames(w, h)
    WS_MALFORMED["jpeg said webp"] = ("async", pack(WEBP, 0, 0.0, frames[0]))
    kinds = ["webrtc" if i % 2 == 0 else "websocket" for i in range(args.sessions)]
    async with Server(args.model, args.device, ["--max-sessions", str(args.sessions + 4)]) as server:
        await asyncio.sleep(2)
        await server.metrics()  # the metrics connection is open in both readings of the idle state
        before = await idle_state(server)
        load = Load(args, server, frames)
        t0 = time.monotonic()
        rss = [(0.0, server.rss())]
        await asyncio.gather(*(load.connect(k) for k in kinds))
        windows = max(1, round(args.minutes * 60 / args.window))
        rss_warm = None
        for k in range(windows):
            end = t0 + (k + 1) * args.window
            while (left := end - time.monotonic()) > 0:
                await asyncio.sleep(min(left, 2.0))
                rss.append((time.monotonic() - t0, server.rss()))
            if k == 0:
                rss_warm = rss[-1][1]
            if k < windows - 1:  # a fault each window but the last: kill one client, connect a new one
                victim = load.live()[k % len(load.live())]
                await load.kill(victim)
                await load.connect(victim["kind"])
        t_end = time.monotonic()
        rss_end = server.rss()
        for e in load.live():
            await load.leave(e)
        sessions_left = await server.wait_idle(timeout=args.cleanup_timeout)
        await asyncio.sleep(2)
        after = await idle_state(server)
        rss_idle = server.rss()
    per_window = []
    for k in range(windows):
        lat = load.latencies(t0 + k * args.window, t0 + (k + 1) * args.window)
        per_window.append({"window": k, "frames": len(lat), "latency_ms_p50": pct(lat, 0.5),
                           "latency_ms_p95": pct(lat, 0.95)})
    sessions = []
    for e in load.clients:
        got = [t for t, *_ in e["client"].got]
        span = (e["end"] or t_end) - e["start"]
        sessions.append({"kind": e["kind"], "from_s": round(e["start"] - t0, 1), "seconds": round(span, 1),
                         "fps": round(len(got) / span, 1) if span > 0 else None, "killed": e["end"] is not None
                         and e["end"] < t_end})
    answered_sync, answered_frames = load.errors()
    growth = (rss_end - rss_warm) / rss_warm
    p95_first, p95_last = per_window[0]["latency_ms_p95"], per_window[-1]["latency_ms_p95"]
    leaked = {"sessions": sessions_left, "tasks": after["tasks"] - before["tasks"], "fds": after["fds"] - before["fds"]}
    return {
        "sessions": args.sessions, "minutes": args.minutes, "window_s": args.window, "size": args.size,
        "fps_sent": args.fps, "model": args.model, "device": args.device, "malformed_share": args.malformed,
        "rss_mb_start": rss[0][1], "rss_mb_end_of_warmup": rss_warm, "rss_mb_end": rss_end,
        "rss_mb_idle_after": rss_idle, "rss_growth_after_warmup_pct": round(100 * growth, 2),
        "rss_slope_mb_per_min_after_warmup": slope([s for s in rss if s[0] >= args.window]),
        "latency_per_window": per_window, "fps_per_session": sessions,
        "faults": {"killed": sum(s["killed"] for s in sessions), "connected": len(sessions)},
        "malformed_sent": load.sent_bad["sync"] + load.sent_bad["async"],
        "malformed_must_answer": load.sent_bad["sync"], "errors_answered": answered_sync,
        "malformed_sent_by_kind": load.sent_by_kind,
        "undecodable_frames_sent": load.sent_bad["async"], "undecodable_frames_answered": answered_frames,
        "connections_dropped_by_server": load.dropped_by_server(),
        "idle_before": before, "idle_after": after, "leaked": leaked,
        # The machine's 1-minute load: other work on it skews latency and fps (not memory or leaks).
        "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        "goals": {"rss_growth_le_5pct": growth <= 0.05,
                  "p95_last_within_20pct_of_first": None if not (p95_first and p95_last)
                  else p95_last <= 1.2 * p95_first,
                  "nothing_leaked": leaked == {"sessions": 0, "tasks": 0, "fds": 0},
                  "every_malformed_message_answered": answered_sync == load.sent_bad["sync"]
                  and load.dropped_by_server() == 0},
    }


def main() -> None:
    keep_media_on_loopback()  # the server (bound to 127.0.0.1) does the same: no traffic leaves loopback
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=4, help="clients at any time, half WebRTC, half WebSocket")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--window", type=float, default=60, help="seconds per window: latency figures, faults")
    p.add_argument("--model", default="chroma")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="640x480", help="WxH of the clients' frames (multiples of 4)")
    p.add_argument("--fps", type=float, default=15)
    p.add_argument("--malformed", type=float, default=0.05, help="share of WebSocket messages that are malformed")
    p.add_argument("--cleanup-timeout", type=float, default=60,
                   help="seconds for the server to notice every client gone (a killed WebRTC peer: ICE consent "
                        "expiry, about 30 s)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    if args.sessions < 2 or args.minutes * 60 < 2 * args.window or not 0 <= args.malformed <= 1:
        p.error("--sessions must be at least 2, --minutes at least two windows and --malformed 0..1")
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
