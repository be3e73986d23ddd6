"""`rmbg-stream serve`: the aiohttp app, its routes and the command line entry.

    GET  /, /obs, /<file>          the page, the OBS source page and their files from web/ (nothing else)
    POST /offer                    WebRTC signalling (webrtc.py)
    GET  /ws                       the WebSocket fallback (websocket.py)
    POST /session/{id}/background  upload a background image (body: the image, at most --upload-limit)
    GET  /healthz, /metrics        liveness, and Prometheus text

With --token, /offer, /ws, uploads and /metrics need it (`Authorization: Bearer T`, or `?token=T` where a browser
cannot set headers); WebSocket and API requests from a browser must come from this server's own origin.
"""

from __future__ import annotations

import gc
import hmac
import ipaddress
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from yarl import URL

from ..engine.composite import Background, parse_background
from ..engine.engine import Engine
from . import memory, metrics, webrtc, websocket
from .sessions import ControlError, Full, SessionManager

log = logging.getLogger(__name__)

# Installed: rmbg_stream/web (packaged from web/); a source checkout: web/ at its top.
WEB_DIR = next((d for d in (Path(__file__).resolve().parents[1] / "web", Path(__file__).resolve().parents[2] / "web")
                if d.is_dir()), Path(__file__).resolve().parents[2] / "web")
OFFER_LIMIT = 64 * 1024
MANAGER = web.AppKey("manager", SessionManager)


@dataclass
class Config:
    token: str | None = None
    max_sessions: int = 8
    background: Background = field(default_factory=lambda: parse_background("blur"))
    smoothing: float = 0.5
    upload_limit: int = 8 * 2**20
    web_dir: Path = WEB_DIR
    model: str = ""


CONFIG = web.AppKey("config", Config)
_ERRORS = {400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 403: web.HTTPForbidden, 404: web.HTTPNotFound,
           503: web.HTTPServiceUnavailable}


def json_error(status: int, message: str) -> web.HTTPException:
    if status == 413:  # this one's constructor wants the sizes
        return web.HTTPRequestEntityTooLarge(0, 0, text=json.dumps({"error": message}), content_type="application/json")
    return _ERRORS[status](text=json.dumps({"error": message}), content_type="application/json")


@web.middleware
async def errors_as_json(request: web.Request, handler):
    """Every error leaves as {"error": ...}; aiohttp's own (404, 405, 413) included."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 413:
            message = f"request body too large ({exc.text})"
        return web.json_response({"error": message}, status=exc.status)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")  # page URLs may carry ?token=
    return response


def check_access(request: web.Request) -> None:
    """Token (when set) and, for browsers, same origin; raises 401 / 403 JSON errors."""
    token = request.app[CONFIG].token
    if token is not None:
        auth = request.headers.get("Authorization", "")
        given = auth[7:].strip() if auth.startswith("Bearer ") else request.query.get("token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise json_error(401, "missing or wrong token")
    elif not is_loopback(URL(f"http://{request.host}").host or ""):
        # Without a token the server only listens on loopback, so any other Host is a page on another site whose
        # name was pointed at 127.0.0.1 (DNS rebinding), trying to reach the cameras through it.
        raise json_error(403, f"host {request.host} is not allowed: open the page at http://127.0.0.1")
    origin = request.headers.get("Origin")
    if origin is not None:  # browsers always send it on WebSocket and cross-origin requests
        try:
            o, own = URL(origin), URL(f"{request.scheme}://{request.host}")
            same = (o.scheme, o.host, o.port) == (own.scheme, own.host, own.port)
        except ValueError:
            same = False
        if not same:
            raise json_error(403, f"origin {origin} is not allowed: open the page from this server")


async def read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise json_error(413, f"request body of {request.content_length} bytes is over the {limit} byte limit")
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise json_error(413, f"request body is over the {limit} byte limit")
    return body


# -- handlers


async def offer(request: web.Request) -> web.Response:
    check_access(request)
    try:
        params = json.loads(await read_body(request, OFFER_LIMIT))
    except ValueError:
        raise json_error(400, 'the body must be JSON: {"sdp": "...", "type": "offer"}') from None
    if not isinstance(params, dict):
        raise json_error(400, 'the body must be a JSON object: {"sdp": "...", "type": "offer"}')
    try:
        return web.json_response(await webrtc.answer(params, request.app[MANAGER]))
    except Full as exc:
        raise json_error(503, str(exc)) from None
    except webrtc.NoCamera as exc:
        raise json_error(404, str(exc)) from None
    except webrtc.BadOffer as exc:
        raise json_error(400, str(exc)) from None


async def ws(request: web.Request) -> web.WebSocketResponse:
    check_access(request)
    manager = request.app[MANAGER]
    try:
        session = manager.open("websocket")  # before the upgrade, so a refusal is a plain 503
    except Full as exc:
        raise json_error(503, str(exc)) from None
    try:
        sock = web.WebSocketResponse(max_msg_size=manager.upload_limit * 2, heartbeat=15, compress=False)
        session.on_close.append(sock.close)
        await sock.prepare(request)
        await websocket.handle(sock, manager, session)
    finally:
        await session.close()
    return sock


async def upload(request: web.Request) -> web.Response:
    check_access(request)
    manager = request.app[MANAGER]
    session = manager.get(request.match_info["id"])
    if session is None or session.kind == "viewer":
        raise json_error(404, "no such camera session")
    data = await read_body(request, manager.upload_limit)
    try:
        return web.json_response(await session.upload_image(data))
    except ControlError as exc:
        raise json_error(400, str(exc)) from None


async def healthz(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    return web.json_response({"status": "ok", "sessions": len(manager.sessions), "max_sessions": manager.max_sessions,
                              "model": request.app[CONFIG].model, "device": str(manager.engine.device)})


async def metrics_page(request: web.Request) -> web.Response:
    check_access(request)
    return web.Response(text=render_metrics(request.app[MANAGER]), content_type="text/plain",
                        headers={"X-Prometheus-Format": "0.0.4"})


def render_metrics(manager: SessionManager) -> str:
    live = list(manager.sessions.values())
    kinds = {"webrtc": 0, "websocket": 0, "viewer": 0}
    for s in live:
        kinds[s.kind] += 1
    totals = manager.totals()
    engine = manager.engine.stats()
    families = [
        ("rmbg_sessions", "gauge", "Open sessions by transport (viewer = OBS page).",
         [({"kind": k}, v) for k, v in kinds.items()]),
        ("rmbg_sessions_max", "gauge", "--max-sessions.", [({}, manager.max_sessions)]),
        ("rmbg_sessions_opened_total", "counter", "Sessions opened.", [({}, manager.opened)]),
        ("rmbg_sessions_refused_total", "counter", "Sessions refused because the server was full.",
         [({}, manager.refused)]),
        ("rmbg_fps_in", "gauge", "Frames per second received, all sessions.",
         [({}, round(sum(s.fps_in.rate() for s in live), 2))]),
        ("rmbg_fps_out", "gauge", "Frames per second sent, all sessions.",
         [({}, round(sum(s.fps_out.rate() for s in live), 2))]),
        ("rmbg_frames_received_total", "counter", "Frames received from clients.", [({}, totals["received"])]),
        ("rmbg_frames_sent_total", "counter", "Processed frames sent to clients.", [({}, totals["sent"])]),
        ("rmbg_frames_dropped_total", "counter", "Frames dropped to keep latency bounded (stale on arrival, "
         "overtaken in the engine, or overtaken before the encoder).", [({}, totals["dropped"])]),
        ("rmbg_engine_batches_total", "counter", "Network batches run.", [({}, engine["batches"])]),
        ("rmbg_engine_frames_total", "counter", "Frames through the network.", [({}, engine["frames"])]),
        ("rmbg_engine_batch_size", "gauge", "Frames in the last batch.", [({}, engine["last_batch_size"])]),
    ]
    if manager.engine.device.type == "cuda":
        import torch

        dev = manager.engine.device
        families.append(("rmbg_gpu_memory_bytes", "gauge", "CUDA memory of this process.",
                         [({"kind": "allocated"}, torch.cuda.memory_allocated(dev)),
                          ({"kind": "reserved"}, torch.cuda.memory_reserved(dev))]))
    families += metrics.process_families()
    hist = [("rmbg_latency_seconds", "Server latency per frame, from its arrival to its hand-off to the encoder.",
             manager.latency)]
    return metrics.render(families, hist)


def static_routes(web_dir: Path) -> list[web.RouteDef]:
    """Exactly the files in web/ when the app starts: a request can name nothing else, so no path traversal."""
    if not (Path(web_dir) / "index.html").is_file():
        raise FileNotFoundError(f"the page is not at {web_dir}: serve runs from a source checkout (pip install -e .)")
    files = {p.name: p for p in sorted(Path(web_dir).iterdir()) if p.is_file() and not p.name.startswith(".")}
    pages = {"/": "index.html", "/obs": "obs.html"}

    def serve(path: Path):
        async def handler(request: web.Request) -> web.FileResponse:
            return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

        return handler

    routes = [web.get(url, serve(files[name])) for url, name in pages.items() if name in files]
    routes += [web.get(f"/{name}", serve(path)) for name, path in files.items()]
    return routes


def make_app(engine: Engine, config: Config) -> web.Application:
    webrtc.use_clean_vp8_encoder()
    app = web.Application(middlewares=[errors_as_json], client_max_size=config.upload_limit + 4096)
    upload_dir = Path(tempfile.mkdtemp(prefix="rmbg-serve-"))
    manager = SessionManager(engine, max_sessions=config.max_sessions, background=config.background,
                             smoothing=config.smoothing, upload_dir=upload_dir, upload_limit=config.upload_limit)
    app[MANAGER] = manager
    app[CONFIG] = config
    app.add_routes([web.post("/offer", offer), web.get("/ws", ws), web.post("/session/{id}/background", upload),
                    web.get("/healthz", healthz), web.get("/metrics", metrics_page)])
    app.add_routes(static_routes(config.web_dir))

    async def shutdown(app):
        await manager.close_all()
        shutil.rmtree(upload_dir, ignore_errors=True)

    app.on_shutdown.append(shutdown)
    return app


# -- command line


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def tune_process(device) -> None:
    """Process-wide settings for serving; measured on two cores with a browser beside the server."""
    # aiortc allocates a few objects per packet, so the cyclic GC runs often, and each full pass walked the ~200k
    # objects of torch and the model: a third of the server's CPU. Those are here for good; the GC can skip them.
    gc.collect()
    gc.freeze()
    memory.tune()  # before the engine's and the executor's threads start: see memory.py
    # The engine thread needs the GIL between its many small torch ops while the event loop runs aiortc's
    # pure-Python RTP path; at the default 5 ms switch interval the engine spends much of each batch waiting.
    # 0.1 ms: 4 sessions at 640x480 went from 18 to 23 fps each on two cores against 0.5 ms.
    sys.setswitchinterval(0.0001)
    if device.type == "cpu":
        import torch

        # The codecs and the event loop need cores too: an engine spread over all of them stalls on the busy ones
        # (on two cores, two threads were three times slower than one).
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


def run_cli(args) -> int:
    if not is_loopback(args.host) and not args.token:
        print(f"error: refusing to serve on {args.host} without --token: anyone who can reach it could use it "
              "(pass --token SECRET, or bind to 127.0.0.1)", file=sys.stderr)
        return 2
    if args.max_sessions < 1:
        raise ValueError("--max-sessions must be at least 1")
    background = parse_background(args.background)
    if background.kind == "video":
        raise ValueError("serve takes no video background: use a colour, an image, blur or transparent")
    if background.kind == "image" and not Path(background.path).is_file():
        raise FileNotFoundError(f"background image not found: {background.path}")
    from ..cli import build_backend

    if is_loopback(args.host):
        webrtc.keep_media_on_loopback()
    backend = build_backend(args)
    tune_process(backend.device)
    engine = Engine(backend, max_batch=args.batch, max_wait_ms=4)
    config = Config(token=args.token, max_sessions=args.max_sessions, background=background, model=args.model)
    url = f"http://{args.host}:{args.port}"
    suffix = f"?token={args.token}" if args.token else ""
    print(f"rmbg-stream: serving {url}/{suffix}  (OBS browser source: {url}/obs{suffix})", flush=True)
    try:
        web.run_app(make_app(engine, config), host=args.host, port=args.port, print=None,
                    access_log=log if getattr(args, "verbose", False) else None)
    finally:
        engine.close()
    return 0
