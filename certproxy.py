#!/usr/bin/env python3
"""certproxy: send mail through your own mail server from any network, trusted by certificates alone.

Laptop side (client mode): listen on 127.0.0.1:2525 in plain SMTP, carry every session to the
upstream mail server over STARTTLS or implicit TLS, presenting a client certificate and accepting
only the server certificate (or public key) that was pinned::

    certproxy client --upstream mail.example.org:587 \\
        --cert certs/laptop.pem --key certs/laptop.key \\
        --pin AB:CD:...:EF

Any failure before the splice (no upstream, no STARTTLS, a pin mismatch, a timeout) is answered
with ``421 4.x.x reason`` so the mail client keeps the message queued. Nothing is ever sent in clear
but EHLO, STARTTLS and QUIT.

Works with plain asyncio; uses uvloop when it is importable.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import enum
import gc
import hashlib
import ipaddress
import itertools
import logging
import os
import re
import signal
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import NamedTuple

__version__ = "0.1.0"
__all__ = [
    "CertProxyError",
    "ClientConfig",
    "ClientPolicy",
    "ClientService",
    "ConfigError",
    "Endpoint",
    "Pins",
    "Reply",
    "ReplyParser",
    "ServerConfig",
    "ServerService",
    "SessionError",
    "SMTPGate",
    "StartTLSClient",
    "TLSMode",
    "main",
    "make_certificate",
    "parse_fingerprint",
]

log = logging.getLogger("certproxy")

# region Defaults ---------------------------------------------------------------------------------

DEFAULT_CLIENT_LISTEN = "127.0.0.1:2525"
DEFAULT_EHLO = "localhost"
IMPLICIT_TLS_PORT = 465  # RFC 8314: submissions (implicit TLS)
MAX_REPLY_LINE = 2048  # RFC 5321 4.5.3.1.5 says 512 octets; leave room for long EHLO lines, stay bounded
MAX_REPLY_LINES = 64  # lines in one multi-line reply before we call it hostile
CONNECT_TIMEOUT_S = 30.0  # per upstream address
DIALOGUE_TIMEOUT_S = 60.0  # whole pre-TLS dialogue (greeting, EHLO, STARTTLS)
HANDSHAKE_TIMEOUT_S = 30.0  # TLS handshake
IDLE_TIMEOUT_S = 600.0  # RFC 5321 4.5.3.2.7: server timeout for the DATA termination is 10 minutes
CLOSE_LINGER_S = 30.0  # after a half-close that TLS cannot forward, wait this long for the other side
SERVER_GONE_REPLY = b"421 4.4.2 certproxy: the mail server closed the connection; anything unconfirmed was not accepted\r\n"
TLS_SHUTDOWN_TIMEOUT_S = 2.0  # our close_notify is sent; some peers (Exim 4.96) never answer theirs
GOODBYE_LINGER_S = 2.0  # after our last reply, read and discard this long so a reset cannot eat the reply
MAX_CONNECTIONS = 100  # concurrent sessions per client listener
MAX_SERVER_CONNECTIONS = 1000  # concurrent sessions per server listener
MAX_PER_IP = 50  # concurrent sessions from one client address on a server listener (0: no limit)
GRACE_S = 30.0  # on SIGTERM, how long live sessions may take to finish before they are cut
MAX_COMMAND_LINE = 512  # RFC 5321 4.5.3.1.4: command line, CRLF included
MAX_DIALOGUE_ERRORS = 10  # bad commands before TLS before we hang up (Postfix smtpd_hard_error_limit is 20)
MAX_DIALOGUE_COMMANDS = 50  # commands before TLS before we hang up
LISTEN_BACKLOG = 1024  # bursts of new connections wait in the kernel, not in SYN retransmits (capped by somaxconn)
MAX_VERDICTS = 4096  # client certificates whose verdict a server policy remembers
DUAL_SNIFF_S = 0.25  # --tls --starttls: how long a silent client may take before it is greeted as SMTP

# endregion
# region Errors -----------------------------------------------------------------------------------


class CertProxyError(Exception):
    """Base of everything certproxy raises on purpose."""


class ConfigError(CertProxyError):
    """A bad option; the message names it."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option


class SessionError(CertProxyError):
    """A session cannot go on. ``reply`` is the SMTP reply owed to the peer, ``reason`` the log text.

    The reply never carries exception text: it is a fixed string chosen where the error is raised.
    """

    def __init__(self, reply: str, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason


class ProtocolError(SessionError):
    """The SMTP peer did something the protocol (or our security policy) does not allow."""


class PeerRejected(SessionError):
    """The peer's certificate is not the one we trust."""


# endregion
# region Configuration ----------------------------------------------------------------------------


class TLSMode(enum.Enum):
    STARTTLS = "starttls"
    IMPLICIT = "tls"
    EITHER = "tls+starttls"  # server only: one port, TLS detected by the client's first byte


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, option: str) -> Endpoint:
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", text.strip())
        if not m:
            raise ConfigError(option, f"{text!r} is not HOST:PORT (use [ADDR]:PORT for IPv6)")
        host = m.group(1) or m.group(3)
        port = int(m.group(2) or m.group(4))
        if not 0 <= port <= 65535:
            raise ConfigError(option, f"{text!r}: port must be 0-65535")
        return cls(host=host, port=port)

    def is_loopback(self) -> bool:
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


_FP_PREFIX = re.compile(r"^(?:sha-?256)(?:\s*fingerprint)?\s*[:=]?\s*", re.IGNORECASE)


def parse_fingerprint(text: str) -> bytes:
    """A SHA-256 fingerprint in any spelling people paste, as 32 bytes.

    Accepts ``AB:CD:...`` (openssl, Postfix), plain hex in any case (Exim), and a ``sha256:``,
    ``SHA256=`` or ``sha256 Fingerprint=`` prefix. Raises ValueError otherwise.
    """
    s = _FP_PREFIX.sub("", text.strip())
    if ":" in s:
        parts = s.split(":")
        if len(parts) != 32 or not all(re.fullmatch(r"[0-9A-Fa-f]{2}", p) for p in parts):
            raise ValueError(f"{text!r} is not a SHA-256 fingerprint (32 hex pairs separated by ':')")
        s = "".join(parts)
    if not re.fullmatch(r"[0-9A-Fa-f]{64}", s):
        raise ValueError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits, ':' optional)")
    return bytes.fromhex(s)


def format_fingerprint(digest: bytes) -> str:
    """``AB:CD:...``: the spelling of openssl and Postfix, and the one our log lines use."""
    return ":".join(f"{b:02X}" for b in digest)


def cert_fingerprint(der: bytes) -> bytes:
    return hashlib.sha256(der).digest()


def spki_fingerprint(der: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_der_x509_certificate(der).public_key()
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


_NAME_RE = re.compile(r"[A-Za-z0-9._@+\-]{1,64}")


@dataclass(frozen=True, slots=True)
class Pins:
    """SHA-256 digests of certificates or of their public keys (SPKI); any one matching is enough.

    An entry may carry a name, Postfix-table style (``FINGERPRINT name``): the identity certproxy
    server hands the MTA with ``--xclient`` (``LOGIN=name``)."""

    digests: frozenset[bytes]
    names: tuple[tuple[bytes, str], ...] = ()

    @classmethod
    def parse(cls, texts: list[str] | tuple[str, ...], option: str, *, named: bool = False) -> Pins:
        """``named``: entries may carry a name (--allow-fingerprint); elsewhere a name is an error."""
        digests, names = set(), {}
        for text in texts:
            try:
                digests.add(parse_fingerprint(text))
                continue
            except ValueError as e:
                error = str(e)
            fp, _, name = text.strip().replace("\t", " ").rpartition(" ")
            try:
                digest = parse_fingerprint(fp)
            except ValueError:
                raise ConfigError(option, error + "; an optional name may follow it: 'FINGERPRINT name'") from None
            if not _NAME_RE.fullmatch(name):
                raise ConfigError(option, f"{name!r} is not a usable name (1-64 of A-Z a-z 0-9 . _ @ + -)")
            if not named:
                raise ConfigError(option, f"{text!r}: a name is only meaningful in --allow-fingerprint")
            digests.add(digest)
            names[digest] = name
        return cls(frozenset(digests), tuple(names.items()))

    def match(self, der: bytes) -> bool:
        # One hash and a set lookup on the hot path; the SPKI is only computed for key pins.
        return cert_fingerprint(der) in self.digests or spki_fingerprint(der) in self.digests

    def name_of(self, der: bytes) -> str | None:
        if not self.names:
            return None
        names = dict(self.names)
        return names.get(cert_fingerprint(der)) or names.get(spki_fingerprint(der))


@dataclass(frozen=True, slots=True, kw_only=True)
class Upstream:
    endpoint: Endpoint
    mode: TLSMode


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    connect: float = CONNECT_TIMEOUT_S
    dialogue: float = DIALOGUE_TIMEOUT_S
    handshake: float = HANDSHAKE_TIMEOUT_S
    idle: float = IDLE_TIMEOUT_S

    def check(self) -> None:
        for name in ("connect", "dialogue", "handshake", "idle"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name}-timeout", "must be a positive number of seconds")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    name: str = "client"
    listen: Endpoint
    upstreams: tuple[Upstream, ...]
    cert: str
    key: str | None = None
    pins: Pins = Pins(frozenset())
    ca: str | None = None
    server_name: str | None = None
    ehlo: str = DEFAULT_EHLO
    allow_remote_clients: bool = False
    max_connections: int = MAX_CONNECTIONS
    timeouts: Timeouts = Timeouts()

    def __post_init__(self) -> None:
        if not self.upstreams:
            raise ConfigError("--upstream", "at least one upstream is required")
        if not self.pins.digests and not self.ca:
            raise ConfigError("--pin", "give --pin FINGERPRINT and/or --ca FILE: refusing to trust an unauthenticated server")
        if not self.listen.is_loopback() and not self.allow_remote_clients:
            raise ConfigError(
                "--listen",
                f"{self.listen} is not a loopback address; anyone who reaches it could send mail with your "
                "certificate. Add --allow-remote-clients if that is really what you want",
            )
        if not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+", self.ehlo):
            raise ConfigError("--ehlo", f"{self.ehlo!r} is not a valid EHLO name")
        if self.max_connections < 1:
            raise ConfigError("--max-connections", "must be at least 1")
        self.timeouts.check()


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    name: str = "server"
    listen: Endpoint
    backend: Endpoint | None
    mode: TLSMode
    cert: str
    key: str | None = None
    allow: tuple[str, ...] = ()
    client_ca: str | None = None
    allow_fingerprints: Pins = Pins(frozenset())
    hostname: str = ""
    client_cert: str = "required"  # required | optional | none: see _route
    starttls_optional: bool = False  # a STARTTLS listener that also admits clients who never say STARTTLS
    untrusted_backend: Endpoint | None = None  # where clients without an allowed certificate go
    xclient: bool = False  # tell the backend the client's address and certificate name (XCLIENT)
    proxy_protocol: str | None = None  # "v1" / "v2": a PROXY header to the backend(s)
    proxy_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # load balancers sending PROXY
    max_connections: int = MAX_SERVER_CONNECTIONS
    max_per_ip: int = MAX_PER_IP
    timeouts: Timeouts = Timeouts()

    def __post_init__(self) -> None:
        if self.client_cert not in ("required", "optional", "none"):
            raise ConfigError("--client-cert", f"{self.client_cert!r}: expected required, optional or none")
        if self.starttls_optional and self.mode is TLSMode.IMPLICIT:
            raise ConfigError("--starttls-optional", "needs --starttls (a port that speaks SMTP before TLS)")
        if self.starttls_optional and self.client_cert == "required":
            raise ConfigError("--starttls-optional", "admits clients without TLS, hence without a certificate: "
                                                     "use --client-cert optional or none")
        if self.client_cert != "required" and self.untrusted_backend is None:
            raise ConfigError("--untrusted-backend", f"--client-cert {self.client_cert} needs --untrusted-backend "
                                                     "HOST:PORT (where clients without an allowed certificate go; "
                                                     "never the port your MTA trusts)")
        if self.untrusted_backend is not None and self.client_cert == "required":
            raise ConfigError("--untrusted-backend", "is only used with --client-cert optional or none")
        if self.client_cert == "none":
            if self.backend is not None:
                raise ConfigError("--backend", "with --client-cert none no client proves who it is, so none may "
                                               "reach the trusted --backend: give only --untrusted-backend")
            if self.allow or self.client_ca or self.allow_fingerprints.digests:
                raise ConfigError("--allow", "--client-cert none asks for no certificate: drop --allow, "
                                             "--client-ca and --allow-fingerprint")
        elif self.backend is None:
            raise ConfigError("--backend", "is required (the MTA port for clients with an allowed certificate)")
        if self.untrusted_backend is not None and not (self.xclient or self.proxy_protocol):
            raise ConfigError("--untrusted-backend", "needs --xclient or --proxy-protocol: every connection "
                                                     "certproxy makes comes from 127.0.0.1, so the untrusted port "
                                                     "must be told the client's real address to judge it")
        if self.untrusted_backend is not None and self.untrusted_backend == self.backend:
            raise ConfigError("--untrusted-backend", "must differ from --backend: the backend trusts whoever "
                                                     "arrives on it")
        if self.proxy_protocol not in (None, "v1", "v2"):
            raise ConfigError("--proxy-protocol", f"{self.proxy_protocol!r}: expected v1 or v2")
        if not self.allow and not self.client_ca and self.client_cert != "none":
            raise ConfigError("--allow", "give --allow CERT (or DIR) and/or --client-ca FILE: "
                                         "refusing to let clients in without checking their certificates")
        if self.allow_fingerprints.digests and not self.client_ca and not self.allow:
            raise ConfigError("--allow-fingerprint", "narrows --client-ca or --allow; give one of them")
        if not re.fullmatch(r"[A-Za-z0-9.\-]+", self.hostname or "x"):
            raise ConfigError("--hostname", f"{self.hostname!r} is not a valid host name")
        if self.max_connections < 1:
            raise ConfigError("--max-connections", "must be at least 1")
        if self.max_per_ip < 0:
            raise ConfigError("--max-per-ip", "must be 0 (no limit) or more")
        self.timeouts.check()


def upstream_mode(endpoint: Endpoint, starttls: bool, tls: bool) -> TLSMode:
    """``--tls`` / ``--starttls`` if given, else implicit TLS on port 465 and STARTTLS elsewhere."""
    if tls:
        return TLSMode.IMPLICIT
    if starttls:
        return TLSMode.STARTTLS
    return TLSMode.IMPLICIT if endpoint.port == IMPLICIT_TLS_PORT else TLSMode.STARTTLS


# endregion
# region TLS contexts -----------------------------------------------------------------------------


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # Leaf certificates as trust anchors need PARTIAL_CHAIN; Python 3.13 adds X509_STRICT, which
    # rejects many self-signed certificates people already have. Choose the flags ourselves.
    ctx.verify_flags = (ctx.verify_flags | ssl.VERIFY_X509_PARTIAL_CHAIN) & ~getattr(ssl, "VERIFY_X509_STRICT", 0)


def _no_password() -> bytes:
    return b""  # an encrypted key then fails to load instead of prompting on the terminal


def _load_cert_chain(ctx: ssl.SSLContext, cert: str, key: str | None) -> None:
    for option, path in (("--cert", cert), ("--key", key)):
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(option, f"cannot read {path!r}")
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as e:
        what = "--key" if key else "--cert"
        raise ConfigError(
            what,
            f"cannot load the certificate {cert!r} with its key{' ' + repr(key) if key else ''} "
            f"({e.reason or e}); the key must be unencrypted PEM and match the certificate",
        ) from None


def client_context(cfg: ClientConfig) -> ssl.SSLContext:
    """The context for talking to the upstream: our client certificate; pins and/or a CA for the server."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    if cfg.ca:
        try:
            ctx.load_verify_locations(cafile=cfg.ca)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError("--ca", f"cannot load CA bundle {cfg.ca!r}: {e}") from None
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        # Pins only: the chain is not checked by OpenSSL; the pin is checked right after the handshake,
        # before a single byte of the session crosses.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    _load_cert_chain(ctx, cfg.cert, cfg.key)
    return ctx


def _pem_to_der(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", data, re.DOTALL)
    return [ssl.PEM_cert_to_DER_cert(b.decode()) for b in blocks]


class Verdict(NamedTuple):
    fingerprint: str
    subject: str
    allowed: bool
    why: str  # when not allowed
    name: str  # when allowed


@dataclass(frozen=True, slots=True)
class ClientPolicy:
    """Who may reach the backend: exact certificates (--allow), certificates a private CA issued
    (--client-ca), optionally narrowed to fingerprints (--allow-fingerprint)."""

    allowed: frozenset[bytes]  # SHA-256 of each --allow certificate
    ca_certs: tuple  # cryptography x509 certificates from --client-ca
    fingerprints: Pins
    _verdicts: dict = field(default_factory=dict, compare=False, repr=False)  # see judge()

    def judge(self, der: bytes) -> Verdict:
        """Everything a session needs to know about a client certificate, computed once per
        certificate and policy (a reload makes a new policy): parsing it with cryptography on every
        session cost about 5% of the server's CPU. Bounded: the cache is emptied when it is full."""
        key = cert_fingerprint(der)
        verdict = self._verdicts.get(key)
        if verdict is None:
            ok, why = self.authorise(der)
            verdict = Verdict(format_fingerprint(key), certificate_subject(der), ok, why,
                              self.name(der) if ok else "")
            if len(self._verdicts) >= MAX_VERDICTS:
                self._verdicts.clear()
            self._verdicts[key] = verdict
        return verdict

    def authorise(self, der: bytes) -> tuple[bool, str]:
        """(allowed?, why not). OpenSSL already checked the chain; this decides, on every session,
        resumed or not, against the current lists."""
        if cert_fingerprint(der) not in self.allowed and not self._issued_by_ca(der):
            return False, "certificate is neither an --allow certificate nor issued by --client-ca"
        if self.fingerprints.digests and not self.fingerprints.match(der):
            return False, "certificate fingerprint is not in --allow-fingerprint"
        return True, ""

    def name(self, der: bytes) -> str:
        """Who an allowed certificate is, for the MTA (XCLIENT LOGIN) and the logs: its name in
        --allow-fingerprint, else its subject's common name, else its fingerprint in hex."""
        named = self.fingerprints.name_of(der)
        if named:
            return named
        from cryptography import x509

        cns = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        cn = str(cns[0].value) if cns else ""
        return cn if _NAME_RE.fullmatch(cn) else cert_fingerprint(der).hex()

    def _issued_by_ca(self, der: bytes) -> bool:
        if not self.ca_certs:
            return False
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        for ca in self.ca_certs:
            try:
                cert.verify_directly_issued_by(ca)
                return True
            except Exception:  # InvalidSignature, ValueError (names differ), TypeError (key type)
                continue
        return False


def _allow_files(paths: tuple[str, ...]) -> list[str]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            entries = sorted(os.path.join(path, n) for n in os.listdir(path)
                             if n.endswith((".pem", ".crt", ".cer")) and not n.startswith("."))
            if not entries:
                raise ConfigError("--allow", f"directory {path!r} holds no .pem/.crt/.cer files")
            files += entries
        elif os.access(path, os.R_OK):
            files.append(path)
        else:
            raise ConfigError("--allow", f"cannot read {path!r}")
    return files


def server_context(cfg: ServerConfig) -> tuple[ssl.SSLContext, ClientPolicy]:
    """The listener's context (asks for a client certificate, trusts only --allow and --client-ca)
    and the policy applied after every handshake."""
    from cryptography import x509

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    # No tickets, no resumption: every session presents and is judged on its certificate (and a
    # ticket would re-serialise the client certificate for nothing).
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    # OPTIONAL, not REQUIRED: a client without a certificate then completes the handshake and can be
    # told "530 5.7.0 client certificate required" inside TLS instead of getting a bare alert.
    ctx.verify_mode = ssl.CERT_NONE if cfg.client_cert == "none" else ssl.CERT_OPTIONAL
    _load_cert_chain(ctx, cfg.cert, cfg.key)
    allowed = set()
    for path in _allow_files(cfg.allow):
        try:
            ders = _pem_to_der(path)
        except (OSError, ValueError) as e:
            raise ConfigError("--allow", f"cannot read certificates from {path!r}: {e}") from None
        if not ders:
            raise ConfigError("--allow", f"{path!r} holds no PEM certificate")
        for der in ders:
            allowed.add(cert_fingerprint(der))
            ctx.load_verify_locations(cadata=der)
    ca_certs: list = []
    if cfg.client_ca:
        try:
            ca_certs = [x509.load_der_x509_certificate(d) for d in _pem_to_der(cfg.client_ca)]
            if not ca_certs:
                raise ValueError("no PEM certificate in it")
            ctx.load_verify_locations(cafile=cfg.client_ca)
        except (OSError, ValueError, ssl.SSLError) as e:
            raise ConfigError("--client-ca", f"cannot load {cfg.client_ca!r}: {e}") from None
    return ctx, ClientPolicy(frozenset(allowed), tuple(ca_certs), cfg.allow_fingerprints)


def certificate_subject(der: bytes) -> str:
    from cryptography import x509

    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


def peer_certificate(transport: asyncio.BaseTransport) -> bytes | None:
    sslobj = transport.get_extra_info("ssl_object")
    return sslobj.getpeercert(binary_form=True) if sslobj is not None else None


def tls_facts(transport: asyncio.BaseTransport) -> dict[str, str]:
    sslobj = transport.get_extra_info("ssl_object")
    if sslobj is None:
        return {}
    cipher = sslobj.cipher()
    facts = {"tls_version": sslobj.version() or "?", "cipher": cipher[0] if cipher else "?"}
    if sslobj.session_reused:
        facts["resumed"] = "yes"
    return facts


# endregion
# region SMTP dialogue, client side (sans-IO) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    def encode(self) -> bytes:
        last = len(self.lines) - 1
        return b"".join(f"{self.code}{' ' if i == last else '-'}{line}\r\n".encode()
                        for i, line in enumerate(self.lines))

    def keywords(self) -> set[str]:
        """EHLO extension keywords (the first word of each line but the first), upper-cased."""
        return {line.split(" ", 1)[0].upper() for line in self.lines[1:] if line}


_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*))?", re.DOTALL)


class ReplyParser:
    """Bytes in, complete SMTP replies out. Bounded: line length and lines per reply."""

    __slots__ = ("_buf", "_lines", "_code")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lines: list[str] = []
        self._code: int | None = None

    @property
    def trailing_data(self) -> bytes:
        """Bytes received but not yet part of a complete reply (a partial line or a reply in progress)."""
        pending = "".join(f"{self._code}-{line}\r\n" for line in self._lines).encode()
        return pending + bytes(self._buf)

    def feed(self, data: bytes) -> list[Reply]:
        """Append ``data`` and return every reply it completes."""
        self._buf += data
        replies = []
        while (reply := self.next_reply()) is not None:
            replies.append(reply)
        return replies

    def next_reply(self, data: bytes = b"") -> Reply | None:
        """Append ``data``; return the next complete reply, or None if more bytes are needed."""
        self._buf += data
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_REPLY_LINE:
                    raise ProtocolError("421 4.5.0 upstream reply line too long", "upstream sent a reply line over the limit")
                return None
            raw = bytes(self._buf[:end]).rstrip(b"\r")
            if len(raw) > MAX_REPLY_LINE:
                raise ProtocolError("421 4.5.0 upstream reply line too long", "upstream sent a reply line over the limit")
            m = _REPLY_LINE.fullmatch(raw)
            if not m:
                raise ProtocolError("421 4.5.0 upstream spoke something other than SMTP",
                                    f"upstream sent a malformed reply line {raw[:60]!r}")
            code = int(m.group(1))
            if self._code is not None and code != self._code:
                raise ProtocolError("421 4.5.0 upstream spoke something other than SMTP",
                                    "upstream changed the reply code inside a multi-line reply")
            del self._buf[: end + 1]
            self._code = code
            self._lines.append((m.group(3) or b"").decode("utf-8", "replace"))
            if m.group(2) == b"-":
                if len(self._lines) >= MAX_REPLY_LINES:
                    raise ProtocolError("421 4.5.0 upstream reply too long", "upstream sent a reply with too many lines")
                continue
            reply = Reply(code, tuple(self._lines))
            self._lines, self._code = [], None
            return reply


class _ClientState(enum.Enum):
    GREETING = "greeting"
    EHLO = "EHLO"
    STARTTLS = "STARTTLS"
    READY = "ready"


class StartTLSClient:
    """The pre-TLS half of an SMTP session, client side: greeting → EHLO → STARTTLS → 220.

    Feed it what the server sends (``receive_data``) and send what it returns. When ``ready`` is
    True, TLS may start, and nothing is left over: bytes after the 220 are an injection attempt
    (CVE-2011-0411 style) and raise instead.
    """

    __slots__ = ("_ehlo", "_parser", "state")

    def __init__(self, ehlo: str = DEFAULT_EHLO) -> None:
        self._ehlo = ehlo
        self._parser = ReplyParser()
        self.state = _ClientState.GREETING

    @property
    def ready(self) -> bool:
        return self.state is _ClientState.READY

    def receive_data(self, data: bytes) -> bytes:
        """Bytes from the server in; bytes to send back out. Raises ProtocolError."""
        if self.state is _ClientState.READY and data:
            raise ProtocolError("421 4.7.0 upstream sent data before the TLS handshake",
                                "upstream sent bytes after its 220 reply to STARTTLS (response injection); refused")
        out = b""
        reply = self._parser.next_reply(data)
        while reply is not None:
            if out:  # we send one command at a time, so a second reply now was never asked for
                raise ProtocolError("421 4.5.0 upstream sent unexpected replies",
                                    f"upstream sent an unsolicited reply during {self.state.value}")
            out = self._on_reply(reply)
            if self.state is _ClientState.READY:
                if self._parser.trailing_data:
                    raise ProtocolError("421 4.7.0 upstream sent data before the TLS handshake",
                                        "upstream sent bytes after its 220 reply to STARTTLS "
                                        "(response injection, CVE-2011-0411 style); refused")
                break
            reply = self._parser.next_reply()
        return out

    def _on_reply(self, reply: Reply) -> bytes:
        state = self.state
        if state is _ClientState.GREETING:
            if reply.code != 220:
                raise ProtocolError("421 4.3.0 upstream is not accepting mail",
                                    f"upstream greeted with {reply.code} instead of 220")
            self.state = _ClientState.EHLO
            return f"EHLO {self._ehlo}\r\n".encode()
        if state is _ClientState.EHLO:
            if reply.code != 250:
                raise ProtocolError("421 4.7.0 upstream does not offer STARTTLS",
                                    f"upstream answered EHLO with {reply.code}: no ESMTP, so no STARTTLS")
            if "STARTTLS" not in reply.keywords():
                raise ProtocolError("421 4.7.0 upstream does not offer STARTTLS",
                                    "upstream did not advertise STARTTLS (stripped by the network?); refusing to send in clear")
            self.state = _ClientState.STARTTLS
            return b"STARTTLS\r\n"
        if state is _ClientState.STARTTLS:
            if reply.code != 220:
                raise ProtocolError("421 4.7.0 upstream refused STARTTLS",
                                    f"upstream answered STARTTLS with {reply.code}; refusing to send in clear")
            self.state = _ClientState.READY
            return b""
        raise AssertionError(state)


# endregion
# region SMTP dialogue, server side (sans-IO) ------------------------------------------------------


class _GateState(enum.Enum):
    OPEN = "open"
    STARTTLS = "starttls"  # the 220 to STARTTLS is out: TLS starts now
    HANDOVER = "handover"  # --starttls-optional: a client staying in clear sent a mail command
    CLOSED = "closed"


class SMTPGate:
    """The part of SMTP certproxy server speaks itself: before TLS (offering only STARTTLS), or
    after TLS to a client it will not let through (``refusal`` answers every mail command).

    Bytes in (``receive_data``), bytes out. Bounded: line length, errors, commands. At STARTTLS,
    anything already buffered behind the command is an injection attempt (CVE-2011-0411) and
    raises ProtocolError: nothing pipelined in clear may ever be read as if it came inside TLS.

    With ``optional`` (--starttls-optional), a client that stays in clear and sends a mail command
    ends the dialogue in HANDOVER: ``helo`` is its last EHLO/HELO line and ``pending`` that command
    with whatever followed it, to be replayed to the untrusted backend.
    """

    __slots__ = ("hostname", "refusal", "optional", "state", "_buf", "errors", "commands", "reason", "helo",
                 "pending", "_raw", "refused_clear")

    def __init__(self, hostname: str, *, refusal: str | None = None, optional: bool = False) -> None:
        self.hostname = hostname
        self.refusal = refusal
        self.optional = optional
        self.helo = b""
        self.pending = b""
        self.refused_clear = False  # a mail command in clear got 530
        self._raw = b""
        self.state = _GateState.OPEN
        self._buf = bytearray()
        self.errors = 0
        self.commands = 0
        self.reason = ""

    def greeting(self) -> bytes:
        return f"220 {self.hostname} ESMTP certproxy\r\n".encode()

    def receive_data(self, data: bytes) -> bytes:
        if self.state is not _GateState.OPEN:
            raise ProtocolError("421 4.7.0 protocol violation", "client sent data after the dialogue ended")
        self._buf += data
        out = []
        while self.state is _GateState.OPEN:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_COMMAND_LINE:
                    return self._close(out, "500 5.5.2 line too long", "client sent a command line over 512 octets")
                break
            if end + 1 > MAX_COMMAND_LINE:
                return self._close(out, "500 5.5.2 line too long", "client sent a command line over 512 octets")
            self._raw = bytes(self._buf[: end + 1])
            line = self._raw[:-1].rstrip(b"\r")
            del self._buf[: end + 1]
            out.append(self._command(line))
            self.commands += 1
            if self.state is _GateState.STARTTLS and self._buf:
                raise ProtocolError("421 4.7.0 pipelined data after STARTTLS; closing",
                                    f"client sent {len(self._buf)} bytes behind STARTTLS before the TLS handshake "
                                    "(command injection, CVE-2011-0411); closed")
            if self.errors >= MAX_DIALOGUE_ERRORS:
                return self._close(out, "421 4.7.0 too many errors", "client made too many errors")
            if self.commands >= MAX_DIALOGUE_COMMANDS and self.state is _GateState.OPEN:
                return self._close(out, "421 4.7.0 too many commands", "client sent too many commands")
        return b"".join(out)

    def _close(self, out: list[bytes], reply: str, reason: str) -> bytes:
        self.state = _GateState.CLOSED
        self._buf.clear()
        self.reason = reason
        out.append(reply.encode() + b"\r\n")
        return b"".join(out)

    def _command(self, line: bytes) -> bytes:
        # Only SP and TAB count as blanks: str.strip() would also eat \xa0 and friends, and then what is
        # replayed to a backend (--starttls-optional) would not be what was judged here.
        verb, _, arg = line.decode("latin-1").strip(" \t").partition(" ")
        verb, arg = verb.upper(), arg.strip()
        host = self.hostname
        if verb in ("EHLO", "HELO"):
            if not arg:
                self.errors += 1
                return f"501 5.5.4 Syntax: {verb} hostname\r\n".encode()
            self.helo = self._raw
            if verb == "EHLO" and self.refusal is None:
                # Only STARTTLS: nothing that invites pipelining or anything else before TLS.
                return f"250-{host}\r\n250 STARTTLS\r\n".encode()
            return f"250 {host}\r\n".encode()
        if verb in ("NOOP", "RSET"):
            return b"250 2.0.0 Ok\r\n"
        if verb == "QUIT":
            self.state = _GateState.CLOSED
            self.reason = f"{self.reason}; the client quit" if self.reason else "client quit"
            return b"221 2.0.0 Bye\r\n"
        if verb == "STARTTLS" and self.refusal is None:
            if arg:
                self.errors += 1
                return b"501 5.5.4 Syntax: STARTTLS takes no arguments\r\n"
            self.state = _GateState.STARTTLS
            return b"220 2.0.0 Ready to start TLS\r\n"
        if self.optional and self.refusal is None and verb != "STARTTLS":
            self.state = _GateState.HANDOVER
            self.pending = self._raw + bytes(self._buf)
            self._buf.clear()
            return b""
        self.errors += 1
        if self.refusal is not None:
            return self.refusal.encode() + b"\r\n"
        if verb == "STARTTLS":
            return b"554 5.5.1 TLS already active\r\n"
        self.refused_clear = True
        self.reason = f"{verb or 'empty line'} in clear refused (530 Must issue a STARTTLS command first)"
        return b"530 5.7.0 Must issue a STARTTLS command first\r\n"


class HideExtensions:
    """Filters what the MTA says to a client that is inside TLS already: in an EHLO reply, STARTTLS
    would be a lie there, and XCLIENT / XFORWARD are meant for certproxy (the MTA trusts our address
    with them), not for the client. The MTA-to-client direction carries only replies (mail flows the
    other way), so parsing it costs little; a reply beyond the limits ends the filtering and passes
    through as it is. It also remembers the last complete reply code, so that when the MTA hangs up
    the splice knows whether the client is owed a 421 (see _Splice.server_gone)."""

    __slots__ = ("_buf", "done", "_lines", "hidden", "last_code")
    HIDDEN = frozenset((b"STARTTLS", b"XCLIENT", b"XFORWARD"))

    def __init__(self, hidden: frozenset[bytes] = HIDDEN) -> None:
        self._buf = bytearray()
        self._lines: list[bytes] = []
        self.done = False
        self.hidden = hidden
        self.last_code = 0  # of the last complete reply passed on; 0: none yet

    @property
    def between_replies(self) -> bool:
        """Nothing of a reply is half passed on: a reply of our own would not be spliced into one."""
        return not self.done and not self._buf and not self._lines

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return data
        self._buf += data
        out = []
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > MAX_REPLY_LINE or len(self._lines) > MAX_REPLY_LINES:
                    self.done = True  # not a reply we understand: stop filtering, pass it all on
                    out += self._lines
                    out.append(bytes(self._buf))
                    self._lines, self._buf = [], bytearray()
                return b"".join(out)
            line = bytes(self._buf[: end + 1])
            del self._buf[: end + 1]
            self._lines.append(line)
            if line[3:4] != b"-":  # the reply is complete
                out += self._strip(self._lines)
                self.last_code = int(line[:3]) if line[:3].isdigit() else -1
                self._lines = []

    def _strip(self, lines: list[bytes]) -> list[bytes]:
        if len(lines) < 2 or not lines[0].startswith(b"250") or not self.hidden:
            return lines
        kept = [lines[0]] + [ln for ln in lines[1:] if ln[4:].split(b" ", 1)[0].strip().upper()
                             not in self.hidden]
        if len(kept) < len(lines) and kept[-1][3:4] == b"-":
            kept[-1] = kept[-1][:3] + b" " + kept[-1][4:]
        return kept


Address = tuple[str, int]  # (ip, port) of one end of a TCP connection

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_PROXY_V1 = 107  # the PROXY protocol spec's longest v1 line, CRLF included
MAX_PROXY_V2 = 16 + 536  # header + the largest address block with TLVs we accept


def _same_family(src: Address, dst: Address) -> tuple[ipaddress._BaseAddress, ipaddress._BaseAddress] | None:
    a, b = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if a.version != b.version:  # an IPv4 client on a dual-stack socket: say it as IPv4 if we can
        a = getattr(a, "ipv4_mapped", None) or a
        b = getattr(b, "ipv4_mapped", None) or b
    return (a, b) if a.version == b.version else None


def proxy_header(version: str, src: Address, dst: Address) -> bytes:
    """The PROXY protocol header (haproxy's proxy-protocol.txt) telling a backend that the connection
    it sees really comes from ``src`` and was made to ``dst``."""
    pair = _same_family(src, dst)
    if version == "v1":
        if pair is None:
            return b"PROXY UNKNOWN\r\n"
        a, b = pair
        return f"PROXY TCP{a.version} {a} {b} {src[1]} {dst[1]}\r\n".encode()
    if pair is None:
        return PROXY_V2_SIGNATURE + b"\x20\x00\x00\x00"  # LOCAL: no address to give
    a, b = pair
    body = a.packed + b.packed + src[1].to_bytes(2, "big") + dst[1].to_bytes(2, "big")
    family = b"\x11" if a.version == 4 else b"\x21"  # TCP over IPv4 / IPv6
    return PROXY_V2_SIGNATURE + b"\x21" + family + len(body).to_bytes(2, "big") + body


def parse_proxy_header(data: bytes) -> tuple[int, Address | None, Address | None] | None:
    """A PROXY v1 or v2 header at the start of ``data``: (its length, source, destination), the
    addresses None for LOCAL/UNKNOWN; None if more bytes are needed. Raises ValueError if it is not one."""
    if data[:12] == PROXY_V2_SIGNATURE[: len(data[:12])] and len(data) < 16:
        return None
    if data.startswith(PROXY_V2_SIGNATURE):
        ver_cmd, family, length = data[12], data[13], int.from_bytes(data[14:16], "big")
        if ver_cmd >> 4 != 2 or ver_cmd & 0xF not in (0, 1) or 16 + length > MAX_PROXY_V2:
            raise ValueError("bad PROXY v2 header")
        if len(data) < 16 + length:
            return None
        body = data[16: 16 + length]
        if ver_cmd & 0xF == 0 or family not in (0x11, 0x21):  # LOCAL (health check), or not TCP/IP
            return 16 + length, None, None
        size = 4 if family == 0x11 else 16
        if length < 2 * size + 4:
            raise ValueError("short PROXY v2 address block")
        a, b = ipaddress.ip_address(body[:size]), ipaddress.ip_address(body[size: 2 * size])
        ports = body[2 * size: 2 * size + 4]
        return 16 + length, (str(a), int.from_bytes(ports[:2], "big")), (str(b), int.from_bytes(ports[2:], "big"))
    if not b"PROXY "[: len(data)] == data[:6]:
        raise ValueError("no PROXY header")
    end = data.find(b"\r\n", 0, MAX_PROXY_V1)
    if end < 0:
        if len(data) >= MAX_PROXY_V1:
            raise ValueError("PROXY v1 line too long")
        return None
    fields = data[:end].decode("ascii", "replace").split(" ")
    if fields[1:2] == ["UNKNOWN"]:
        return end + 2, None, None
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ValueError("bad PROXY v1 line")
    if not all(re.fullmatch(r"[0-9A-Fa-f.:]{2,45}", f) for f in fields[2:4]) or \
            not all(re.fullmatch(r"0|[1-9][0-9]{0,4}", f) for f in fields[4:6]):
        raise ValueError("bad PROXY v1 addresses")
    try:
        a, b = ipaddress.ip_address(fields[2]), ipaddress.ip_address(fields[3])
        sp, dp = int(fields[4]), int(fields[5])
    except ValueError:
        raise ValueError("bad PROXY v1 addresses") from None
    if f"TCP{a.version}" != fields[1] or a.version != b.version or not (0 <= sp < 65536 and 0 <= dp < 65536):
        raise ValueError("bad PROXY v1 addresses")
    return end + 2, (str(a), sp), (str(b), dp)


def xtext(value: str) -> str:
    """RFC 3461 xtext, which XCLIENT attribute values use."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
                   for c in value)


def xclient_command(offered: set[str], src: Address, login: str | None) -> bytes:
    """The XCLIENT command (Postfix's XCLIENT_README) telling the MTA the real client: its address
    and port, no reverse name (we did not look one up), and who its certificate says it is."""
    ip = ipaddress.ip_address(src[0])
    ip = getattr(ip, "ipv4_mapped", None) or ip
    if not re.fullmatch(r"[0-9A-Fa-f.:]+", str(ip)):  # no IPv6 scope, nothing that could end the line
        raise ProtocolError("", f"client address {str(ip)!r} cannot go into XCLIENT")
    attrs = [f"ADDR={'IPV6:' if ip.version == 6 else ''}{ip}"]
    if "PORT" in offered:
        attrs.append(f"PORT={src[1]}")
    if "NAME" in offered:
        attrs.append("NAME=[UNAVAILABLE]")
    if login is not None and "LOGIN" in offered:
        attrs.append(f"LOGIN={xtext(login)}")
    return ("XCLIENT " + " ".join(attrs) + "\r\n").encode()


# endregion
# region The splice -------------------------------------------------------------------------------


class _Pump(asyncio.Protocol):
    """One side of a spliced pair. Knows nothing about SMTP: bytes in here go out of ``peer``.

    Data arriving before the pair is linked is held (and reading paused) until ``link``.
    Backpressure: when our transport's write buffer is full, the peer stops reading.
    """

    __slots__ = ("transport", "peer", "held", "nbytes", "lost", "eof", "plain", "waiter", "filter", "_splice",
                 "_released")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pump | None = None
        self.held: list[bytes] = []
        self.nbytes = 0
        self.lost = False
        self.eof = False
        self.plain = True  # a TCP transport that can half-close, as opposed to TLS
        self.waiter: asyncio.Future[None] | None = None  # woken by held data or loss, before linking
        self.filter: HideExtensions | None = None  # rewrites what we receive until it says done
        self._splice: _Splice | None = None
        self._released = False

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait_held(self) -> None:
        """Until data has been held or the connection is gone (only before linking)."""
        if self.held or self.lost or self.eof:
            return
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.resume_reading()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.plain = transport.get_extra_info("sslcontext") is None
        if self.held:  # start_tls() delivered data before it returned the transport
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        if self.filter is not None:
            data = self.filter.feed(data)
            if self.filter.done:
                self.filter = None
            if not data:
                return
        peer = self.peer
        if peer is None or peer.transport is None:
            self.held.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
            self._wake()
            return
        self._splice.touch()
        peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        peer, splice = self.peer, self._splice
        if splice is not None and self is splice.b:
            splice.server_gone()
        if peer is not None and splice is not None and not peer.lost:
            if peer.eof:
                splice.close()  # both have said all they will: done
            elif peer.transport.can_write_eof():
                peer.transport.write_eof()
            elif self is splice.b or self.nbytes == 0:
                # The server side is done talking, or a client that never said anything left: TLS
                # cannot pass on a half-close, and nobody is owed an answer.
                splice.close()
            else:
                splice.linger()  # the client is done talking; the server may still answer
        # Keep a plain side open: the other direction may still have bytes for it. (asyncio's TLS
        # transports close on EOF whatever we answer, and warn if we answer True.)
        return self.plain

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.lost:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.lost:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()
        peer = self.peer
        if self._splice is not None and self is self._splice.b:
            self._splice.server_gone()
        if peer is not None and not peer.lost and peer.transport is not None:
            peer.transport.close()  # flushes what is buffered for it first
        if self._splice is not None:
            self._splice.side_lost()
        if self._released:
            self.transport = None


async def _pull(pump: _Pump) -> bytes:
    """The next bytes a not-yet-linked pump received; b"" when the peer has closed."""
    await pump.wait_held()
    data = b"".join(pump.held)
    pump.held.clear()
    return data


def _close_all(*pumps: _Pump | None) -> None:
    """Whatever a session ends with, none of its transports outlives it."""
    for p in pumps:
        if p is not None and p.transport is not None and not p.lost and not p.transport.is_closing():
            p.transport.close()


def _release(*pumps: _Pump | None) -> None:
    """Break the reference cycles a session made (pump <-> transport, pump <-> peer, pump <-> splice)
    once it has ended, so that its memory, TLS buffers included, is freed at once rather than at some
    full garbage collection; with uvloop a cycle through a transport was never freed at all (RSS grew
    by about 1.5 MB per 1000 sessions without this)."""
    for p in pumps:
        if p is None:
            continue
        splice = p._splice
        if splice is not None:
            splice.release()
        p.peer = p._splice = p.filter = p.waiter = None
        p.held = []
        p._released = True
        if p.lost:
            p.transport = None


async def _goodbye(pump: _Pump, reply: str | bytes) -> None:
    """Send a last reply and close without losing it: half-close, then discard what the peer still
    sends for a moment (closing with unread input makes the kernel send a reset, which can destroy
    the reply in flight)."""
    t = pump.transport
    if t is None or pump.lost or t.is_closing():
        return
    if reply:
        t.write(reply if isinstance(reply, bytes) else reply.encode() + b"\r\n")
    if t.can_write_eof():
        t.write_eof()
        try:
            async with asyncio.timeout(GOODBYE_LINGER_S):
                while await _pull(pump):
                    pass
        except (TimeoutError, asyncio.TimeoutError):
            pass
    t.close()


class _Splice:
    """Two linked pumps, an idle timer, and a future that completes when both sides are closed.
    ``a`` is the side that connected to us, ``b`` the side we dialed (the SMTP server)."""

    def __init__(self, a: _Pump, b: _Pump, idle: float) -> None:
        self.a, self.b = a, b
        self.idle = idle
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self.last = self.loop.time()
        self.outcome = "ok"
        self._timer = self.loop.call_later(idle, self._check_idle)
        self._linger: asyncio.TimerHandle | None = None
        self.watch = b.filter  # the server's replies, as far as they were followed
        self._server_gone = False
        a.peer, b.peer = b, a
        a._splice = b._splice = self
        for side in (a, b):
            held, side.held = side.held, []
            if held:
                side.peer.transport.writelines(held)
            if not side.lost:
                side.transport.resume_reading()
        for side in (a, b):
            if side.lost:
                side.connection_lost(None)

    def touch(self) -> None:
        self.last = self.loop.time()

    def server_gone(self) -> None:
        """The SMTP server hung up (closed, or the connection broke). Unless its last reply was a
        goodbye (221, 421), the client may be waiting for an answer — say, to the end of DATA — and
        must learn that nothing after the last reply was accepted: 421, as an MTA would say itself."""
        if self._server_gone:
            return
        self._server_gone = True
        a, w = self.a, self.watch
        if w is None or not w.between_replies or w.last_code in (221, 421):
            return
        if a.lost or a.transport is None or a.transport.is_closing():
            return
        a.transport.write(SERVER_GONE_REPLY)

    def _check_idle(self) -> None:
        due = self.last + self.idle - self.loop.time()
        if due > 0:
            self._timer = self.loop.call_later(due, self._check_idle)
            return
        self.outcome = "idle-timeout"
        self.abort()

    def linger(self) -> None:
        if self._linger is None:
            self._linger = self.loop.call_later(CLOSE_LINGER_S, self.close)

    def close(self) -> None:
        for side in (self.a, self.b):
            if not side.lost and side.transport is not None:
                side.transport.close()

    def abort(self) -> None:
        for side in (self.a, self.b):
            if not side.lost and side.transport is not None:
                side.transport.abort()

    def release(self) -> None:
        self._timer.cancel()
        if self._linger is not None:
            self._linger.cancel()
        if not self.done.done():
            self.done.cancel()
        self.a = self.b = self.watch = None

    def side_lost(self) -> None:
        if self.a is None:
            return
        if self.a.lost and self.b.lost and not self.done.done():
            self._timer.cancel()
            if self._linger is not None:
                self._linger.cancel()
            self.done.set_result(None)


# endregion
# region Client mode: dialing the upstream ---------------------------------------------------------


class _DialogueProtocol(asyncio.Protocol):
    """Drives a StartTLSClient over a plain transport until it is ready for TLS or fails."""

    def __init__(self, dialogue: StartTLSClient) -> None:
        self.dialogue = dialogue
        self.transport: asyncio.Transport | None = None
        self.result: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.result.done():
            return
        try:
            out = self.dialogue.receive_data(data)
        except SessionError as e:
            self.transport.pause_reading()
            self.result.set_exception(e)
            return
        if out:
            self.transport.write(out)
        if self.dialogue.ready:
            self.transport.pause_reading()  # nothing more may be read in clear
            self.result.set_result(None)

    def eof_received(self) -> bool:
        self._fail("upstream closed the connection during the pre-TLS dialogue")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail("upstream closed the connection during the pre-TLS dialogue")

    def _fail(self, reason: str) -> None:
        if not self.result.done():
            self.result.set_exception(SessionError("421 4.4.2 upstream closed the connection", reason))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


async def _read_reply(pump: _Pump, *, keep: bool, who: str) -> Reply | None:
    """One complete reply from a not-yet-linked pump; None if the peer closed first.

    With ``keep`` the bytes stay held, to be passed on at the splice; otherwise the reply is
    consumed, and anything behind it (a reply nobody asked for) raises ProtocolError.
    """
    parser = ReplyParser()
    seen = bytearray()
    reply = None
    while reply is None:
        data = await _pull(pump)
        if not data:
            return None
        seen += data
        reply = parser.next_reply(data)
    if keep:
        pump.held.append(bytes(seen))
    elif parser.trailing_data:
        raise ProtocolError("421 4.5.0 unexpected replies", f"{who} sent more than the one reply expected")
    return reply


class _Upstream:
    """A verified TLS connection to one upstream, ready to splice."""

    def __init__(self, transport: asyncio.Transport, pump: _Pump, facts: dict[str, str]) -> None:
        self.transport, self.pump, self.facts = transport, pump, facts


async def _open_upstream(cfg: ClientConfig, ctx: ssl.SSLContext, up: Upstream) -> _Upstream:
    """Connect, negotiate STARTTLS if needed, handshake, verify the pin, and hear the server speak
    inside TLS. Raises SessionError (with the 421 owed to the local client)."""
    ep = up.endpoint
    pump = _Pump()
    try:
        transport = await _tls_connect(ctx, up, pump, sni=cfg.server_name or ep.host, ehlo=cfg.ehlo,
                                       to=cfg.timeouts)
        facts = _verify_server(cfg, ep, transport)
        # TLS 1.3 finishes the client's handshake before the server has judged our certificate; a
        # refusal arrives as an alert afterwards. So wait for the server's first words inside TLS:
        # the greeting (implicit TLS, passed on to the client) or the reply to a NOOP (STARTTLS).
        async with asyncio.timeout(cfg.timeouts.dialogue):
            if up.mode is TLSMode.STARTTLS:
                transport.write(b"NOOP\r\n")
            reply = await _read_reply(pump, keep=up.mode is TLSMode.IMPLICIT, who=f"upstream {ep}")
        if reply is None:
            raise SessionError("421 4.7.0 upstream closed the TLS session",
                               f"{ep}: upstream closed the connection right after the TLS handshake; "
                               "it probably does not accept our client certificate")
        if up.mode is TLSMode.STARTTLS and reply.code // 100 != 2:
            raise SessionError("421 4.3.0 upstream is not accepting mail",
                               f"{ep}: upstream answered NOOP inside TLS with {reply.code}")
        return _Upstream(transport, pump, facts)
    except BaseException as e:
        if pump.transport is not None:
            pump.transport.abort()
        if isinstance(e, SessionError):
            raise
        if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
            raise SessionError("421 4.4.2 upstream timed out", f"{ep}: timed out") from None
        if isinstance(e, ssl.SSLError):
            raise SessionError("421 4.7.0 TLS with upstream failed", f"{ep}: {_describe(e)}") from None
        if isinstance(e, OSError):
            raise SessionError("421 4.4.1 upstream unreachable", f"{ep}: {_describe(e)}") from None
        raise


async def _tls_connect(ctx: ssl.SSLContext, up: Upstream, pump: _Pump, *, sni: str, ehlo: str,
                       to: Timeouts) -> asyncio.Transport:
    """TCP connect; for STARTTLS the pre-TLS dialogue; the TLS handshake. ``pump`` gets the TLS transport."""
    loop = asyncio.get_running_loop()
    ep = up.endpoint
    if up.mode is TLSMode.IMPLICIT:
        async with asyncio.timeout(to.connect + to.handshake):
            transport, _ = await loop.create_connection(lambda: pump, ep.host, ep.port, ssl=ctx, server_hostname=sni,
                                                        ssl_handshake_timeout=to.handshake,
                                                        ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT_S)
        return transport
    dialogue = StartTLSClient(ehlo)
    async with asyncio.timeout(to.connect):
        plain, proto = await loop.create_connection(lambda: _DialogueProtocol(dialogue), ep.host, ep.port)
    try:
        async with asyncio.timeout(to.dialogue):
            await proto.result
    except SessionError:
        if not plain.is_closing():
            plain.write(b"QUIT\r\n")  # the only thing we ever send after a failed dialogue
        plain.close()
        raise
    except BaseException:
        plain.abort()
        raise
    try:
        async with asyncio.timeout(to.handshake):
            transport = await loop.start_tls(plain, pump, ctx, server_hostname=sni,
                                             ssl_handshake_timeout=to.handshake,
                                             ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT_S)
    except BaseException:
        plain.abort()
        raise
    pump.connection_made(transport)
    return transport


def _verify_server(cfg: ClientConfig, ep: Endpoint, transport: asyncio.Transport) -> dict[str, str]:
    """Check the pin (the CA, if any, was checked by OpenSSL). Returns the TLS facts for the log line."""
    der = peer_certificate(transport)
    if der is None:
        raise PeerRejected("421 4.7.0 upstream certificate not trusted", f"{ep}: no server certificate")
    fp = format_fingerprint(cert_fingerprint(der))
    if cfg.pins.digests and not cfg.pins.match(der):
        raise PeerRejected(
            "421 4.7.0 upstream certificate not trusted",
            f"{ep}: server certificate does not match any --pin; it presented sha256 {fp} "
            f"(spki {format_fingerprint(spki_fingerprint(der))}); if you expected this change, "
            f"add --pin {fp}",
        )
    return {**tls_facts(transport), "server_fp": fp}


# endregion
# region Client mode: the service -----------------------------------------------------------------

_session_ids = itertools.count(1)
_WORKER: int | None = None  # with --workers N: this process's number, in every session line
_REUSE_PORT = False  # with --workers N: every worker binds the same port (SO_REUSEPORT)


def _kv(**facts: object) -> str:
    """``key=value`` pairs, quoted where needed, in a stable order: what operators grep."""
    out = []
    for k, v in facts.items():
        if v is None or v == "":
            continue
        s = str(v)
        if not s or any(c in s for c in ' "=\t'):
            s = '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(f"{k}={s}")
    return " ".join(out)


def _log_event(level: int, event: str, **facts: object) -> None:
    """One line, ``event key=value ...``; the facts also ride along for the JSON formatter."""
    facts = {k: v for k, v in facts.items() if v is not None and v != ""}
    log.log(level, "%s %s", event, _kv(**facts), extra={"event": event, "facts": facts})


class _JsonFormatter(logging.Formatter):
    """``--log-format json``: one JSON object per line, the same keys as the text lines."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        out = {"time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(),
               "level": record.levelname.lower()}
        if hasattr(record, "event"):
            out["event"] = record.event
            out.update({k: v if isinstance(v, (int, float, bool)) else str(v) for k, v in record.facts.items()})
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _listening_socket(ep: Endpoint, *, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
    return socket.create_server((ep.host, ep.port), family=family, backlog=LISTEN_BACKLOG, reuse_port=reuse_port)


def _cannot_listen(ep: Endpoint, e: OSError) -> str:
    return f"cannot listen on {ep}: {e.strerror or e}"


def _port_problem(ep: Endpoint) -> str:
    """Why a listener could not be opened on ``ep`` right now (taken, not our address), or ""."""
    try:
        _listening_socket(ep).close()
    except OSError as e:
        return _cannot_listen(ep, e)
    return ""


class _Listener:
    """What both services share: a listening socket, an accept loop with a connection limit, and
    the live session tasks. Sockets are accepted raw, so each session decides how its transport
    starts (plain, or implicit TLS whose handshake errors it catches and logs itself)."""

    def __init__(self, listen: Endpoint, max_connections: int, busy_reply: bytes | None) -> None:
        self.listen = listen
        self.max_connections = max_connections
        self.max_per_ip = 0
        self.per_ip: dict[str, int] = {}
        self.busy_reply = busy_reply
        self.sock: socket.socket | None = None
        self.active: set[asyncio.Task] = set()
        self._accepting: asyncio.Task | None = None
        self._watching: asyncio.Task | None = None

    def _certificate_files(self) -> list[tuple[str, str]]:
        """(option, path) of every certificate file this service relies on, for the expiry watch."""
        return []

    async def _watch_expiry(self) -> None:
        """At start-up and daily: a warning when a configured certificate expires within 30 days,
        an error once it has."""
        while True:
            for option, path in self._certificate_files():
                try:
                    ders = _pem_to_der(path)
                except (OSError, ValueError):
                    continue
                for der in ders:
                    problem = expiry_problem(der)
                    if problem:
                        level = logging.ERROR if problem.startswith("EXPIRED") else logging.WARNING
                        _log_event(level, "certificate", service=self.service_name, option=option, file=path,
                                   subject=certificate_subject(der), problem=problem,
                                   action="renew it (certproxy gencert ... --force)")
            await asyncio.sleep(86400)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    @property
    def service_name(self) -> str:
        return self.cfg.name

    def replace(self, new: _Listener) -> None:
        """Take over ``new``'s settings (a reload): later connections use them; live ones keep theirs."""
        self.__dict__.update({k: v for k, v in new.__dict__.items()
                              if k not in ("sock", "active", "per_ip", "_accepting", "_watching")})

    async def _listen(self) -> None:
        try:
            self.sock = _listening_socket(self.listen, reuse_port=_REUSE_PORT)
        except OSError as e:
            raise ConfigError("--listen", _cannot_listen(self.listen, e)) from None
        self.sock.setblocking(False)
        loop = asyncio.get_running_loop()
        self._accepting = loop.create_task(self._accept_loop())
        self._watching = loop.create_task(self._watch_expiry())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(self.sock)
            except OSError as e:  # EMFILE and friends: say so, breathe, go on
                log.error("accept failed on %s: %s; check the open-files limit (ulimit -n)", self.listen, e)
                await asyncio.sleep(0.5)
                continue
            sock.setblocking(False)
            ip = addr[0]
            peer = f"[{ip}]:{addr[1]}" if ":" in ip else f"{ip}:{addr[1]}"
            if len(self.active) >= self.max_connections:
                why = f"connection limit ({self.max_connections}) reached; raise --max-connections if this is normal load"
            elif self.max_per_ip and self.per_ip.get(ip, 0) >= self.max_per_ip:
                why = f"per-address limit ({self.max_per_ip}) reached for {ip}; raise --max-per-ip if this is normal"
            else:
                why = ""
            if why:
                try:
                    if self.busy_reply:
                        sock.send(self.busy_reply)
                except OSError:
                    pass
                sock.close()
                _log_event(logging.WARNING, "refused", service=self.service_name, peer=peer, outcome="busy",
                           reason=why)
                continue
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
            task = loop.create_task(self._session(sock, peer))
            self.active.add(task)
            task.add_done_callback(lambda t, ip=ip: self._done(t, ip))

    def _done(self, task: asyncio.Task, ip: str) -> None:
        self.active.discard(task)
        left = self.per_ip.pop(ip, 1) - 1
        if left > 0:
            self.per_ip[ip] = left

    async def _session(self, sock: socket.socket, peer: str) -> None:
        raise NotImplementedError

    async def stop(self, grace: float = 0) -> None:
        """Stop accepting; give live sessions ``grace`` seconds to finish; then cut the rest."""
        for task in (self._accepting, self._watching):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.sock is not None:
            self.sock.close()
        if grace > 0 and self.active:
            await asyncio.wait(list(self.active), timeout=grace)
        for task in list(self.active):
            task.cancel()
        if self.active:
            await asyncio.gather(*self.active, return_exceptions=True)


async def _adopt(sock: socket.socket) -> _Pump:
    """A plain transport for an accepted socket; what the peer sends is held until asked for."""
    pump = _Pump()
    await asyncio.get_running_loop().connect_accepted_socket(lambda: pump, sock)
    pump.transport.pause_reading()
    return pump


class ClientService(_Listener):
    """Listens for plain SMTP clients and carries each session to a pinned upstream over TLS."""

    def __init__(self, cfg: ClientConfig) -> None:
        super().__init__(cfg.listen, cfg.max_connections,
                         b"421 4.7.0 certproxy: too many connections, try again later\r\n")
        self.cfg = cfg
        self.ctx = client_context(cfg)

    def _certificate_files(self) -> list[tuple[str, str]]:
        return [("--cert", self.cfg.cert)] + ([("--ca", self.cfg.ca)] if self.cfg.ca else [])

    async def start(self) -> None:
        await self._listen()
        ups = ", ".join(f"{u.endpoint} ({u.mode.value})" for u in self.cfg.upstreams)
        _log_event(logging.INFO, "listening", service=self.service_name, role="client",
                   listen=f"{self.listen.host}:{self.port}", upstreams=ups)

    async def _session(self, sock: socket.socket, peer: str) -> None:
        sid = next(_session_ids)
        t0 = time.monotonic()
        local = await _adopt(sock)
        facts: dict[str, object] = {}
        outcome, reason = "ok", ""
        upstream: _Upstream | None = None
        try:
            upstream, failures = await self._connect_any()
            if upstream is None:
                last = failures[-1][0]
                local.transport.write(last.reply.encode() + b"\r\n")
                local.transport.close()
                outcome = "refused"
                reason = "; ".join(e.reason for e, _ in failures)
                facts["upstream"] = failures[-1][1]
                return
            if failures:
                facts["failover"] = "; ".join(e.reason for e, _ in failures)
            facts["upstream"] = upstream.facts.pop("upstream")
            facts.update(upstream.facts)
            if local.lost:
                upstream.transport.close()
                outcome, reason = "client-gone", "local client left before the tunnel was up"
                return
            if facts["tls"] == "starttls":
                local.transport.write(
                    f"220 {self.cfg.ehlo} ESMTP certproxy: TLS to {facts['upstream']} verified\r\n".encode())
            upstream.pump.filter = HideExtensions(frozenset())  # only to follow the replies
            splice = _Splice(local, upstream.pump, self.cfg.timeouts.idle)
            await splice.done
            outcome = splice.outcome
        except asyncio.CancelledError:
            outcome, reason = "cancelled", "service stopping"
            for p in (local, upstream.pump if upstream else None):
                if p is not None and p.transport is not None and not p.lost:
                    p.transport.abort()
            raise
        except Exception as e:  # a bug: say so, and lose the session rather than the process
            outcome, reason = "error", f"internal error {type(e).__name__}: {e}"
            log.exception("session id=%d internal error", sid)
            if not local.lost:
                local.transport.write(b"421 4.3.0 certproxy internal error\r\n")
                local.transport.close()
        finally:
            _close_all(local, upstream.pump if upstream else None)
            _log_event(logging.INFO if outcome == "ok" else logging.WARNING, "session", id=sid,
                       service=self.service_name, worker=_WORKER, peer=peer, **facts, bytes_up=local.nbytes,
                       bytes_down=upstream.pump.nbytes if upstream else 0,
                       duration=round(time.monotonic() - t0, 3), outcome=outcome, reason=reason)
            _release(local, upstream.pump if upstream else None)

    async def _connect_any(self) -> tuple[_Upstream | None, list[tuple[SessionError, str]]]:
        failures: list[tuple[SessionError, str]] = []
        for up in self.cfg.upstreams:
            try:
                conn = await _open_upstream(self.cfg, self.ctx, up)
            except SessionError as e:
                failures.append((e, str(up.endpoint)))
                continue
            conn.facts["upstream"] = str(up.endpoint)
            conn.facts["tls"] = "implicit" if up.mode is TLSMode.IMPLICIT else "starttls"
            return conn, failures
        return None, failures


# endregion
# region Server mode: the service -----------------------------------------------------------------


def _address(sockaddr: tuple) -> Address:
    return sockaddr[0], sockaddr[1]


def _show(addr: Address) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


async def _peek(sock: socket.socket, n: int) -> bytes:
    """Up to ``n`` bytes the peer has sent on a raw accepted socket, left unread; waits for some.
    b"" means the peer closed."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return sock.recv(n, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            pass
        ready = loop.create_future()
        loop.add_reader(sock.fileno(), lambda ready=ready: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            loop.remove_reader(sock.fileno())


async def _accept_proxy_header(sock: socket.socket) -> tuple[Address | None, Address | None]:
    """Read exactly the PROXY v1/v2 header a load balancer put in front of the client's bytes."""
    seen, still = -1, 0
    while True:
        data = await _peek(sock, MAX_PROXY_V2)
        if not data:
            raise SessionError("", "the load balancer closed before sending a PROXY header")
        still = still + 1 if len(data) == seen else 0
        seen = len(data)
        if still >= 50:  # half a header and nothing more for 0.5 s (or a FIN behind it)
            raise ProtocolError("", "incomplete PROXY header from a --proxy-from address; closed")
        try:
            parsed = parse_proxy_header(data)
        except ValueError as e:
            raise ProtocolError("", f"connection from a --proxy-from address without a valid PROXY header ({e}); "
                                    "closed") from None
        if parsed is not None:
            n, src, dst = parsed
            sock.recv(n)  # all n bytes are there (peeked): this takes the header and nothing more
            return src, dst
        await asyncio.sleep(0.01)  # a header split across segments: rare, and bounded by the deadline


async def _sniff(sock: socket.socket) -> TLSMode | None:
    """On a port that speaks both: a TLS client sends its ClientHello (first byte 0x16, a TLS
    handshake record) at once, an SMTP client waits for our greeting. Decide as soon as a byte is
    there; with nothing after DUAL_SNIFF_S, greet. None: the client left."""
    try:
        async with asyncio.timeout(DUAL_SNIFF_S):
            first = await _peek(sock, 1)
    except (TimeoutError, asyncio.TimeoutError):
        return TLSMode.STARTTLS
    if not first:
        return None
    return TLSMode.IMPLICIT if first == b"\x16" else TLSMode.STARTTLS


class ServerService(_Listener):
    """Terminates TLS (implicit or STARTTLS), authorises the client certificate, splices to the MTA.

    One connection's life: [PROXY header from a load balancer] → [which TLS, on a dual port] →
    [STARTTLS dialogue] → TLS handshake → authorise and route → backend connect, [PROXY header],
    greeting, [XCLIENT] → splice. Each phase has its own deadline; the session ends in one log line.
    """

    def __init__(self, cfg: ServerConfig) -> None:
        hostname = cfg.hostname or socket.getfqdn() or "localhost"
        # Before TLS we can say we are busy; on an implicit-TLS port only a close is possible (on a
        # dual port a TLS client takes the reply for a broken ServerHello: refused either way).
        busy = f"421 4.7.0 {hostname} too busy, try again later\r\n".encode()
        super().__init__(cfg.listen, cfg.max_connections, None if cfg.mode is TLSMode.IMPLICIT else busy)
        self.cfg = cfg
        self.hostname = hostname
        self.max_per_ip = cfg.max_per_ip
        self.ctx, self.policy = server_context(cfg)

    def _certificate_files(self) -> list[tuple[str, str]]:
        files = [("--cert", self.cfg.cert)] + [("--allow", f) for f in _allow_files(self.cfg.allow)]
        return files + ([("--client-ca", self.cfg.client_ca)] if self.cfg.client_ca else [])

    async def start(self) -> None:
        await self._listen()
        cfg = self.cfg
        _log_event(logging.INFO, "listening", service=self.service_name, role="server",
                   listen=f"{self.listen.host}:{self.port}", mode=cfg.mode.value, backend=cfg.backend and str(cfg.backend),
                   untrusted_backend=cfg.untrusted_backend and str(cfg.untrusted_backend),
                   client_cert=cfg.client_cert, xclient="yes" if cfg.xclient else None,
                   proxy_protocol=cfg.proxy_protocol)

    async def _session(self, sock: socket.socket, peer: str) -> None:
        sid = next(_session_ids)
        t0 = time.monotonic()
        # A reload swaps these; a session keeps the settings it started with.
        cfg, ctx, policy, hostname = self.cfg, self.ctx, self.policy, self.hostname
        facts: dict[str, object] = {"peer": peer}
        outcome, reason = "ok", ""
        backend: _Pump | None = None
        tls_pump = _Pump()
        raw = True  # the socket has no transport yet: closing it is ours to do
        try:
            try:
                src, dst = _address(sock.getpeername()), _address(sock.getsockname())
                async with asyncio.timeout(cfg.timeouts.handshake):
                    if cfg.proxy_from and any(ipaddress.ip_address(src[0]) in net for net in cfg.proxy_from):
                        told_src, told_dst = await _accept_proxy_header(sock)
                        if told_src is not None:
                            facts["peer"], facts["via"] = _show(told_src), peer
                            src, dst = told_src, told_dst
                    mode = cfg.mode if cfg.mode is not TLSMode.EITHER else await _sniff(sock)
            except OSError as e:  # a reset (port probe) before we said or read anything
                outcome, reason = "closed", f"client went away before TLS or SMTP began ({_describe(e)})"
                return
            if mode is None:
                outcome, reason = "closed", "client left before saying anything"
                return
            facts["tls"] = "implicit" if mode is TLSMode.IMPLICIT else "none"  # "starttls" once it has
            raw = False
            gate = None
            if mode is TLSMode.STARTTLS:
                client = tls_pump = await _adopt(sock)
                gate = SMTPGate(hostname, optional=cfg.starttls_optional)
                client.transport.write(gate.greeting())
                if not await self._converse(client, gate, cfg.timeouts.dialogue):
                    outcome = "refused" if gate.refused_clear else "closed"
                    reason = gate.reason or "client left before STARTTLS"
                    return
            handover = gate if gate is not None and gate.state is _GateState.HANDOVER else None
            if handover is not None:
                # --starttls-optional: a client staying in clear is a stranger, whatever it claims.
                facts["cert"] = "none"
                route, login = cfg.untrusted_backend, None
            else:
                tls_pump = await self._handshake(ctx, cfg, tls_pump if gate else None, sock)
                facts["tls"] = "implicit" if gate is None else "starttls"
                facts.update(tls_facts(tls_pump.transport))
                route, login, refusal = self._route(cfg, policy, peer_certificate(tls_pump.transport), facts)
                if route is None:
                    outcome, reason = "refused", refusal[1]
                    await self._refuse(tls_pump, refusal[0], mode, hostname, cfg.timeouts.dialogue)
                    return
            facts["backend"] = str(route)
            backend = await self._open_backend(cfg, tls_pump, route, src, dst, login, mode, hostname, handover)
            backend.filter = HideExtensions()  # the client is inside TLS already: STARTTLS there is a lie
            splice = _Splice(tls_pump, backend, cfg.timeouts.idle)
            await splice.done
            outcome = splice.outcome
        except SessionError as e:
            outcome, reason = "refused" if isinstance(e, (ProtocolError, PeerRejected)) else "failed", e.reason
            await _goodbye(tls_pump, e.reply)
        except (TimeoutError, asyncio.TimeoutError):
            outcome, reason = "timeout", "client too slow (dialogue or handshake deadline)"
            if tls_pump.transport is not None:
                tls_pump.transport.abort()
        except asyncio.CancelledError:
            outcome, reason = "cancelled", "service stopping"
            for p in (tls_pump, backend):
                if p is not None and p.transport is not None and not p.lost:
                    p.transport.abort()
            raise
        except Exception as e:
            outcome, reason = "error", f"internal error {type(e).__name__}: {e}"
            log.exception("session id=%d internal error", sid)
            if tls_pump.transport is not None:
                tls_pump.transport.abort()
        finally:
            if raw:
                sock.close()
            _close_all(tls_pump, backend)
            _log_event(logging.INFO if outcome == "ok" else logging.WARNING, "session", id=sid,
                       service=self.service_name, worker=_WORKER, **facts, bytes_in=tls_pump.nbytes,
                       bytes_out=backend.nbytes if backend else 0,
                       duration=round(time.monotonic() - t0, 3), outcome=outcome, reason=reason)
            _release(tls_pump, backend)

    async def _converse(self, pump: _Pump, gate: SMTPGate, deadline: float) -> bool:
        """Run ``gate`` until STARTTLS (True) or the end of the conversation (False)."""
        async with asyncio.timeout(deadline):  # a total deadline: trickling bytes does not extend it
            while True:
                data = await _pull(pump)
                if not data:
                    return False
                out = gate.receive_data(data)
                if gate.state is _GateState.CLOSED:
                    await _goodbye(pump, out)
                    return False
                if out:
                    pump.transport.write(out)
                if gate.state in (_GateState.STARTTLS, _GateState.HANDOVER):
                    return True  # reading is paused: nothing more is read in clear until decided

    async def _handshake(self, ctx: ssl.SSLContext, cfg: ServerConfig, client: _Pump | None,
                         sock: socket.socket | None = None) -> _Pump:
        """TLS on the STARTTLS connection ``client``, or on the freshly accepted ``sock`` (implicit)."""
        loop = asyncio.get_running_loop()
        pump = _Pump()
        hs = cfg.timeouts.handshake
        try:
            async with asyncio.timeout(hs):
                if client is not None:
                    transport = await loop.start_tls(client.transport, pump, ctx, server_side=True,
                                                     ssl_handshake_timeout=hs,
                                                     ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT_S)
                else:
                    transport, _ = await loop.connect_accepted_socket(lambda: pump, sock, ssl=ctx,
                                                                      ssl_handshake_timeout=hs,
                                                                      ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT_S)
        except BaseException as e:
            if client is not None:
                client.transport.abort()
            elif pump.transport is None:
                sock.close()
            if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
                raise SessionError("", "TLS handshake timed out") from None
            if not isinstance(e, (OSError, ssl.SSLError)):
                raise
            if not isinstance(e, ssl.SSLError):  # a reset or EOF: a port probe, or a client giving up
                raise SessionError("", f"client closed the connection during the TLS handshake ({_describe(e)})") \
                    from None
            hint = " (an unknown client certificate fails here: add it with --allow, or issue it from --client-ca)" \
                if "CERTIFICATE" in str(e.reason or e).upper() else ""
            raise PeerRejected("", f"TLS handshake failed: {_describe(e)}{hint}") from None
        pump.connection_made(transport)
        return pump

    @staticmethod
    def _route(cfg: ServerConfig, policy: ClientPolicy, der: bytes | None,
               facts: dict[str, object]) -> tuple[Endpoint | None, str | None, tuple[str, str]]:
        """Where a client that presented ``der`` goes: (backend, its name for XCLIENT, ("", "")), or
        (None, None, (reply, log reason)) when it is refused. Only an allowed certificate reaches
        --backend; under --client-cert optional everyone else goes to --untrusted-backend."""
        if der is None:
            refusal = ("530 5.7.0 client certificate required", "no client certificate")
            facts["cert"] = "none"
        else:
            verdict = policy.judge(der)
            facts["cert_subject"], facts["cert_fp"] = verdict.subject, verdict.fingerprint
            if verdict.allowed:
                facts["cert"] = "allowed"
                facts["cert_name"] = verdict.name
                return cfg.backend, verdict.name, ("", "")
            refusal = ("554 5.7.1 certificate not authorised", verdict.why)
            facts["cert"] = "refused"
        if cfg.client_cert != "required":
            if cfg.client_cert == "optional":
                facts["untrusted"] = refusal[1]
            return cfg.untrusted_backend, None, ("", "")
        return None, None, refusal

    async def _refuse(self, pump: _Pump, reply: str, mode: TLSMode, hostname: str, deadline: float) -> None:
        """Tell a TLS client without an allowed certificate why, in SMTP, then hang up."""
        gate = SMTPGate(hostname, refusal=reply)
        if mode is TLSMode.IMPLICIT:
            pump.transport.write(gate.greeting())
        try:
            await self._converse(pump, gate, deadline)
        except (TimeoutError, asyncio.TimeoutError):
            pass
        except ProtocolError as e:
            await _goodbye(pump, e.reply)
        if not pump.lost:
            pump.transport.close()

    async def _open_backend(self, cfg: ServerConfig, client: _Pump, ep: Endpoint, src: Address, dst: Address,
                            login: str | None, mode: TLSMode, hostname: str, handover: SMTPGate | None = None) -> _Pump:
        """Connect to the MTA, [PROXY header], consume its greeting, [XCLIENT]. In implicit TLS the
        client has heard nothing yet, so the MTA's (last) greeting becomes the client's. A
        ``handover`` (a client in clear under --starttls-optional) has talked to us already: its
        EHLO/HELO is replayed and the reply swallowed, then its pending command goes on."""
        loop = asyncio.get_running_loop()
        pump = _Pump()
        who = f"backend {ep}"
        try:
            async with asyncio.timeout(cfg.timeouts.connect):
                await loop.create_connection(lambda: pump, ep.host, ep.port)
            if cfg.proxy_protocol:
                pump.transport.write(proxy_header(cfg.proxy_protocol, src, dst))
            async with asyncio.timeout(cfg.timeouts.dialogue):
                greeting = await _read_reply(pump, keep=False, who=who)
                if greeting is None or greeting.code != 220:
                    raise ProtocolError("", "closed the connection" if greeting is None
                                        else f"greeted with {greeting.code} {greeting.lines[0]}")
                if cfg.xclient:
                    greeting = await self._xclient(pump, hostname, src, login)
                if handover is not None and handover.helo:
                    pump.transport.write(handover.helo)
                    reply = await _read_reply(pump, keep=False, who=who)
                    if reply is None or reply.code // 100 != 2:
                        got = "closed the connection" if reply is None else f"{reply.code} {reply.lines[0]}"
                        raise ProtocolError("", f"refused the client's replayed "
                                                f"{handover.helo[:4].decode('latin-1')}: {got}")
        except BaseException as e:  # the backend connection never outlives a failure here (nor a cancel)
            if pump.transport is not None:
                pump.transport.abort()
            if not isinstance(e, (OSError, TimeoutError, asyncio.TimeoutError, ProtocolError)):
                raise
            why = getattr(e, "reason", None) or _describe(e)
            raise SessionError("421 4.3.0 mail server unavailable, try again later",
                               why if why.startswith(who) else f"{who}: {why}") from None
        if mode is TLSMode.IMPLICIT:
            client.transport.write(greeting.encode())
        if handover is not None:
            pump.transport.write(handover.pending)
        return pump

    @staticmethod
    async def _xclient(pump: _Pump, hostname: str, src: Address, login: str | None) -> Reply:
        pump.transport.write(f"EHLO {hostname}\r\n".encode())
        ehlo = await _read_reply(pump, keep=False, who="backend")
        offered = None
        for line in ehlo.lines[1:] if ehlo is not None and ehlo.code == 250 else ():
            words = line.upper().split()
            if words and words[0] == "XCLIENT":
                offered = set(words[1:])
        if offered is None or "ADDR" not in offered:
            raise ProtocolError("", "does not offer XCLIENT to certproxy; allow it (Postfix: "
                                    "smtpd_authorized_xclient_hosts = 127.0.0.1) or drop --xclient")
        pump.transport.write(xclient_command(offered, src, login))
        reply = await _read_reply(pump, keep=False, who="backend")
        if reply is None or reply.code != 220:
            got = "closed the connection" if reply is None else f"{reply.code} {reply.lines[0]}"
            raise ProtocolError("", f"refused XCLIENT: {got}")
        return reply


# endregion
# region Tools: certificates ----------------------------------------------------------------------


EXPIRY_WARNING_DAYS = 30  # warn this long before a configured certificate expires


def make_certificate(name: str, *, usage: str = "both", sans: tuple[str, ...] = (), days: int = 825,
                     rsa: bool = False, issuer: tuple | None = None, ca: bool = False) -> tuple[bytes, bytes]:
    """A certificate every peer accepts; returns (cert PEM, key PEM).

    Leaf (default): CA:FALSE, EKU serverAuth and/or clientAuth (``usage`` server, client or both),
    SANs (``name`` when it looks like a host name, plus ``sans``). Self-signed, or signed by
    ``issuer`` = (CA certificate, CA key). ``ca=True`` makes a private CA (CA:TRUE, pathlen 0).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric import rsa as rsa_mod
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = rsa_mod.generate_private_key(65537, 3072) if rsa else ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=rsa and not ca,
                                     content_commitment=False, data_encipherment=False, key_agreement=False,
                                     key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()), critical=False)
    if not ca:
        ekus = {"server": [ExtendedKeyUsageOID.SERVER_AUTH], "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
                "both": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]}[usage]
        builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        names: list[x509.GeneralName] = []
        hostlike = re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.\-]*[A-Za-z0-9])?", name) is not None
        for san in dict.fromkeys(((name,) if hostlike and usage != "client" else ()) + tuple(sans)):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                names.append(x509.DNSName(san))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _write_pair(directory: str, name: str, cert_pem: bytes, key_pem: bytes, force: bool) -> tuple[str, str]:
    """certs/NAME.pem and certs/NAME.key (0600); never overwrites without ``force``."""
    if not re.fullmatch(r"[A-Za-z0-9@._\-]+", name) or name.startswith("."):
        raise ConfigError("NAME", f"{name!r}: use letters, digits and . _ - @ only")
    os.makedirs(directory, exist_ok=True)
    cert_path, key_path = os.path.join(directory, f"{name}.pem"), os.path.join(directory, f"{name}.key")
    for path in (cert_path, key_path):
        if os.path.exists(path) and not force:
            raise ConfigError("--force", f"{path} exists; not overwriting it (add --force to replace it)")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(key_path, flags, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(key_pem)
    with open(cert_path, "wb") as f:
        f.write(cert_pem)
    return cert_path, key_path


def _load_ca(spec: str) -> tuple:
    """``--ca DIR_OR_FILE``: DIR/ca.pem + DIR/ca.key, or a PEM holding both, or FILE.pem beside FILE.key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if os.path.isdir(spec):
        cert_path, key_path = os.path.join(spec, "ca.pem"), os.path.join(spec, "ca.key")
    else:
        cert_path = spec
        sibling = os.path.splitext(spec)[0] + ".key"
        key_path = sibling if os.path.exists(sibling) else spec
    try:
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError("--ca", f"cannot load the CA certificate and key from {spec!r} ({e}); "
                                  "run 'certproxy ca init' first") from None
    return cert, key


def _paste_lines(name: str, cert_path: str, der: bytes, *, ca_path: str | None = None) -> str:
    fp = format_fingerprint(cert_fingerprint(der))
    spki = format_fingerprint(spki_fingerprint(der))
    allow = f"--client-ca {ca_path} --allow-fingerprint {fp}" if ca_path else f"--allow {cert_path}"
    return f"""\
  certificate  {cert_path}
  sha256       {fp}
  spki sha256  {spki}

  As a server certificate, on each laptop:
    certproxy client ... --pin {fp}
      (or --pin {spki} to keep the pin across renewals with the same key)
  As a client certificate, on the mail server:
    certproxy server ... {allow}
    Postfix relay_clientcerts (smtpd_tls_fingerprint_digest = sha256):
      {fp} {name}
    Exim, in a list matched against ${{sha256:$tls_in_peercert}}:
      {fp.replace(":", "")}
"""


def _cmd_gencert(args: argparse.Namespace) -> int:
    issuer = _load_ca(args.ca) if args.ca else None
    if args.days < 1:
        raise ConfigError("--days", "must be at least 1")
    cert_pem, key_pem = make_certificate(args.name, sans=tuple(args.san), days=args.days, rsa=args.rsa,
                                         issuer=issuer)
    cert_path, key_path = _write_pair(args.dir, args.name, cert_pem, key_pem, args.force)
    der = _pem_to_der(cert_path)[0]
    kind = "issued by " + issuer[0].subject.rfc4514_string() if issuer else "self-signed"
    print(f"wrote {cert_path} and {key_path} (mode 0600), {kind}, valid {args.days} days\n")
    ca_path = (os.path.join(args.ca, "ca.pem") if os.path.isdir(args.ca) else args.ca) if args.ca else None
    print(_paste_lines(args.name, cert_path, der, ca_path=ca_path))
    return 0


def _cmd_ca(args: argparse.Namespace) -> int:
    if args.ca_command == "init":
        cert_pem, key_pem = make_certificate(args.name, ca=True, days=args.days, rsa=args.rsa)
        cert_path, key_path = _write_pair(args.dir, "ca", cert_pem, key_pem, args.force)
        print(f"wrote {cert_path} and {key_path} (mode 0600): a private CA valid {args.days} days\n"
              f"  issue laptop certificates:  certproxy ca issue NAME --dir {args.dir}\n"
              f"  on the mail server:         certproxy server ... --client-ca {cert_path}\n"
              f"  keep {key_path} off the mail server.")
        return 0
    args.ca = args.dir
    args.san = getattr(args, "san", [])
    return _cmd_gencert(args)


def certificate_summary(der: bytes) -> dict[str, str]:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    try:
        sans = ", ".join(str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        sans = "-"
    return {"subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(), "sans": sans,
            "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC"),
            "days_left": str((cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)).days)}


def expiry_problem(der: bytes) -> str | None:
    """A sentence when the certificate has expired or expires within EXPIRY_WARNING_DAYS, else None."""
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    if left.total_seconds() <= 0:
        return f"EXPIRED on {cert.not_valid_after_utc:%Y-%m-%d}"
    if left.days < EXPIRY_WARNING_DAYS:
        return f"expires in {left.days} days ({cert.not_valid_after_utc:%Y-%m-%d})"
    return None


def _cmd_fingerprint(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            ders = _pem_to_der(path)
        except (OSError, ValueError) as e:
            print(f"certproxy: {path}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
            status = 1
            continue
        if not ders:
            print(f"certproxy: {path}: no PEM certificate found", file=sys.stderr)
            status = 1
        for der in ders:
            info = certificate_summary(der)
            problem = expiry_problem(der)
            print(f"{path}\n"
                  f"  sha256     {format_fingerprint(cert_fingerprint(der))}\n"
                  f"  spki       {format_fingerprint(spki_fingerprint(der))}\n"
                  f"  subject    {info['subject']}\n"
                  f"  issuer     {info['issuer']}\n"
                  f"  SANs       {info['sans']}\n"
                  f"  not after  {info['not_after']}" + (f"  WARNING: {problem}" if problem else ""))
    return status


async def _probe(args: argparse.Namespace) -> int:
    ep = Endpoint.parse(args.target, "HOST:PORT")
    up = Upstream(endpoint=ep, mode=upstream_mode(ep, args.starttls, args.tls))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # probe shows what is there; deciding to trust it is the user's job
    if args.cert:
        _load_cert_chain(ctx, args.cert, args.key)
    asked: list[bool] | None = []

    def on_message(conn, direction, version, content_type, msg_type, data) -> None:
        if direction == "read" and msg_type == getattr(ssl, "_TLSMessageType").CERTIFICATE_REQUEST:
            asked.append(True)

    try:
        ctx._msg_callback = on_message  # the only way the stdlib shows a CertificateRequest
    except AttributeError:
        asked = None
    pump = _Pump()
    try:
        transport = await _tls_connect(ctx, up, pump, sni=args.server_name or ep.host, ehlo=DEFAULT_EHLO,
                                       to=Timeouts(connect=15, dialogue=15, handshake=15))
    except SessionError as e:
        print(f"certproxy: probe {ep}: {e.reason}", file=sys.stderr)
        return 1
    except (OSError, ssl.SSLError, TimeoutError, asyncio.TimeoutError) as e:
        print(f"certproxy: probe {ep}: {_describe(e)}", file=sys.stderr)
        return 1
    sslobj = transport.get_extra_info("ssl_object")
    der = sslobj.getpeercert(binary_form=True)
    chain = getattr(sslobj, "get_unverified_chain", lambda: None)()  # Python 3.13+
    ders = [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain] if chain else [der]
    facts = tls_facts(transport)
    requested = "unknown (needs Python's ssl message callback)" if asked is None else ("yes" if asked else "no")
    transport.abort()
    print(f"{ep} ({up.mode.value})\n  TLS        {facts['tls_version']} {facts['cipher']}\n"
          f"  asked for a client certificate: {requested}\n  chain as sent by the server:")
    for i, cert_der in enumerate(ders):
        info = certificate_summary(cert_der)
        problem = expiry_problem(cert_der)
        print(f"   {i} subject  {info['subject']}\n     issuer   {info['issuer']}\n     SANs     {info['sans']}\n"
              f"     expires  {info['not_after']}" + (f"  WARNING: {problem}" if problem else ""))
    fp, spki = format_fingerprint(cert_fingerprint(der)), format_fingerprint(spki_fingerprint(der))
    print(f"  server certificate\n    sha256  {fp}\n    spki    {spki}\n\n"
          f"  Compare this with the server's own 'certproxy fingerprint' before trusting it, then:\n"
          f"    --pin {fp}\n  or, to survive a renewal that keeps the key:\n    --pin {spki}")
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_probe(args))


class _SinkMTA:
    """A minimal SMTP server that keeps each message in memory: the demo's stand-in for Postfix
    (and the tests' recording backend: every connection and every byte received is counted)."""

    def __init__(self, hostname: str = "sink.demo", keywords: tuple[str, ...] = ("8BITMIME",),
                 proxy: bool = False) -> None:
        self.hostname = hostname
        self.proxy = proxy
        self.ehlo = "".join(f"250-{line}\r\n" for line in (hostname, *keywords[:-1])).encode()
        self.ehlo += f"250 {keywords[-1] if keywords else ''}\r\n".encode()
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.connections = 0
        self.proxied: list[bytes] = []
        self.received = bytearray()
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        mail_from, rcpts = "", []
        try:
            first = b""
            if self.proxy:  # a PROXY v1 header first (certproxy server --proxy-protocol v1)
                header = await reader.readline()
                self.proxied.append(header)
                if not header.startswith(b"PROXY "):
                    return
            writer.write(f"220 {self.hostname} ESMTP sink\r\n".encode())
            while line := first or await reader.readline():
                first = b""
                self.received += line
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(self.ehlo if verb == b"EHLO" else f"250 {self.hostname}\r\n".encode())
                elif verb == b"MAIL":
                    mail_from, rcpts = line[10:].strip().decode(), []
                    writer.write(b"250 2.1.0 Ok\r\n")
                elif verb == b"RCPT":
                    rcpts.append(line[8:].strip().decode())
                    writer.write(b"250 2.1.5 Ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    body = bytearray()
                    while (data := await reader.readline()) not in (b".\r\n", b""):
                        self.received += data
                        body += data[1:] if data.startswith(b"..") else data
                    self.received += data
                    self.messages.append((mail_from, rcpts, bytes(body)))
                    writer.write(b"250 2.0.0 Ok: queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    break
                else:
                    writer.write(b"250 2.0.0 Ok\r\n")
                await writer.drain()
        finally:
            writer.close()

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def _demo(workdir: str) -> int:
    import smtplib

    def say(text: str) -> None:
        print(text, flush=True)

    paths = {}
    for name, usage, sans in (("server", "server", ("localhost", "127.0.0.1")), ("laptop", "client", ())):
        cert, key = make_certificate(f"{name}.demo" if usage == "server" else name, usage=usage, sans=sans)
        paths[name] = (os.path.join(workdir, f"{name}.pem"), os.path.join(workdir, f"{name}.key"))
        with open(paths[name][0], "wb") as f:
            f.write(cert)
        fd = os.open(paths[name][1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
    server_fp = format_fingerprint(cert_fingerprint(_pem_to_der(paths["server"][0])[0]))
    laptop_fp = format_fingerprint(cert_fingerprint(_pem_to_der(paths["laptop"][0])[0]))
    say(f"1. certificates in {workdir}\n   server  sha256 {server_fp}\n   laptop  sha256 {laptop_fp}")
    sink = _SinkMTA()
    sink_port = await sink.start()
    say(f"2. sink MTA (stands in for Postfix) on 127.0.0.1:{sink_port}")
    server = ServerService(ServerConfig(
        listen=Endpoint(host="127.0.0.1", port=0), backend=Endpoint(host="127.0.0.1", port=sink_port),
        mode=TLSMode.STARTTLS, cert=paths["server"][0], key=paths["server"][1], allow=(paths["laptop"][0],),
        hostname="server.demo"))
    await server.start()
    say(f"3. certproxy server on 127.0.0.1:{server.port}: STARTTLS, only the laptop certificate allowed")
    client = ClientService(ClientConfig(
        listen=Endpoint(host="127.0.0.1", port=0),
        upstreams=(Upstream(endpoint=Endpoint(host="127.0.0.1", port=server.port), mode=TLSMode.STARTTLS),),
        cert=paths["laptop"][0], key=paths["laptop"][1], pins=Pins.parse([server_fp], "--pin"),
        server_name="localhost"))
    await client.start()
    say(f"4. certproxy client on 127.0.0.1:{client.port}: pins the server, presents the laptop certificate")
    body = (b"From: me@laptop.demo\r\nTo: friend@example.net\r\nSubject: certproxy demo\r\n\r\n"
            b"Sent in plain SMTP to localhost, carried over pinned mutual TLS.\r\n")

    def send() -> dict:
        with smtplib.SMTP("127.0.0.1", client.port, timeout=30) as s:
            s.ehlo("laptop.demo")
            return s.sendmail("me@laptop.demo", ["friend@example.net"], body)

    say("5. smtplib sends one message to the client port ...")
    try:
        refused = await asyncio.to_thread(send)
    except (smtplib.SMTPException, OSError) as e:
        say(f"   FAILED: {e}")
        refused = {"*": str(e)}
    for _ in range(100):  # let both sessions finish and log
        if not client.active and not server.active:
            break
        await asyncio.sleep(0.02)
    await client.stop()
    await server.stop()
    await sink.stop()
    ok = not refused and len(sink.messages) == 1 and sink.messages[0][2] == body
    if ok:
        mail_from, rcpts, got = sink.messages[0]
        say(f"6. delivered intact to the sink: from {mail_from} to {', '.join(rcpts)}, {len(got)} bytes")
        say(got.decode().rstrip().replace("\r\n", "\n").replace("\n", "\n   | ").join(("   | ", "")))
    else:
        say(f"6. NOT delivered intact (sink holds {len(sink.messages)} message(s))")
    say(f"""
Do the same for real:
  on the mail server:  certproxy server --starttls --listen 0.0.0.0:587 --backend 127.0.0.1:10025 \\
                         --cert certs/server.pem --key certs/server.key --allow certs/laptop.pem
  on the laptop:       certproxy client --upstream mail.example.org:587 \\
                         --cert certs/laptop.pem --key certs/laptop.key --pin {server_fp}
  then point your mail client at localhost:2525 (no TLS, no password).""")
    return 0 if ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="certproxy-demo-") as workdir:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_demo(workdir))


# endregion
# region CLI --------------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="certproxy", description="SMTP-aware mutual-TLS proxy with certificate pinning.")
    p.add_argument("--version", action="version", version=f"certproxy {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"], help="json: one object per line")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("client", help="laptop side: plain SMTP in, pinned mutual TLS out")
    c.add_argument("--upstream", action="append", required=True, metavar="HOST:PORT",
                   help="upstream mail server; repeat for failover (tried in order)")
    c.add_argument("--listen", default=DEFAULT_CLIENT_LISTEN, metavar="HOST:PORT", help="default %(default)s")
    mode = c.add_mutually_exclusive_group()
    mode.add_argument("--starttls", action="store_true", help="STARTTLS upstream (default unless port 465)")
    mode.add_argument("--tls", action="store_true", help="implicit TLS upstream (default on port 465)")
    c.add_argument("--cert", required=True, metavar="FILE", help="client certificate (PEM, may hold chain and key)")
    c.add_argument("--key", metavar="FILE", help="client key (PEM); default: in --cert")
    c.add_argument("--pin", action="append", default=[], metavar="FP",
                   help="SHA-256 of the server certificate or of its public key; repeat for rollover")
    c.add_argument("--ca", metavar="FILE", help="verify the server chain and name against this CA bundle")
    c.add_argument("--server-name", metavar="NAME", help="SNI and name checked with --ca; default: upstream host")
    c.add_argument("--ehlo", default=DEFAULT_EHLO, metavar="NAME", help="name in the pre-TLS EHLO (default %(default)s)")
    c.add_argument("--allow-remote-clients", action="store_true",
                   help="allow --listen on a non-loopback address (anyone reaching it can use your certificate)")
    c.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, metavar="N", help="default %(default)s")
    _add_service_options(c)
    _add_workers_option(c)
    c.set_defaults(func=_cmd_client)

    sv = sub.add_parser("server", help="mail-server side: mutual TLS in, plain SMTP to the local MTA")
    sv.add_argument("--backend", metavar="HOST:PORT",
                    help="the MTA port for clients with an allowed certificate, e.g. 127.0.0.1:10025")
    sv.add_argument("--listen", metavar="HOST:PORT", help="default 0.0.0.0:465 with --tls, 0.0.0.0:587 with --starttls")
    sv.add_argument("--tls", action="store_true", help="implicit TLS (port 465); with --starttls: both on one port")
    sv.add_argument("--starttls", action="store_true", help="STARTTLS (ports 25/587)")
    sv.add_argument("--cert", required=True, metavar="FILE", help="server certificate (PEM, may hold chain and key)")
    sv.add_argument("--key", metavar="FILE", help="server key (PEM); default: in --cert")
    sv.add_argument("--allow", action="append", default=[], metavar="PATH",
                    help="client certificate(s) allowed as themselves: a PEM file or a directory of them")
    sv.add_argument("--client-ca", metavar="FILE", help="private CA: any client certificate it issued is allowed")
    sv.add_argument("--allow-fingerprint", action="append", default=[], metavar="'FP [NAME]'",
                    help="narrow --client-ca / --allow to these certificate or public-key SHA-256s; "
                         "NAME is who the certificate is (XCLIENT LOGIN, logs)")
    sv.add_argument("--client-cert", choices=("required", "optional", "none"), default="required",
                    help="required (default): no allowed certificate, no entry; optional: such clients go to "
                         "--untrusted-backend; none: ask for none, everyone goes there")
    sv.add_argument("--starttls-optional", action="store_true",
                    help="with --starttls: also admit clients that never send STARTTLS (to --untrusted-backend)")
    sv.add_argument("--optional-client-cert", dest="client_cert", action="store_const", const="optional",
                    help="same as --client-cert optional")
    sv.add_argument("--untrusted-backend", metavar="HOST:PORT",
                    help="with --client-cert optional: where clients without an allowed certificate go "
                         "(an MTA port that treats them as strangers)")
    sv.add_argument("--xclient", action="store_true",
                    help="tell the backend the client's address and certificate name with XCLIENT")
    sv.add_argument("--proxy-protocol", choices=("v1", "v2"),
                    help="send a PROXY protocol header to the backend (client address)")
    sv.add_argument("--proxy-from", action="append", default=[], metavar="ADDR[/BITS]",
                    help="load balancer(s) whose connections start with a PROXY v1/v2 header")
    sv.add_argument("--hostname", default="", metavar="NAME", help="greeting / EHLO name; default the FQDN")
    sv.add_argument("--max-connections", type=int, default=MAX_SERVER_CONNECTIONS, metavar="N",
                    help="default %(default)s")
    sv.add_argument("--max-per-ip", type=int, default=MAX_PER_IP, metavar="N",
                    help="concurrent sessions from one address (default %(default)s, 0: no limit)")
    _add_service_options(sv)
    _add_workers_option(sv)
    sv.set_defaults(func=_cmd_server)

    r = sub.add_parser("run", help="run every service in a TOML config file (SIGHUP reloads it)")
    r.add_argument("config", metavar="CONFIG.toml")
    r.add_argument("--grace", type=float, default=GRACE_S, metavar="SECONDS",
                   help="on SIGTERM, let live sessions finish this long (default %(default)s)")
    _add_workers_option(r)
    r.set_defaults(func=_cmd_run)
    k = sub.add_parser("check", help="validate a TOML config file without starting anything")
    k.add_argument("config", metavar="CONFIG.toml")
    k.set_defaults(func=_cmd_check)

    g = sub.add_parser("gencert", help="make a certificate and key, and print what to paste on the other side")
    g.add_argument("name", metavar="NAME", help="common name; also the file name certs/NAME.pem + .key")
    g.add_argument("--dir", default="certs", help="default %(default)s")
    g.add_argument("--days", type=int, default=825, help="validity (default %(default)s)")
    g.add_argument("--rsa", action="store_true", help="RSA 3072 instead of ECDSA P-256")
    g.add_argument("--san", action="append", default=[], metavar="NAME", help="extra DNS name or IP address")
    g.add_argument("--ca", metavar="DIR_OR_FILE", help="issue from this CA (see 'certproxy ca init') instead of self-signing")
    g.add_argument("--force", action="store_true", help="overwrite existing files")
    g.set_defaults(func=_cmd_gencert)

    ca = sub.add_parser("ca", help="a private CA for many laptops")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="init|issue")
    ci = ca_sub.add_parser("init", help="make certs/ca.pem + certs/ca.key")
    ci.add_argument("--dir", default="certs", help="default %(default)s")
    ci.add_argument("--name", default="certproxy private CA", help="CA common name")
    ci.add_argument("--days", type=int, default=3650, help="validity (default %(default)s)")
    ci.add_argument("--rsa", action="store_true", help="RSA 3072 instead of ECDSA P-256")
    ci.add_argument("--force", action="store_true", help="overwrite existing files")
    cs = ca_sub.add_parser("issue", help="issue certs/NAME.pem + .key from the CA in --dir")
    cs.add_argument("name", metavar="NAME")
    cs.add_argument("--dir", default="certs", help="default %(default)s")
    cs.add_argument("--days", type=int, default=825, help="validity (default %(default)s)")
    cs.add_argument("--rsa", action="store_true", help="RSA 3072 instead of ECDSA P-256")
    cs.add_argument("--san", action="append", default=[], metavar="NAME", help="extra DNS name or IP address")
    cs.add_argument("--force", action="store_true", help="overwrite existing files")
    ca.set_defaults(func=_cmd_ca)

    pr = sub.add_parser("probe", help="show a server's certificate, TLS version and the --pin line to paste")
    pr.add_argument("target", metavar="HOST:PORT")
    pmode = pr.add_mutually_exclusive_group()
    pmode.add_argument("--starttls", action="store_true", help="default unless port 465")
    pmode.add_argument("--tls", action="store_true", help="implicit TLS (default on port 465)")
    pr.add_argument("--cert", metavar="FILE", help="present this client certificate")
    pr.add_argument("--key", metavar="FILE")
    pr.add_argument("--server-name", metavar="NAME", help="SNI; default the host")
    pr.set_defaults(func=_cmd_probe)

    d = sub.add_parser("demo", help="the whole chain on this machine, with throwaway certificates")
    d.set_defaults(func=_cmd_demo)

    f = sub.add_parser("fingerprint", help="fingerprints, subject, issuer, SANs and expiry of certificates")
    f.add_argument("files", nargs="+", metavar="FILE")
    f.set_defaults(func=_cmd_fingerprint)
    return p


def _add_service_options(p: argparse.ArgumentParser) -> None:
    """Options client and server share (also the keys of a config-file table)."""
    for name, default, what in (("connect", CONNECT_TIMEOUT_S, "TCP connect, per address"),
                                ("dialogue", DIALOGUE_TIMEOUT_S, "whole SMTP dialogue before TLS"),
                                ("handshake", HANDSHAKE_TIMEOUT_S, "TLS handshake"),
                                ("idle", IDLE_TIMEOUT_S, "a spliced session with no traffic")):
        p.add_argument(f"--{name}-timeout", type=float, default=default, metavar="SECONDS",
                       help=f"{what} (default %(default)s)")
    p.add_argument("--grace", type=float, default=GRACE_S, metavar="SECONDS",
                   help="on SIGTERM, let live sessions finish this long (default %(default)s)")
    p.add_argument("--name", metavar="NAME", help="service name in the logs (default: client / server)")


def _add_workers_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="N processes sharing the listening port(s) (SO_REUSEPORT); default 1")


def _timeouts(args: argparse.Namespace) -> Timeouts:
    return Timeouts(connect=args.connect_timeout, dialogue=args.dialogue_timeout,
                    handshake=args.handshake_timeout, idle=args.idle_timeout)


def client_config_from_args(args: argparse.Namespace) -> ClientConfig:
    upstreams = []
    for text in args.upstream:
        ep = Endpoint.parse(text, "--upstream")
        if ep.port == 0:
            raise ConfigError("--upstream", f"{text!r}: port 0 is not a server port")
        upstreams.append(Upstream(endpoint=ep, mode=upstream_mode(ep, args.starttls, args.tls)))
    return ClientConfig(
        name=args.name or "client",
        listen=Endpoint.parse(args.listen, "--listen"),
        upstreams=tuple(upstreams),
        cert=args.cert,
        key=args.key,
        pins=Pins.parse(args.pin, "--pin"),
        ca=args.ca,
        server_name=args.server_name,
        ehlo=args.ehlo,
        allow_remote_clients=args.allow_remote_clients,
        max_connections=args.max_connections,
        timeouts=_timeouts(args),
    )


def _networks(texts: list[str], option: str) -> tuple:
    nets = []
    for text in texts:
        try:
            nets.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ConfigError(option, f"{text!r} is not an address or ADDR/BITS network") from None
    return tuple(nets)


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    if not args.tls and not args.starttls:
        raise ConfigError("--tls", "say --tls (implicit TLS), --starttls, or both (one port, detected per client)")
    mode = TLSMode.EITHER if args.tls and args.starttls else TLSMode.IMPLICIT if args.tls else TLSMode.STARTTLS
    listen = args.listen or ("0.0.0.0:465" if mode is TLSMode.IMPLICIT else "0.0.0.0:587")
    return ServerConfig(
        name=args.name or "server",
        listen=Endpoint.parse(listen, "--listen"),
        backend=args.backend and Endpoint.parse(args.backend, "--backend"),
        mode=mode,
        cert=args.cert,
        key=args.key,
        allow=tuple(args.allow),
        client_ca=args.client_ca,
        allow_fingerprints=Pins.parse(args.allow_fingerprint, "--allow-fingerprint", named=True),
        hostname=args.hostname,
        client_cert=args.client_cert,
        starttls_optional=args.starttls_optional,
        untrusted_backend=args.untrusted_backend and Endpoint.parse(args.untrusted_backend, "--untrusted-backend"),
        xclient=args.xclient,
        proxy_protocol=args.proxy_protocol,
        proxy_from=_networks(args.proxy_from, "--proxy-from"),
        max_connections=args.max_connections,
        max_per_ip=args.max_per_ip,
        timeouts=_timeouts(args),
    )


class _ConfigFileError(ConfigError):
    pass


def _table_to_argv(table: dict) -> list[str]:
    argv: list[str] = []
    for key, value in table.items():
        flag = "--" + str(key).replace("_", "-")
        for v in value if isinstance(value, list) else [value]:
            if v is True:
                argv.append(flag)
            elif v is False:
                continue
            elif isinstance(v, (dict, list)):
                raise ConfigError(flag, "expected a string, number, boolean or a list of them")
            else:
                argv += [flag, str(v)]
    return argv


def _raise_usage(where: str):
    def error(message: str):
        m = re.search(r"argument (--[\w-]+)", message)
        option = m.group(1) if m else "option"
        message = re.sub(r"^argument [^:]+: ", "", message)
        message = message.replace("unrecognized arguments: ", "unknown option(s): ")
        raise _ConfigFileError(f"{where} {option}", message)
    return error


def load_config(path: str) -> dict[str, _Listener]:
    """Services from a TOML file: one table per service, ``[client.NAME]`` or ``[server.NAME]``, whose
    keys are the command-line options without dashes (``pin = ["..."]``, ``allow-remote-clients = true``).
    Every error names the file, the service and the option."""
    import tomllib

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(path, f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, f"not valid TOML: {e}") from None
    unknown = set(doc) - {"client", "server"}
    if unknown:
        raise ConfigError(path, f"unknown table(s) {', '.join(sorted(unknown))}: use [client.NAME] or [server.NAME]")
    parser = _build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    services: dict[str, _Listener] = {}
    for kind in ("client", "server"):
        for name, table in doc.get(kind, {}).items():
            where = f"{path} [{kind}.{name}]"
            if not isinstance(table, dict):
                raise ConfigError(where, "must be a table")
            if name in services:
                raise ConfigError(where, "a service of this name is defined twice")
            for key in ("workers", "grace"):
                if key in table:
                    raise ConfigError(f"{where} --{key}", f"applies to the whole process: give it on the command "
                                                         f"line, certproxy run --{key} ... {path}")
            sub = subparsers[kind]
            sub.error = _raise_usage(where)
            try:
                args = sub.parse_args(_table_to_argv(table))
                args.name = name
                cfg = client_config_from_args(args) if kind == "client" else server_config_from_args(args)
                services[name] = ClientService(cfg) if kind == "client" else ServerService(cfg)
            except _ConfigFileError:
                raise
            except ConfigError as e:
                raise ConfigError(f"{where} {e.option}", str(e).split(": ", 1)[1]) from None
    if not services:
        raise ConfigError(path, "defines no service: add a [client.NAME] or [server.NAME] table")
    return services


def check_services(services: dict[str, _Listener]) -> list[str]:
    """What ``check`` adds to loading: expired certificates and listen addresses already in use."""
    problems = []
    for name, svc in services.items():
        for option, path in svc._certificate_files():
            for der in _pem_to_der(path):
                problem = expiry_problem(der)
                if problem and problem.startswith("EXPIRED"):
                    problems.append(f"[{name}] {option}: {path} {problem}")
        problem = _port_problem(svc.listen)
        if problem:
            problems.append(f"[{name}] --listen: {problem}")
    return problems


class _Supervisor:
    """Runs services; SIGHUP reloads them from ``loader`` (a broken new configuration is refused and
    the running one kept); SIGTERM/SIGINT stop accepting and let live sessions finish within ``grace``."""

    def __init__(self, loader, grace: float) -> None:
        self.loader = loader
        self.grace = grace
        self.services: dict[str, _Listener] = {}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.services = self.loader()
        for svc in self.services.values():
            await svc.start()
        # What start-up made (modules, contexts, certificates) lives for the whole run: keep it out of
        # every garbage collection from now on.
        gc.freeze()
        stop = loop.create_future()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        await stop
        active = sum(len(s.active) for s in self.services.values())
        _log_event(logging.INFO, "stopping", sessions=active, grace=self.grace)
        await asyncio.gather(*(s.stop(self.grace) for s in self.services.values()))
        _log_event(logging.INFO, "stopped")

    async def reload(self) -> None:
        try:
            new = self.loader()
        except ConfigError as e:
            _log_event(logging.ERROR, "reload", outcome="refused", reason=str(e),
                       action="fix the configuration and send SIGHUP again; the running one is kept")
            return
        for name, svc in new.items():
            old = self.services.get(name)
            if old is not None and type(old) is type(svc) and old.listen == svc.listen:
                old.replace(svc)
                continue
            try:
                await svc.start()
            except ConfigError as e:
                _log_event(logging.ERROR, "reload", service=name, outcome="failed", reason=str(e))
                continue
            if old is not None:
                await old.stop(self.grace)
            self.services[name] = svc
        for name in set(self.services) - set(new):
            await self.services.pop(name).stop(self.grace)
        _log_event(logging.INFO, "reload", outcome="ok", services=",".join(sorted(self.services)))


def _loop_factory():
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _raise_open_files_limit() -> None:
    """Every tunnel holds two descriptors; the usual soft limit (1024) would cap a proxy at ~500."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def _supervise(loader, grace: float, workers: int = 1) -> int:
    # A reload asked for while we are still starting must not kill us (SIGHUP's default action):
    # ignored until the supervisor's own handler is in place.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    services = loader()  # configuration errors surface here, before anything listens
    _raise_open_files_limit()
    if workers > 1:
        return _run_workers(loader, grace, workers, services)
    first = [services]
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_Supervisor(lambda: first.pop() if first else loader(), grace).run())
    return 0


def _run_workers(loader, grace: float, n: int, services: dict[str, _Listener]) -> int:
    """--workers N: N forked processes, each running every service on the same ports (SO_REUSEPORT:
    the kernel spreads new connections across them). The parent only forwards SIGHUP / SIGTERM /
    SIGINT and restarts a worker that dies; a worker that cannot start (exit 2) stops them all."""
    for name, svc in services.items():
        if svc.listen.port == 0:
            raise ConfigError("--workers", f"[{name}] needs a fixed --listen port (not 0) to share between workers")
        # SO_REUSEPORT would also let us share the port with a forgotten older instance (and its old
        # allowlist): make sure nobody listens there yet.
        problem = _port_problem(svc.listen)
        if problem:
            raise ConfigError("--listen", f"[{name}] {problem}")
    children: dict[int, int] = {}
    state = {"stopping": False}

    def spawn(number: int) -> None:
        global _WORKER, _REUSE_PORT
        pid = os.fork()
        if pid:
            children[pid] = number
            return
        code = 1
        try:  # the worker: a process of its own from here on
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until its supervisor handles it
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            _WORKER, _REUSE_PORT = number, True
            code = _supervise(loader, grace)
        except ConfigError as e:
            log.error("worker %d: %s", number, e)
            code = 2
        except BaseException:
            log.exception("worker %d failed", number)
        finally:
            logging.shutdown()
            os._exit(code)

    def forward(sig: int, _frame) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            state["stopping"] = True
        for pid in list(children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    for number in range(1, n + 1):
        spawn(number)
    _log_event(logging.INFO, "workers", count=n, pids=",".join(str(p) for p in children))
    status = 0
    while children:
        try:
            pid, raw = os.wait()
        except ChildProcessError:
            break
        number = children.pop(pid, None)
        if number is None:
            continue
        code = os.waitstatus_to_exitcode(raw)
        if state["stopping"]:
            continue
        if code == 2:
            _log_event(logging.ERROR, "worker", worker=number, pid=pid, outcome="failed",
                       reason="could not start (see its error above); stopping all workers")
            status = 2
            forward(signal.SIGTERM, None)
            continue
        _log_event(logging.ERROR, "worker", worker=number, pid=pid, outcome="died", code=code,
                   action="restarting it in 1 s")
        time.sleep(1)
        if not state["stopping"]:  # a SIGTERM during the pause: do not start what nobody will stop
            spawn(number)
    return status


def _workers(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ConfigError("--workers", "must be at least 1")
    return args.workers


def _cmd_client(args: argparse.Namespace) -> int:
    return _supervise(lambda: {"client": ClientService(client_config_from_args(args))}, args.grace, _workers(args))


def _cmd_server(args: argparse.Namespace) -> int:
    return _supervise(lambda: {"server": ServerService(server_config_from_args(args))}, args.grace, _workers(args))


def _cmd_run(args: argparse.Namespace) -> int:
    return _supervise(lambda: load_config(args.config), args.grace, _workers(args))


def _cmd_check(args: argparse.Namespace) -> int:
    services = load_config(args.config)
    problems = check_services(services)
    for problem in problems:
        print(f"certproxy: error: {args.config} {problem}", file=sys.stderr)
    if problems:
        return 2
    for name, svc in services.items():
        print(f"ok  [{name}] {type(svc).__name__.replace('Service', '').lower()} listen={svc.listen}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if args.log_format == "json" else
                         logging.Formatter("%(asctime)s certproxy %(levelname)s %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"certproxy: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
