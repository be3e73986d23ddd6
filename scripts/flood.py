#!/usr/bin/env python
"""Memory under 1080p floods: WebSocket clients send frames as fast as the socket takes them, then leave.

    python scripts/flood.py --clients 4 --frames 500 --floods 6 --size 1920x1080

The server (`python -m rmbg_stream serve --model chroma --device cpu`) runs in a subprocess; each flood connects
`--clients` WebSocket clients at once, each sends `--frames` JPEG frames (the page's protocol, latest-wins on the
server), waits briefly for the last replies and closes. RSS is read once every session is gone and the server has
been idle for `--settle` seconds. Prints one JSON object: RSS idle, after flood 1 and after each flood, in MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from liveclients import Server, WsClient, jpeg_frames


async def flood(server: Server, frames: list[bytes], clients: int, count: int) -> dict:
    """One flood: `clients` sockets send `count` frames each at once; returns what came back."""
    socks = [WsClient(i) for i in range(clients)]
    await asyncio.gather(*(c.connect(server.http, server.url) for c in socks))

    async def send(c: WsClient) -> None:
        for n in range(count):
            await c.send_frame(frames[(n + c.index) % len(frames)])
        # Latest-wins: the last frame sent is answered unless it was dropped; give it a moment.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and (not c.got or c.got[-1][0] < time.monotonic() - 0.5):
            await asyncio.sleep(0.1)

    t0 = time.monotonic()
    await asyncio.gather(*(send(c) for c in socks))
    seconds = time.monotonic() - t0
    for c in socks:
        await c.close()
    return {"seconds": round(seconds, 1), "replies": sum(len(c.got) for c in socks),
            "errors": sum(len(c.errors) for c in socks)}


async def run(args) -> dict:
    width, height = map(int, args.size.lower().split("x"))
    frames = jpeg_frames(width, height)
    env = dict(kv.split("=", 1) for kv in args.server_env)
    async with Server(args.model, args.device, ["--max-sessions", str(args.clients + 1), *args.server_arg],
                      env=env) as server:
        await asyncio.sleep(args.settle)
        out = {"clients": args.clients, "frames": args.frames, "floods": args.floods, "size": f"{width}x{height}",
               "jpeg_kb": round(sum(map(len, frames)) / len(frames) / 1024, 1), "model": args.model,
               "server_env": env, "server_args": args.server_arg, "rss_mb_idle": server.rss(), "rss_mb_after": [],
               "floods_detail": []}
        for _ in range(args.floods):
            out["floods_detail"].append(await flood(server, frames, args.clients, args.frames))
            out["sessions_left"] = await server.wait_idle()
            await asyncio.sleep(args.settle)
            out["rss_mb_after"].append(server.rss())
        out["rss_mb_after_flood_1"] = out["rss_mb_after"][0]
        out[f"rss_mb_after_flood_{args.floods}"] = out["rss_mb_after"][-1]
        # The machine's 1-minute load: other work on it skews the timings, not the memory.
        out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--frames", type=int, default=500, help="frames per client per flood")
    p.add_argument("--floods", type=int, default=6)
    p.add_argument("--size", default="1920x1080", help="WxH of the frames")
    p.add_argument("--model", default="chroma")
    p.add_argument("--device", default="cpu")
    p.add_argument("--settle", type=float, default=3, help="idle seconds before each RSS reading")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for `serve` (repeatable)")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the server (repeatable), e.g. MALLOC_ARENA_MAX=2")
    args = p.parse_args()
    if min(args.clients, args.frames, args.floods) < 1:
        p.error("--clients, --frames and --floods must be at least 1")
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
