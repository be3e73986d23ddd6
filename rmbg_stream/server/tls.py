"""HTTPS for `serve`, and the addresses a user can open.

Browsers give the camera only to secure pages: https://, or http://localhost on the same machine. So a server that
other machines use needs TLS: either the user's own certificate (`--tls-cert FILE --tls-key FILE`) or
`--tls self-signed`, a certificate made at start for this machine's names and addresses. The self-signed one lives
in memory only: the key is never written anywhere but a private temporary folder, removed once loaded, and a new
one is made at every start; browsers warn once, and the printed SHA-256 fingerprint lets the user check that the
certificate they accept is this server's.

Everything is checked before the server starts; a problem is one `TLSError` line.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ifaddr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SELF_SIGNED_DAYS = 365


class TLSError(ValueError):
    pass


@dataclass(frozen=True)
class TLS:
    context: ssl.SSLContext
    fingerprint: str  # SHA-256 of the certificate (DER), "AB:CD:..."
    description: str  # what the certificate is, for the startup line


def load(cert: str | None, key: str | None, mode: str | None) -> TLS | None:
    """The server's TLS from the command line flags, or None for plain HTTP; raises TLSError."""
    if mode is not None and (cert or key):
        raise TLSError("--tls self-signed makes its own certificate: drop --tls-cert/--tls-key, or drop --tls")
    if mode is not None:
        if mode != "self-signed":
            raise TLSError(f"--tls takes 'self-signed', got {mode!r}")
        cert_pem, key_pem = self_signed(machine_names(), machine_addresses())
        return TLS(_context(cert_pem, key_pem, ("self-signed certificate", "its key")), fingerprint(cert_pem),
                   "self-signed certificate")
    if bool(cert) != bool(key):
        raise TLSError("--tls-cert and --tls-key go together: pass both (PEM files)")
    if not cert:
        return None
    pems = []
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            pems.append(Path(path).read_bytes())
        except OSError as exc:
            raise TLSError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    return TLS(_context(*pems, (f"--tls-cert {cert}", f"--tls-key {key}")), fingerprint(pems[0]),
               f"certificate {cert}")


def _context(cert_pem: bytes, key_pem: bytes, names: tuple[str, str]) -> ssl.SSLContext:
    """A server context from PEM bytes; ssl only loads files, so they pass through a private temporary folder.
    `names` say which certificate and key an error is about."""
    try:
        x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise TLSError(f"{names[0]}: not a PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory(prefix="rmbg-tls-") as tmp:  # mode 0700: only this user can read the key
        c, k = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        c.write_bytes(cert_pem)
        k.touch(0o600)
        k.write_bytes(key_pem)
        try:
            ctx.load_cert_chain(c, k)
        except ssl.SSLError as exc:
            if "MISMATCH" in str(exc):
                raise TLSError(f"{names[1]} is not the key of {names[0]}") from None
            raise TLSError(f"{names[1]}: not a usable PEM private key ({exc.reason or exc})") from None
    return ctx


def fingerprint(cert_pem: bytes) -> str:
    digest = x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256())
    return ":".join(f"{b:02X}" for b in digest)


def self_signed(names: list[str], addresses: list[str]) -> tuple[bytes, bytes]:
    """A certificate (PEM) for `names` (DNS) and `addresses` (IPs), valid for a year, and its P-256 key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "rmbg-stream"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rmbg-stream self-signed")])
    alt = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


# -- addresses


def machine_names() -> list[str]:
    """This machine's host names (as DNS names may carry them), localhost last."""
    names = [socket.gethostname(), socket.getfqdn(), "localhost"]
    return list(dict.fromkeys(n for n in names if n and _dns_name(n)))


def _dns_name(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return False
    except ValueError:
        return all(part and len(part) < 64 for part in name.split("."))


def machine_addresses() -> list[str]:
    """The IP addresses of this machine's interfaces: loopback first, then the others; no link-local ones (a
    browser cannot use them without a zone)."""
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            a = ipaddress.ip_address(ip.ip if isinstance(ip.ip, str) else ip.ip[0])
            if not a.is_link_local:
                found.append(a)
    found.sort(key=lambda a: (not a.is_loopback, a.version))
    return [str(a) for a in dict.fromkeys(found)] or ["127.0.0.1"]


def urls(host: str, port: int, secure: bool) -> list[str]:
    """Base URLs a user can open for a server bound to `host`: its machine's addresses (IPv4 ones for 0.0.0.0,
    all for ::) when it listens on all of them, else `host` itself; loopback first."""
    scheme = "https" if secure else "http"
    if host in ("0.0.0.0", "", "::"):
        hosts = [a for a in machine_addresses() if host == "::" or ipaddress.ip_address(a).version == 4]
        hosts = ["localhost" if a == "127.0.0.1" else a for a in hosts]  # the one name browsers always trust
    else:
        hosts = [host]
    return [f"{scheme}://{_bracket(h)}:{port}" for h in hosts]


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
