"""`serve` over HTTPS: the self-signed certificate, the user's own files, their errors, and the startup line."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import socket
import ssl

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509

from rmbg_stream import cli
from rmbg_stream.server import tls
from rmbg_stream.server.app import startup_lines


async def fetch_over(context, path="/") -> tuple[str, bytes]:
    """Serves a one-route app over `context` on 127.0.0.1; returns the body a client gets and the certificate
    (DER) the server showed it."""
    async def hello(request):
        return web.Response(text="hello over TLS")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as http, http.get(f"https://127.0.0.1:{port}{path}", ssl=False) as r:
            text = await r.text()
        pem = await asyncio.to_thread(ssl.get_server_certificate, ("127.0.0.1", port))
        return text, ssl.PEM_cert_to_DER_cert(pem)
    finally:
        await runner.cleanup()


def colon_hex(der: bytes) -> str:
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def test_self_signed_certificate_serves_https_for_this_machines_names_with_the_printed_fingerprint():
    secure = tls.load(None, None, "self-signed")
    text, der = asyncio.run(fetch_over(secure.context))
    assert text == "hello over TLS"
    assert colon_hex(der) == secure.fingerprint  # what the startup line prints is what a browser is shown
    san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {socket.gethostname(), "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    ips = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    assert "127.0.0.1" in ips and set(tls.machine_addresses()) <= ips


def test_certificate_and_key_files_serve_https(tmp_path):
    cert, key = tls.self_signed(["rmbg.test"], ["127.0.0.1"])
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    secure = tls.load(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"), None)
    text, der = asyncio.run(fetch_over(secure.context))
    assert text == "hello over TLS" and colon_hex(der) == secure.fingerprint == tls.fingerprint(cert)


def bad_files(tmp_path) -> dict[str, tuple[list[str], str]]:
    cert, key = tls.self_signed(["a.test"], [])
    _, other_key = tls.self_signed(["b.test"], [])
    files = {"cert.pem": cert, "key.pem": key, "other.pem": other_key, "text.pem": b"hello\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    c, k, o, t, missing = (str(tmp_path / n) for n in ("cert.pem", "key.pem", "other.pem", "text.pem", "no.pem"))
    return {
        "missing": (["--tls-cert", missing, "--tls-key", k], f"--tls-cert {missing}: cannot read it"),
        "only cert": (["--tls-cert", c], "--tls-cert and --tls-key go together"),
        "both modes": (["--tls", "self-signed", "--tls-cert", c, "--tls-key", k], "drop --tls-cert/--tls-key"),
        "not a cert": (["--tls-cert", t, "--tls-key", k], f"--tls-cert {t}: not a PEM certificate"),
        "not a key": (["--tls-cert", c, "--tls-key", t], f"--tls-key {t}: not a usable PEM private key"),
        "wrong key": (["--tls-cert", c, "--tls-key", o], f"--tls-key {o} is not the key of --tls-cert {c}"),
    }


@pytest.mark.parametrize("case", ["missing", "only cert", "both modes", "not a cert", "not a key", "wrong key"])
def test_bad_tls_flags_fail_in_one_line_before_serving(tmp_path, capsys, case):
    flags, message = bad_files(tmp_path)[case]
    # Port 1 cannot be bound here: a check made after the start would show as a traceback, not this line.
    assert cli.main(["serve", "--model", "chroma", "--port", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_startup_line_lists_urls_to_open_not_the_bind_address():
    lines = startup_lines("0.0.0.0", 8443, "T", tls.load(None, None, "self-signed"))
    assert "0.0.0.0" not in lines
    lan = [a for a in tls.machine_addresses() if ipaddress.ip_address(a).version == 4 and a != "127.0.0.1"]
    for url in ["https://localhost:8443/?token=T"] + [f"https://{a}:8443/?token=T" for a in lan]:
        assert url in lines, lines
    assert "SHA-256 fingerprint" in lines and "http://" not in lines

    plain = startup_lines("0.0.0.0", 8080, "T", None)
    assert "http://localhost:8080/?token=T" in plain and "--tls self-signed" in plain  # says how to get the camera
    assert startup_lines("127.0.0.1", 8080, None, None).splitlines()[0] == "rmbg-stream: serving http://127.0.0.1:8080/"
    assert "https://[::1]:9000/" in startup_lines("::1", 9000, "T", tls.load(None, None, "self-signed"))
