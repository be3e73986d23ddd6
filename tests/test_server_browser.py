"""End to end in headless Chromium: a fake camera playing a generated green-screen clip (or Chromium's own fake
pattern), the page over WebRTC (and over the WebSocket, and HTTPS from another name), the OBS page, the error and
insecure-context banners; the page's own counters and pixel samples are read over the DevTools protocol.

Screenshots of each state go to tests/artifacts/ (git-ignored; CI keeps them) for a reviewer to look at."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from aiohttp import ClientSession
from PIL import Image

from rmbg_stream.server.app import MANAGER
from rmbg_stream.server.synthetic import GreenScreen

from .test_server import near, run, serve, settle

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.serial,  # frame rates and deadlines: not beside other tests
              # CI installs chromium (.ci/run): there a missing browser is a failure, not a skip.
              pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                 reason="needs chromium (apt-get install chromium)")]
ORANGE = (255, 128, 0)
ARTIFACTS = Path(__file__).parent / "artifacts"
ROOT = Path(__file__).resolve().parents[1]


def write_clip(path: Path, width=640, height=480, frames=60, fps=30) -> None:
    """A y4m green-screen clip for Chromium's fake camera (it loops it)."""
    source = GreenScreen(width, height)
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
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

    async def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        shot = await self.call("Page.captureScreenshot", format="png")
        (ARTIFACTS / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))

    async def hidden_but_shown(self) -> list[str]:
        """Elements with the `hidden` attribute that are laid out all the same (a CSS display rule beat it)."""
        return await self.eval("""[...document.querySelectorAll('[hidden]')]
            .filter((e) => getComputedStyle(e).display !== 'none' || e.getClientRects().length > 0)
            .map((e) => e.id || e.tagName)""")

    async def check(self, name: str) -> None:
        """A state of the page: nothing hidden shows; its screenshot is saved."""
        assert await self.hidden_but_shown() == [], name
        await self.screenshot(name)

    async def banner(self) -> dict:
        """Where the error banner is, against the viewport."""
        return await self.eval("""(() => {
            const e = document.getElementById('error');
            const r = e.getBoundingClientRect();
            return { text: e.textContent, shown: !e.hidden && r.height > 0, top: r.top, bottom: r.bottom,
                     viewport: innerHeight, status: document.getElementById('status').textContent }; })()""")

    async def stop_ends_tracks(self) -> list[str]:
        """Presses Stop; the readyState of every camera track it had."""
        await self.eval("window.testTracks = document.getElementById('local').srcObject.getTracks(); true")
        await self.eval("document.getElementById('stop').click()")
        return await self.eval("window.testTracks.map((t) => t.readyState)")


class Chromium:
    """Headless, 1280x900; `clip` None: Chromium's own fake camera pattern (a dark green, out of gamut in 4:2:0).
    Chromium's default autoplay policy, as an ordinary browser has it: no flag lets video play unasked (with
    --autoplay-policy=no-user-gesture-required the OBS page passed here and stayed blank in a real browser)."""

    def __init__(self, http: ClientSession, tmp: Path, clip: Path | None, flags: tuple[str, ...] = ()):
        self.http, self.tmp, self.clip, self.flags = http, tmp, clip, flags
        self.proc: subprocess.Popen | None = None
        self.port = 0

    async def start(self, url: str) -> Page:
        profile = self.tmp / "profile"
        clip = [f"--use-file-for-fake-video-capture={self.clip}"] if self.clip else []
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
             *clip, "--remote-debugging-port=0", "--window-size=1280,900",
             "--disable-background-timer-throttling",
             "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows",
             "--disable-dev-shm-usage", "--allow-loopback-in-peer-connection", *self.flags, url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        assert await settle(port_file.exists, 30), "chromium did not start"
        await asyncio.sleep(0.2)
        self.port = int(port_file.read_text().split()[0])
        async with self.http.get(f"http://127.0.0.1:{self.port}/json/list") as r:
            target = next(t for t in await r.json() if t["type"] == "page")
        return await self.attach(target)

    async def attach(self, target: dict) -> Page:
        page = Page(await self.http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0))
        # The viewport of the screenshots, whatever the headless window's frame takes.
        await page.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        return page

    async def open(self, url: str) -> Page:
        async with self.http.put(f"http://127.0.0.1:{self.port}/json/new?{quote(url, safe='')}") as r:
            return await self.attach(await r.json())

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def until(page: Page, expression: str, timeout: float = 30) -> None:
    """Waits for a JavaScript expression to be true (a new tab may not have run its scripts yet)."""
    deadline = time.monotonic() + timeout
    while not await page.eval(f"!!({expression})"):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        await asyncio.sleep(0.2)


def assert_in_view(banner: dict, *words: str) -> None:
    """The error banner shows, inside the 1280x900 viewport, under the header; the header does not say idle."""
    assert banner["shown"] and 0 <= banner["top"] < 120 and banner["bottom"] <= banner["viewport"] == 900, banner
    assert banner["status"] not in ("idle", ""), banner
    for w in words:
        assert w in banner["text"], banner


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

                # Each state shows only its own panels (a hidden one used to show as an empty checker box).
                await page.call("Page.bringToFront")  # a background tab draws no video frames
                await page.check("webrtc-live")
                await page.eval("document.getElementById('mask').click()")
                await wait_for(page, lambda s: s["sample"] is not None and max(s["sample"]) < 40, 15)  # black: bg
                await page.check("webrtc-mask-view")
                await page.eval("document.getElementById('mask').click()")
                await page.eval("setBackground('transparent')")
                await until(page, "!document.getElementById('output').hidden", 15)  # colour over alpha, put together
                await page.check("webrtc-transparent")

                # Stop closes the peer connection and ends the camera (its light goes off); the server lets go.
                assert await page.stop_ends_tracks() == ["ended"]
                assert await settle(lambda: not app[MANAGER].sessions, 15), app[MANAGER].sessions
                assert app[MANAGER].engine.stats()["streams"] == 0
                await page.check("idle-after-stop")
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
                await page.check("websocket-live")
                assert await page.stop_ends_tracks() == ["ended"]
                assert await settle(lambda: not app[MANAGER].sessions, 10)
            finally:
                chrome.stop()

    run(main())


def test_browser_errors_show_in_view_and_say_what_happened(tmp_path):
    clip = tmp_path / "clip.y4m"
    write_clip(clip, frames=10)

    async def main():
        async with ClientSession() as http:
            chrome = Chromium(http, tmp_path, clip)
            try:
                async with serve(token="secret") as (url, app):
                    page = await chrome.start(f"{url}/?token=secret")
                    await until(page, "window.rmbg")
                    await page.check("idle")

                    # A wrong token over the WebSocket: the browser does not say why it failed; the page asks.
                    page = await chrome.open(f"{url}/?token=wrong&transport=websocket&autostart=1")
                    await wait_for(page, lambda s: s.get("error"), 30)
                    assert_in_view(await page.banner(), "Wrong or missing token")
                    assert await page.eval("document.getElementById('local').srcObject === null")  # camera off
                    await page.check("error-wrong-token")

                    # The OBS page gives up on a wrong token instead of retrying it forever.
                    obs = await chrome.open(f"{url}/obs?token=wrong")
                    state = await wait_for(obs, lambda s: s.get("stopped"), 20, "rmbgObs")
                    assert "Wrong or missing token" in state["status"] and "Stopped" in state["status"], state
                    await obs.screenshot("obs-wrong-token")
                    assert not app[MANAGER].sessions

                async with serve() as (url, app):
                    page = await chrome.open(f"{url}/")
                    await until(page, "window.rmbg")
                    obs = await chrome.open(f"{url}/obs")
                    await until(obs, "window.rmbgObs")
                # The server is gone: Start says it cannot be reached (not that it refused), the OBS page backs off.
                await page.eval("document.getElementById('start').click()")
                await wait_for(page, lambda s: s.get("error"), 30)
                assert_in_view(await page.banner(), "Cannot reach the rmbg-stream server", "serve")
                assert await page.eval("document.getElementById('local').srcObject === null")
                await page.check("error-server-down")
                state = await wait_for(obs, lambda s: "Cannot reach" in s.get("status", ""), 20, "rmbgObs")
                assert "Retrying in" in state["status"] and "Failed to fetch" not in state["status"], state
                await obs.screenshot("obs-server-down")
            finally:
                chrome.stop()

    run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_browser_camera_from_another_name_needs_https_and_gets_it_with_tls_self_signed(tmp_path):
    """`myhost.test` is a name that is not localhost (mapped to 127.0.0.1 in Chromium): over http:// the page says
    why there is no camera; `serve --tls self-signed --host 0.0.0.0 --token T` serves it over https://, and the
    camera starts. The camera is Chromium's own fake pattern, a green that was not keyed before."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "rmbg_stream", "serve", "--tls", "self-signed", "--host", "0.0.0.0", "--port",
         str(port), "--token", "T", "--model", "chroma", "--background", "#ff8000"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)

    async def main():
        async with ClientSession() as http:
            chrome = Chromium(http, tmp_path, None, ("--host-resolver-rules=MAP myhost.test 127.0.0.1",
                                                     "--ignore-certificate-errors"))
            try:
                async with serve() as (url, app):
                    plain = url.replace("127.0.0.1", "myhost.test")
                    page = await chrome.start(f"{plain}/?autostart=1")
                    await until(page, "window.rmbg && window.rmbg.insecure")
                    assert_in_view(await page.banner(), "not a secure address", "https://myhost.test", "--tls")
                    assert await page.eval("document.getElementById('start').disabled")
                    await page.check("insecure-context")
                    assert not app[MANAGER].sessions

                secure = f"https://myhost.test:{port}"

                async def healthy() -> bool:
                    try:
                        async with http.get(f"https://127.0.0.1:{port}/healthz", ssl=False) as r:
                            return r.status == 200
                    except OSError:
                        return False

                deadline = time.monotonic() + 60
                while not await healthy():
                    assert server.poll() is None, server.stdout.read()
                    assert time.monotonic() < deadline, "serve --tls did not start"
                    await asyncio.sleep(0.5)
                orange = quote("#ff8000")
                page = await chrome.open(f"{secure}/?token=T&autostart=1&transport=webrtc&background={orange}")
                state = await wait_for(page, lambda s: s.get("matched", 0) > 30, 90)
                assert state["transport"] == "webrtc" and state["error"] is None
                assert await page.eval("window.isSecureContext && location.protocol === 'https:'")
                assert near(state["sample"], ORANGE, 40)  # Chromium's fake green is keyed
                await page.check("tls-live")
                assert await page.stop_ends_tracks() == ["ended"]
            finally:
                chrome.stop()

    try:
        run(main())
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=20)
    assert "serving https://localhost:" in out and "SHA-256 fingerprint" in out and "0.0.0.0" not in out, out


def test_browser_page_shows_the_model_and_switches_between_the_servers_models(tmp_path):
    """`serve --model chroma chroma:blue`: the page shows the model its session runs, its menu lists the server's
    models, and choosing the other one changes the picture without reconnecting (WebRTC: over the data channel; the
    WebSocket page too). The clip's background is key green: gone under the green key, kept under the blue one."""
    from rmbg_stream.server.synthetic import KEY

    from .test_server_models import two_keyers

    clip = tmp_path / "clip.y4m"
    write_clip(clip, frames=30)

    async def main():
        async with serve(models=two_keyers()) as (url, app), ClientSession() as http:
            chrome = Chromium(http, tmp_path, clip)
            try:
                for transport in ("webrtc", "websocket"):
                    page = await (chrome.start if transport == "webrtc" else chrome.open)(
                        f"{url}/?autostart=1&transport={transport}&background={quote('#ff8000')}")
                    await wait_for(page, lambda s: s.get("matched", 0) > 10 and s.get("model") == "chroma", 60)
                    shown = await page.eval("""[document.getElementById('s-model').textContent,
                        [...document.getElementById('model').options].map((o) => o.value),
                        document.getElementById('model').value, document.getElementById('model').disabled]""")
                    assert shown == ["chroma", ["chroma", "chroma:blue"], "chroma", False], shown
                    (session,) = app[MANAGER].sessions.values()
                    await page.eval("""(() => { const s = document.getElementById('model');
                        s.value = 'chroma:blue'; s.dispatchEvent(new Event('change')); })()""")
                    state = await wait_for(page, lambda s: s.get("model") == "chroma:blue"
                                           and s["sample"] is not None and near(s["sample"], KEY, 40), 20)
                    cameras = [s for s in app[MANAGER].sessions.values() if s.kind != "viewer"]
                    assert session.model == "chroma:blue" and cameras == [session]  # the same session
                    assert state["transport"] == transport and state["error"] is None
                    assert await page.eval("document.getElementById('s-model').textContent") == "chroma:blue"
                    if transport == "webrtc":  # the OBS view of the session says which model it shows
                        obs = await chrome.open(f"{url}/obs?label=1")
                        obs_state = await wait_for(obs, lambda s: s.get("model") == "chroma:blue"
                                                   and s.get("frames", 0) > 5, 30, "rmbgObs")
                        label = await obs.eval("[document.title, document.getElementById('status').textContent, "
                                               "document.getElementById('status').hidden]")
                        assert label == ["rmbg-stream OBS source: chroma:blue", "model: chroma:blue", False], label
                        await obs.screenshot("obs-model-label")
                        await obs.call("Page.navigate", url="about:blank")  # no retries once the camera goes
                        assert obs_state["status"] == "live"
                    await page.call("Page.bringToFront")
                    await page.check(f"model-switched-{transport}")
                    assert await page.stop_ends_tracks() == ["ended"]
                    assert await settle(lambda: not app[MANAGER].sessions, 15)
            finally:
                chrome.stop()

    run(main())


async def transparent_screenshot(page: Page) -> np.ndarray:
    """The page as OBS films it: RGBA, over nothing (a Browser Source has no background of its own)."""
    await page.call("Emulation.setDefaultBackgroundColorOverride", color={"r": 0, "g": 0, "b": 0, "a": 0})
    shot = await page.call("Page.captureScreenshot", format="png")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGBA"))


def test_browser_obs_page_plays_under_the_default_autoplay_policy_with_real_alpha(tmp_path):
    """An ordinary Chromium (no autoplay flag, no click): the OBS page still plays, its canvas holds the processed
    frames with their alpha, and the page as OBS films it has no status text over the picture."""
    from .test_server import RtcCamera

    async def main():
        async with serve() as (url, app), ClientSession() as http:
            cam = RtcCamera()  # 320x240: key green below y 200, the stamp at the top left
            await cam.connect(http, url)
            assert await settle(lambda: cam.channel.readyState == "open", 15)
            chrome = Chromium(http, tmp_path, None)
            try:
                obs = await chrome.start(f"{url}/obs")
                await until(obs, "window.rmbgObs && (window.rmbgObs.points = [[8, 220], [20, 20]])", 15)
                state = await wait_for(obs, lambda s: s.get("frames", 0) > 20 and len(s.get("samples", [])) == 2,
                                       15, "rmbgObs")
                background, stamp = state["samples"]
                assert background[3] < 30 and stamp[3] > 225, state
                assert state["status"] == "live" and not await obs.eval("document.getElementById('video').paused")
                # The label goes after 3 s; then nothing but the picture is drawn.
                await until(obs, "document.getElementById('status').hidden", 6)
                shot = await transparent_screenshot(obs)
                await obs.screenshot("obs-default-autoplay")
            finally:
                chrome.stop()
                await cam.close()
        # 320x240 shown at 1200x900 in the 1280x900 viewport: x0 = 40, 3.75 page pixels a frame pixel.
        at = lambda x, y: shot[round(y * 3.75), 40 + round(x * 3.75)]  # noqa: E731
        assert at(8, 220)[3] < 30 and at(20, 20)[3] > 225, (at(8, 220), at(20, 20))
        assert shot[:, :40, 3].max() == 0 and shot[:, -40:, 3].max() == 0  # beside the picture: nothing at all
        assert shot[820:, 40:400, 3].max() < 30  # where the status sits, over the key-green background

    run(main())


REFUSE_PLAY_UNTIL_CLICKED = """(() => {
    const play = HTMLMediaElement.prototype.play;
    HTMLMediaElement.prototype.play = function () {
        if (navigator.userActivation.hasBeenActive) return play.call(this);
        return Promise.reject(new DOMException('play() needs a user gesture here', 'NotAllowedError'));
    };
})()"""


def test_browser_obs_page_that_may_not_play_asks_for_a_click_and_plays_after_it(tmp_path):
    """A browser that refuses even muted playback until the page is clicked (Firefox's "Block Audio and Video",
    Safari's "Never Auto-Play"): the page says to click, draws nothing, and plays once clicked. No Chromium policy
    refuses muted playback, so its play() is made to refuse as those browsers do, before the page's scripts run."""
    from .test_server import RtcCamera

    async def main():
        async with serve() as (url, app), ClientSession() as http:
            cam = RtcCamera()
            await cam.connect(http, url)
            assert await settle(lambda: cam.channel.readyState == "open", 15)
            chrome = Chromium(http, tmp_path, None)
            try:
                obs = await chrome.start("about:blank")
                await obs.call("Page.enable")  # else the script below is not kept for the next document
                await obs.call("Page.addScriptToEvaluateOnNewDocument", source=REFUSE_PLAY_UNTIL_CLICKED)
                await obs.call("Page.navigate", url=f"{url}/obs")
                await until(obs, "window.rmbgObs && (window.rmbgObs.points = [[8, 220], [20, 20]])", 15)
                state = await wait_for(obs, lambda s: s.get("blocked"), 15, "rmbgObs")
                assert "click" in state["status"] and state["frames"] == 0, state
                assert await obs.eval("!document.getElementById('status').hidden")
                await obs.screenshot("obs-needs-a-click")
                for kind in ("mousePressed", "mouseReleased"):
                    await obs.call("Input.dispatchMouseEvent", type=kind, x=640, y=450, button="left", clickCount=1)
                state = await wait_for(obs, lambda s: s.get("frames", 0) > 10 and len(s.get("samples", [])) == 2,
                                       15, "rmbgObs")
                background, stamp = state["samples"]
                assert background[3] < 30 and stamp[3] > 225 and state["status"] == "live", state
                assert not state["blocked"]
            finally:
                chrome.stop()
                await cam.close()

    run(main())


def hold_frames(monkeypatch, fps: float, webrtc: bool = False, websocket: bool = False) -> None:
    """The server's encoder for a transport takes 1/fps s a frame, as on a machine short of CPU."""
    from rmbg_stream.server import webrtc as rtc
    from rmbg_stream.server import websocket as ws

    if webrtc:
        recv = rtc.ResultTrack.recv

        async def slow_recv(self):
            await asyncio.sleep(1 / fps)
            return await recv(self)

        monkeypatch.setattr(rtc.ResultTrack, "recv", slow_recv)
    if websocket:
        encode = ws.encode

        def slow_encode(*args, **kwargs):  # on an executor thread: the sender waits for it
            time.sleep(1 / fps)
            return encode(*args, **kwargs)

        monkeypatch.setattr(ws, "encode", slow_encode)


async def auto_transport_choice(tmp_path, app, url, http, fps=30) -> tuple[dict, Page]:
    """The camera page on the `auto` transport, once it has chosen; its state and tab."""
    clip = tmp_path / "clip.y4m"
    write_clip(clip, frames=30, fps=fps)
    chrome = Chromium(http, tmp_path, clip)
    page = await chrome.start(f"{url}/?autostart=1&background={quote('#ff8000')}")
    page.chrome = chrome
    state = await wait_for(page, lambda s: (s.get("probe") or {}).get("choice"), 25)
    return state, page


def test_browser_auto_transport_moves_to_the_websocket_when_webrtc_delivers_far_fewer_frames(tmp_path, monkeypatch):
    """Issue 19: `auto` kept WebRTC at 7-13 fps while the WebSocket gave 25-27. WebRTC held to 8 fps: the page
    measures both and keeps the WebSocket, with the same background, and says both figures."""
    hold_frames(monkeypatch, 8, webrtc=True)

    async def main():
        async with serve() as (url, app), ClientSession() as http:
            state, page = await auto_transport_choice(tmp_path, app, url, http)
            try:
                probe = state["probe"]
                assert probe["webrtc"] <= 9 and probe["websocket"] > 1.3 * probe["webrtc"], probe
                assert probe["choice"] == state["transport"] == "websocket" and state["error"] is None, state
                assert f"{probe['websocket']} fps" in state["status"] and f"{probe['webrtc']} fps" in state["status"]
                assert [s.kind for s in app[MANAGER].sessions.values()] == ["websocket"]
                matched = state["matched"]
                state = await wait_for(page, lambda s: s["matched"] > matched + 10, 10)  # the orange came along
                await page.check("auto-chose-websocket")
            finally:
                page.chrome.stop()

    run(main())


def test_browser_auto_transport_goes_back_to_webrtc_when_the_websocket_is_no_better(tmp_path, monkeypatch):
    """Both held to 8 fps: WebRTC is well below the camera's 30, so the WebSocket is tried, is no better, and the
    page goes back to WebRTC (a new session) with both figures in its status."""
    hold_frames(monkeypatch, 8, webrtc=True, websocket=True)

    async def main():
        async with serve() as (url, app), ClientSession() as http:
            state, page = await auto_transport_choice(tmp_path, app, url, http)
            try:
                probe = state["probe"]
                assert probe["websocket"] is not None and probe["websocket"] <= 1.3 * probe["webrtc"], probe
                assert probe["choice"] == state["transport"] == "webrtc" and state["error"] is None, state
                assert f"{probe['websocket']} fps" in state["status"], state
                assert [s.kind for s in app[MANAGER].sessions.values()] == ["webrtc"]
                matched = state["matched"]
                await wait_for(page, lambda s: s["matched"] > matched + 5, 10)  # the orange came along
            finally:
                page.chrome.stop()

    run(main())


def test_browser_auto_transport_stays_on_webrtc_when_it_is_fine(tmp_path):
    """A 10 fps camera that WebRTC keeps up with, even on this loaded machine: the WebSocket could not be 1.3 times
    better, so it is not tried and the session is never moved."""
    async def main():
        async with serve() as (url, app), ClientSession() as http:
            state, page = await auto_transport_choice(tmp_path, app, url, http, fps=10)
            try:
                probe = state["probe"]
                assert probe["camera"] == 10 and probe["webrtc"] * 1.3 >= 10 and probe["websocket"] is None, probe
                assert probe["choice"] == state["transport"] == "webrtc" and state["status"] == "live (webrtc)", state
                assert [s.kind for s in app[MANAGER].sessions.values()] == ["webrtc"]
            finally:
                page.chrome.stop()

    run(main())
