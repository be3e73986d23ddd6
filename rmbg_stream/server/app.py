"""`rmbg-stream serve`: the aiohttp app, its routes and the command line entry.

    GET  /, /obs, /<file>          the page, the OBS source page and their files from web/ (nothing else)
    POST /offer                    WebRTC signalling (webrtc.py)
    GET  /ws                       the WebSocket fallback (websocket.py)
    POST /session/{id}/background  upload a background image (body: the image, at most --upload-limit)
    GET  /healthz, /metrics        liveness, and Prometheus text

With --token, /offer, /ws, uploads and /metrics need it (`Authorization: Bearer T`, or `?token=T` where a browser
cannot set headers); WebSocket and API requests from a browser must come from this server's own origin. The access
log (-v) shows no token. A malformed Host header is a 400 on every route; JSON from clients goes through
untrusted.loads_json (depth-bounded).
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import logging
import re
import shutil
import socket
import sys
import tempfile
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, quote_plus, unquote_plus

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from yarl import URL

from ..device import pick_device
from ..engine.composite import Background, parse_background
from ..engine.engine import Engine
from ..engine.setup import build_backend
from ..engine.smoothing import DEFAULT_STRENGTH
from ..tuning import tune_server
from . import aiortc_patches, metrics, tls, webrtc, websocket
from .sessions import EVENTS, ControlError, Full, SessionManager
from .untrusted import TooDeep, loads_json

log = logging.getLogger(__name__)

# Installed: rmbg_stream/web (packaged from web/); a source checkout: web/ at its top.
WEB_DIR = next((d for d in (Path(__file__).resolve().parents[1] / "web", Path(__file__).resolve().parents[2] / "web")
                if d.is_dir()), Path(__file__).resolve().parents[2] / "web")
OFFER_LIMIT = 64 * 1024
MANAGER = web.AppKey("manager", SessionManager)
_QUERY_PARAM = re.compile(r"(?<=[?&;])([^=&;#\s\"]+)=[^&;#\s\"]*")
# Requests whose refusal is logged (the page's own files are not: a missing favicon is no event).
API_PATHS = ("/offer", "/ws", "/session/", "/metrics")
_HOST = re.compile(r"(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|[A-Za-z0-9._-]+)(?::(?P<port>[0-9]{0,5}))?")


@dataclass
class Config:
    token: str | None = None
    max_sessions: int = 8
    background: Background = field(default_factory=lambda: parse_background("blur"))
    smoothing: float = DEFAULT_STRENGTH
    upload_limit: int = 8 * 2**20
    web_dir: Path = WEB_DIR


CONFIG = web.AppKey("config", Config)
_ERRORS = {400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 403: web.HTTPForbidden, 404: web.HTTPNotFound,
           503: web.HTTPServiceUnavailable}


def json_error(status: int, message: str) -> web.HTTPException:
    if status == 413:  # this one's constructor wants the sizes
        return web.HTTPRequestEntityTooLarge(0, 0, text=json.dumps({"error": message}), content_type="application/json")
    return _ERRORS[status](text=json.dumps({"error": message}), content_type="application/json")


@web.middleware
async def errors_as_json(request: web.Request, handler):
    """Every error leaves as {"error": ...}; aiohttp's own (404, 405, 413) included. A malformed Host is refused
    first, on every route, so no handler has to parse one."""
    try:
        check_host(request.host)
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.content_type == "application/json":
            message = json.loads(exc.text)["error"]
        else:
            message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
            if exc.status == 413:
                message = f"request body too large ({exc.text})"
        if request.path.startswith(API_PATHS):  # the path only: the query may hold the token
            EVENTS.info("refused %s %s from %s: %d %s", request.method, request.path, request.remote, exc.status,
                        message)
        if exc.content_type == "application/json":
            raise
        return web.json_response({"error": message}, status=exc.status)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")  # page URLs may carry ?token=
    return response


def check_host(host: str) -> None:
    """400 unless `host` is a Host header: a name or IPv4 address, or an [IPv6] address, and an optional port."""
    m = _HOST.fullmatch(host)
    ok = m is not None and int(m["port"] or 0) <= 65535
    if ok and m["ip6"] is not None:
        try:
            ipaddress.IPv6Address(m["ip6"])
        except ValueError:
            ok = False
    if not ok:
        raise json_error(400, f"malformed Host header {host[:100]!r}: expected a host name or address and a port")


def check_access(request: web.Request) -> None:
    """Token (when set) and, for browsers, same origin; raises 401 / 403 JSON errors."""
    token = request.app[CONFIG].token
    if token is not None:
        scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
        # Auth schemes are case-insensitive (RFC 9110 11.1): "bearer T" is as good as "Bearer T".
        given = credentials.strip() if scheme.lower() == "bearer" else request.query.get("token", "")
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


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access log line (-v) without the token: page and WebSocket URLs carry it as ?token=."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        version = f"HTTP/{request.version.major}.{request.version.minor}"
        line = (f'{request.remote} "{request.method} {request.raw_path} {version}" {response.status} '
                f'{response.body_length} {time:.3f}s "{request.headers.get("Referer", "-")}" '
                f'"{request.headers.get("User-Agent", "-")}"')
        config = request.app.get(CONFIG) if isinstance(request, web.Request) else None
        self.logger.info("%s", redact(line, config.token if config else None))


def redact(text: str, token: str | None) -> str:
    """`text` with the value of every query parameter named token (however it is encoded) and the token itself
    (as is or URL-encoded) replaced by "[redacted]"."""

    def param(m: re.Match) -> str:
        return f"{m[1]}=[redacted]" if unquote_plus(m[1]).lower() == "token" else m[0]

    text = _QUERY_PARAM.sub(param, text)
    for form in {token, quote(token, safe=""), quote_plus(token)} if token else ():
        text = text.replace(form, "[redacted]")
    return text


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, up to `limit` bytes (413 past it), however it arrives: in many TCP segments, or chunked."""
    if request.content_length is not None and request.content_length > limit:
        raise json_error(413, f"request body of {request.content_length} bytes is over the {limit} byte limit")
    body = bytearray()
    # One read returns only what is buffered so far; b"" means the body has ended.
    while chunk := await request.content.read(limit + 1 - len(body)):
        body += chunk
        if len(body) > limit:
            raise json_error(413, f"request body is over the {limit} byte limit")
    return bytes(body)


# -- handlers


async def offer(request: web.Request) -> web.Response:
    check_access(request)
    try:
        params = loads_json(await read_body(request, OFFER_LIMIT))
    except TooDeep as exc:
        raise json_error(400, f'the body is {exc}: send {{"sdp": "...", "type": "offer"}}') from None
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
                              "model": manager.models[0], "models": manager.models,
                              "device": str(manager.engine.device)})


async def metrics_page(request: web.Request) -> web.Response:
    check_access(request)
    return web.Response(text=render_metrics(request.app[MANAGER]), content_type="text/plain",
                        headers={"X-Prometheus-Format": "0.0.4"})


def render_metrics(manager: SessionManager) -> str:
    live = list(manager.sessions.values())
    kinds = {"webrtc": 0, "websocket": 0, "viewer": 0}
    models = dict.fromkeys(manager.models, 0)
    for s in live:
        kinds[s.kind] += 1
        if s.kind != "viewer":
            models[s.model] += 1
    totals = manager.totals()
    engines = {name: e.stats() for name, e in manager.engines.items()}
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
        ("rmbg_engine_batches_total", "counter", "Network batches run, all models.",
         [({}, sum(e["batches"] for e in engines.values()))]),
        ("rmbg_engine_frames_total", "counter", "Frames through the network, all models.",
         [({}, sum(e["frames"] for e in engines.values()))]),
        ("rmbg_engine_batch_size", "gauge", "Frames in the last batch (the largest of each model's last).",
         [({}, max(e["last_batch_size"] for e in engines.values()))]),
        ("rmbg_model_sessions", "gauge", "Camera sessions running each model (serve --model A B ...).",
         [({"model": m}, n) for m, n in models.items()]),
        ("rmbg_model_frames_total", "counter", "Frames through each model's engine.",
         [({"model": m}, e["frames"]) for m, e in engines.items()]),
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


def make_app(engines: dict[str, Engine] | Engine, config: Config) -> web.Application:
    """`engines`: one per model, by the name clients use for it (the first is what sessions start with); an Engine
    alone is named after its backend."""
    if isinstance(engines, Engine):
        engines = {engines.backend.name: engines}
    aiortc_patches.use_clean_vp8_encoder()
    app = web.Application(middlewares=[errors_as_json], client_max_size=config.upload_limit + 4096)
    upload_dir = Path(tempfile.mkdtemp(prefix="rmbg-serve-"))
    manager = SessionManager(engines, max_sessions=config.max_sessions, background=config.background,
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


def log_events() -> None:
    """Sessions opened and closed and requests refused, one line each on stderr with the time, at any -v."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    EVENTS.addHandler(handler)
    EVENTS.setLevel(logging.INFO)
    EVENTS.propagate = False  # printed once, not again by the root handler under -v


def listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address of `host`, opened before the model loads and the banner is printed, so
    that a port out of range (ValueError) or in use (OSError) is one line at once, not a traceback after it."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is out of range: use 1 to 65535 (0 picks a free one)")
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"cannot listen on {host}: {exc.strerror}") from None
    socks: list[socket.socket] = []
    try:
        for family, *_, address in addresses:  # "localhost" is 127.0.0.1 and ::1
            if socks:  # one port for all of them, also when the first was picked by the system
                address = (address[0], socks[0].getsockname()[1], *address[2:])
            socks.append(socket.create_server(address, family=family, backlog=128))
    except OSError as exc:
        for sock in socks:
            sock.close()
        hint = ": is another server running there? Pick another --port" if exc.errno == errno.EADDRINUSE else ""
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from None
    return socks


def startup_lines(host: str, port: int, token: str | None, secure: tls.TLS | None, models: list[str] = ()) -> str:
    """What to open: the page and the OBS source at each address of this machine the server listens on; and the
    models sessions can run."""
    suffix = f"?token={token}" if token else ""
    bases = tls.urls(host, port, secure is not None)
    lines = [f"rmbg-stream: serving {bases[0]}/{suffix}"] + [f"             also at {b}/{suffix}" for b in bases[1:]]
    lines.append(f"             OBS browser source (on this machine): {bases[0]}/obs{suffix}")
    if len(models) > 1:
        lines.append(f"             models: {models[0]} (sessions start with it), {', '.join(models[1:])}; the page "
                     "switches between them")
    elif models:
        lines.append(f"             model: {models[0]}")
    if secure is not None:
        lines.append(f"             TLS: {secure.description}, SHA-256 fingerprint {secure.fingerprint}")
    elif not is_loopback(host):
        lines.append("             other machines get no camera over http:// (browsers allow it only on https:// "
                     "or localhost): add --tls self-signed, or --tls-cert FILE --tls-key FILE")
    return "\n".join(lines)


def run_cli(args) -> int:
    if not is_loopback(args.host) and not args.token:
        print(f"error: refusing to serve on {args.host} without --token: anyone who can reach it could use it "
              "(pass --token SECRET, or bind to 127.0.0.1)", file=sys.stderr)
        return 2
    if args.max_sessions < 1:
        raise ValueError("--max-sessions must be at least 1")
    models = model_names(args.model)
    background = parse_background(args.background)
    if background.kind == "video":
        raise ValueError("serve takes no video background: use a colour, an image, blur or transparent")
    secure = tls.load(getattr(args, "tls_cert", None), getattr(args, "tls_key", None), getattr(args, "tls", None))
    try:
        socks = listen(args.host, args.port)
    except OSError as exc:
        print(f"error: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        return serve(args, models, background, socks, secure)
    finally:
        for sock in socks:
            sock.close()


def model_names(value: str | list[str]) -> list[str]:
    """`serve --model`: one name or several, each once, in the order given."""
    names = [value] if isinstance(value, str) else list(value)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--model names {', '.join(twice)} more than once: name each model once")
    return names


def serve(args, models: list[str], background: Background, socks: list[socket.socket], secure: tls.TLS | None) -> int:
    """Loads each model (one engine each) and runs the app on `socks` until interrupted."""
    if is_loopback(args.host):
        aiortc_patches.keep_media_on_loopback()
    # Tuned before the models load too: an onnxruntime session takes its thread count from torch's when it is made,
    # and with two threads on two shared cores its spinning pool cost a selfie session about half its frame rate
    # (1 session, 640x480: 9-13 fps against 18-22 with one thread, alternating runs). Again after, so that the
    # garbage collector also leaves the models' objects alone (gc.freeze).
    tune_server(pick_device(args.device))
    backends = {name: build_backend(Namespace(**{**vars(args), "model": name})) for name in models}
    tune_server(backends[models[0]].device)
    log_events()
    engines: dict[str, Engine] = {}
    try:
        for name, backend in backends.items():
            engines[name] = Engine(backend, max_batch=args.batch, max_wait_ms=4)
        config = Config(token=args.token, max_sessions=args.max_sessions, background=background)
        print(startup_lines(args.host, socks[0].getsockname()[1], args.token, secure, models), flush=True)
        web.run_app(make_app(engines, config), sock=socks, print=None, access_log_class=AccessLogger,
                    ssl_context=secure.context if secure else None,
                    access_log=log if getattr(args, "verbose", False) else None)
    finally:
        for engine in engines.values():
            engine.close()
    return 0
