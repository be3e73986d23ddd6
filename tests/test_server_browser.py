"""End to end in headless Chromium: a fake camera playing a generated green-screen clip, the page over WebRTC (and
over the WebSocket), the OBS page; the page's own counters and pixel samples are read over the DevTools protocol."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp import ClientSession

from rmbg_stream.server.app import MANAGER
from rmbg_stream.server.synthetic import GreenScreen

from .test_server import near, run, serve, settle

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              # CI installs chromium (.ci/run): there a missing browser is a failure, not a skip.
              pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                 reason="needs chromium (apt-get install chromium)")]
ORANGE = (255, 128, 0)


def write_clip(path: Path, width=640, height=480, frames=60) -> None:
    """A y4m green-screen clip for Chromium's fake camera (it loops it)."""
    source = GreenScreen(width, height)
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F30:1 Ip A1:1 C420jpeg\n".encode())
        for n in range(frames):
            f.write(b"FRAME\n" + source.frame(n).tobytes())


class Page:
    """One tab, driven over the DevTools protocol."""

    def __init__(self, sock):
        self.sock = sock
        self.ids = itertools.count(1)

    async def call(self, method: str, **params) -> dict:
        n = next(self.ids)
        await self.sock.send_json({"id": n, "method": method, "params": params})
        while True:
            msg = await self.sock.receive_json(timeout=30)
            if msg.get("id") == n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def eval(self, expression: str):
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def state(self, name="rmbg") -> dict:
        return json.loads(await self.eval(f"JSON.stringify(window.{name} || null)") or "null") or {}


class Chromium:
    def __init__(self, http: ClientSession, tmp: Path, clip: Path):
        self.http, self.tmp, self.clip = http, tmp, clip
        self.proc: subprocess.Popen | None = None
        self.port = 0

    async def start(self, url: str) -> Page:
        profile = self.tmp / "profile"
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
             f"--use-file-for-fake-video-capture={self.clip}", "--remote-debugging-port=0",
             "--autoplay-policy=no-user-gesture-required", "--disable-background-timer-throttling",
             "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows",
             "--disable-dev-shm-usage", "--allow-loopback-in-peer-connection", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        assert await settle(port_file.exists, 30), "chromium did not start"
        await asyncio.sleep(0.2)
        self.port = int(port_file.read_text().split()[0])
        async with self.http.get(f"http://127.0.0.1:{self.port}/json/list") as r:
            target = next(t for t in await r.json() if t["type"] == "page")
        return await self.attach(target)

    async def attach(self, target: dict) -> Page:
        return Page(await self.http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0))

    async def open(self, url: str) -> Page:
        async with self.http.put(f"http://127.0.0.1:{self.port}/json/new?{url}") as r:
            return await self.attach(await r.json())

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def wait_for(page: Page, predicate, timeout: float, name="rmbg") -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = await page.state(name)
        if predicate(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; page state: {state}")
        await asyncio.sleep(0.25)


def test_browser_webrtc_at_20_fps_with_the_chosen_background_and_obs_transparency(tmp_path):
    clip = tmp_path / "clip.y4m"
    write_clip(clip)

    async def main():
        async with serve() as (url, app), ClientSession() as http:
            chrome = Chromium(http, tmp_path, clip)
            try:
                page = await chrome.start(f"{url}/?autostart=1&transport=webrtc&background={quote('#ff8000')}")
                await wait_for(page, lambda s: s.get("transport") == "webrtc" and s.get("matched", 0) > 30, 60)
                (session,) = app[MANAGER].sessions.values()
                assert session.kind == "webrtc"
                before, t0 = await page.state(), time.monotonic()
                await asyncio.sleep(10)
                after, t1 = await page.state(), time.monotonic()
                fps = (after["frames"] - before["frames"]) / (t1 - t0)
                matched = (after["matched"] - before["matched"]) / (t1 - t0)
                assert fps >= 20 and matched >= 20, (fps, matched, after)
                assert near(after["sample"], ORANGE, 40)
                assert after["error"] is None

                # The OBS page follows that session: transparent where the clip is green, opaque on the stamp.
                obs = await chrome.open(f"{url}/obs")
                points = "window.rmbgObs && (window.rmbgObs.points = [[4, 240], [100, 30]]) && true"
                deadline = time.monotonic() + 30
                while not await obs.eval(points):  # the tab may not have run its script yet
                    assert time.monotonic() < deadline, "the OBS page did not load"
                    await asyncio.sleep(0.2)
                state = await wait_for(obs, lambda s: s.get("frames", 0) > 20 and len(s.get("samples", [])) == 2,
                                       30, "rmbgObs")
                background, stamp = state["samples"]
                assert background[3] < 30 and stamp[3] > 225, state
                assert {s.kind for s in app[MANAGER].sessions.values()} == {"webrtc", "viewer"}

                # Stopping on the page closes the peer connection; the server lets go of everything.
                await page.eval("stop()")
                assert await settle(lambda: not app[MANAGER].sessions, 15), app[MANAGER].sessions
                assert app[MANAGER].engine.stats()["streams"] == 0
            finally:
                chrome.stop()

    run(main())


def test_browser_websocket_fallback(tmp_path):
    clip = tmp_path / "clip.y4m"
    write_clip(clip, frames=30)

    async def main():
        async with serve() as (url, app), ClientSession() as http:
            chrome = Chromium(http, tmp_path, clip)
            try:
                page = await chrome.start(f"{url}/?autostart=1&transport=websocket&background={quote('#ff8000')}")
                state = await wait_for(page, lambda s: s.get("matched", 0) > 30, 60)
                assert state["transport"] == "websocket" and near(state["sample"], ORANGE, 40)
                assert [s.kind for s in app[MANAGER].sessions.values()] == ["websocket"]
                await page.eval("stop()")
                assert await settle(lambda: not app[MANAGER].sessions, 10)
            finally:
                chrome.stop()

    run(main())
