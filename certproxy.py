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

Server side (server mode): terminate TLS (implicit or STARTTLS) in front of an unmodified MTA, take any
client certificate through the handshake and judge it afterwards (--allow, --client-ca,
--allow-fingerprint); only an allowed one reaches --backend, and a client's own XCLIENT/XFORWARD never
does. TLS runs on pyOpenSSL memory BIOs for both ends. Works with plain asyncio; uses uvloop when it
is importable.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import datetime
import enum
import functools
import gc
import hashlib
import ipaddress
import itertools
import logging
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import NamedTuple

try:
    from OpenSSL import SSL, crypto
except ImportError:  # main() says what to install; importing the module for its tools still works
    SSL = crypto = None

__version__ = "0.1.0"
__all__ = [
    "CertProxyError",
    "ClientConfig",
    "ClientPolicy",
    "ClientService",
    "CommandWatch",
    "ConfigError",
    "ConfigErrors",
    "Endpoint",
    "Exchange",
    "HideExtensions",
    "Pins",
    "Reply",
    "ReplyParser",
    "ServerConfig",
    "ServerService",
    "SessionError",
    "SMTPGate",
    "StartTLSClient",
    "TLSMode",
    "WrongMode",
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
HAPPY_EYEBALLS_DELAY_S = 0.25  # RFC 8305 5: Connection Attempt Delay before the next address is tried
DIALOGUE_TIMEOUT_S = 60.0  # whole pre-TLS dialogue (greeting, EHLO, STARTTLS)
HANDSHAKE_TIMEOUT_S = 30.0  # TLS handshake
IDLE_TIMEOUT_S = 600.0  # RFC 5321 4.5.3.2.7: server timeout for the DATA termination is 10 minutes
CLOSE_LINGER_S = 30.0  # after a half-close that TLS cannot forward, wait this long for the other side
SERVER_GONE_REPLY = b"421 4.4.2 certproxy: the mail server closed the connection; anything unconfirmed was not accepted\r\n"
GOODBYE_LINGER_S = 2.0  # after our last reply, read and discard this long so a reset cannot eat the reply
MAX_CONNECTIONS = 100  # concurrent sessions per client listener
MAX_SERVER_CONNECTIONS = 1000  # concurrent sessions per server listener
MAX_PER_IP = 50  # concurrent sessions from one client address on a server listener (0: no limit)
IPV6_PREFIX_LENGTH = 64  # IPv6 clients are counted per /64, as Postfix 3.8's smtpd_client_ipv6_prefix_length
REFUSAL_LINGER_S = 10.0  # a client told it may not pass may still say QUIT this long; then it is closed
GRACE_S = 30.0  # on SIGTERM, how long live sessions may take to finish before they are cut
WORKER_STABLE_S = 60.0  # a worker that lived this long before dying is restarted after 1 s again
WORKER_BACKOFF_MAX_S = 60.0  # a worker that keeps dying is restarted after 1, 2, 4 ... at most this many s
MAX_COMMAND_LINE = 512  # RFC 5321 4.5.3.1.4: command line, CRLF included
MAX_DIALOGUE_ERRORS = 10  # bad commands before TLS before we hang up (Postfix smtpd_hard_error_limit is 20)
MAX_DIALOGUE_COMMANDS = 50  # commands before TLS before we hang up
LISTEN_BACKLOG = 1024  # bursts of new connections wait in the kernel, not in SYN retransmits (capped by somaxconn)
MAX_VERDICTS = 4096  # client certificates whose verdict a server policy remembers
DUAL_SNIFF_S = 0.25  # --tls --starttls: how long a silent client may take before it is greeted as SMTP
GREETING_SNIFF_S = 3.0  # no SMTP greeting this long: check whether the upstream speaks implicit TLS instead
EXPIRY_WARNING_DAYS = 30  # warn this long before a configured certificate expires (or a CRL's nextUpdate)
CRL_DAYS = 365  # nextUpdate of the CRLs 'ca revoke' / 'ca crl' sign; refresh with 'ca crl' before then
METRICS_MAX_REQUEST = 8192  # bytes of one HTTP request to --metrics (a scrape is a few hundred)
METRICS_TIMEOUT_S = 10.0  # a scrape connection that says nothing this long is closed
METRICS_MAX_CONNECTIONS = 8  # concurrent scrape connections
METRICS_MAX_SEEN = 1000  # client certificates remembered per service for the expiry gauge
HANDSHAKE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds
SESSION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0)  # seconds

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

    outcome = "failed"  # for the session line

    def __init__(self, reply: str, reason: str, *, outcome: str | None = None) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason
        if outcome is not None:
            self.outcome = outcome


class ProtocolError(SessionError):
    """The SMTP peer did something the protocol (or our security policy) does not allow."""

    outcome = "refused"


class PeerRejected(SessionError):
    """The peer's certificate is not the one we trust."""

    outcome = "refused"


class WrongMode(SessionError):
    """The upstream speaks the other TLS mode (implicit TLS where STARTTLS was configured, or the
    reverse): a configuration mistake, named with its fix. ``mode`` is the one it speaks."""

    outcome = "refused"

    def __init__(self, mode: TLSMode, reason: str) -> None:
        reply = "421 4.7.0 upstream expects implicit TLS (add --tls)" if mode is TLSMode.IMPLICIT else \
            "421 4.7.0 upstream expects STARTTLS (drop --tls)"
        super().__init__(reply, reason)
        self.mode = mode


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
_B64_PIN = re.compile(r'^(?:sha256//|pin-sha256\s*=\s*"?)?([A-Za-z0-9+/]{43}=?)"?;?$', re.IGNORECASE)
_OTHER_HASHES = {20: "SHA-1", 16: "MD5"}  # digest sizes people paste by mistake


def parse_fingerprint(text: str) -> bytes:
    """A SHA-256 fingerprint in any spelling people paste, as 32 bytes.

    Accepts ``AB:CD:...`` (openssl, Postfix), plain hex in any case (Exim), a ``sha256:``, ``SHA256=``
    or ``sha256 Fingerprint=`` prefix, and base64 (curl's ``sha256//BASE64``, HPKP's
    ``pin-sha256="BASE64"``, or bare). A SHA-1 or MD5 fingerprint is named as such. Raises ValueError.
    """
    import base64
    import binascii

    raw = text.strip()
    b64 = _B64_PIN.fullmatch(raw)
    if b64 and not re.fullmatch(r"[0-9A-Fa-f]{43}=?", b64.group(1)):
        try:
            digest = base64.b64decode(b64.group(1) + "=" * (-len(b64.group(1)) % 4), validate=True)
        except (binascii.Error, ValueError):
            digest = b""
        if len(digest) == 32:
            return digest
    s = _FP_PREFIX.sub("", raw)
    if ":" in s:
        parts = s.split(":")
        if all(re.fullmatch(r"[0-9A-Fa-f]{2}", p) for p in parts) and len(parts) in _OTHER_HASHES:
            raise ValueError(_wrong_hash(text, _OTHER_HASHES[len(parts)]))
        if len(parts) != 32 or not all(re.fullmatch(r"[0-9A-Fa-f]{2}", p) for p in parts):
            raise ValueError(f"{text!r} is not a SHA-256 fingerprint (32 hex pairs separated by ':')")
        s = "".join(parts)
    if re.fullmatch(r"[0-9A-Fa-f]+", s) and len(s) // 2 in _OTHER_HASHES and len(s) % 2 == 0:
        raise ValueError(_wrong_hash(text, _OTHER_HASHES[len(s) // 2]))
    if not re.fullmatch(r"[0-9A-Fa-f]{64}", s):
        raise ValueError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits, ':' optional, or base64)")
    return bytes.fromhex(s)


def _wrong_hash(text: str, name: str) -> str:
    article = "an" if name.startswith("MD") else "a"
    return (f"{text!r} is {article} {name} fingerprint; certproxy needs the SHA-256 one: "
            "openssl x509 -in CERT -noout -fingerprint -sha256, or certproxy fingerprint CERT")


def format_fingerprint(digest: bytes) -> str:
    """``AB:CD:...``: the spelling of openssl and Postfix, and the one our log lines use."""
    return digest.hex(":").upper()


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
    crl: tuple[str, ...] = ()  # CRLs (PEM or DER) signed by a --client-ca certificate
    deny_fingerprints: Pins = Pins(frozenset())  # certificates or keys refused whatever else allows them
    hostname: str = ""
    client_cert: str = "required"  # required | optional | none: see _route
    starttls_optional: bool = False  # a STARTTLS listener that also admits clients who never say STARTTLS
    untrusted_backend: Endpoint | None = None  # where clients without an allowed certificate go
    xclient: bool = False  # tell the backend the client's address and certificate name (XCLIENT)
    proxy_protocol: str | None = None  # "v1" / "v2": a PROXY header to the backend(s)
    proxy_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # load balancers sending PROXY
    max_connections: int = MAX_SERVER_CONNECTIONS
    max_per_ip: int = MAX_PER_IP
    ipv6_prefix_length: int = IPV6_PREFIX_LENGTH
    soft_refusal: bool = False  # refuse a certificate not (yet) allowed with 454 4.7.x: the sender retries
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
        if self.soft_refusal and self.client_cert != "required":
            raise ConfigError("--soft-refusal", f"with --client-cert {self.client_cert} nobody is refused (strangers go "
                                                "to --untrusted-backend): leave it out")
        if self.crl and not self.client_ca:
            raise ConfigError("--crl", "needs --client-ca (the CA that signed the CRL); to shut out an --allow "
                                       "certificate without a CA, use --deny-fingerprint")
        if not re.fullmatch(r"[A-Za-z0-9.\-]+", self.hostname or "x"):
            raise ConfigError("--hostname", f"{self.hostname!r} is not a valid host name")
        if self.max_connections < 1:
            raise ConfigError("--max-connections", "must be at least 1")
        if self.max_per_ip < 0:
            raise ConfigError("--max-per-ip", "must be 0 (no limit) or more")
        if not 0 <= self.ipv6_prefix_length <= 128:
            raise ConfigError("--ipv6-prefix-length", "must be 0-128 (bits of an IPv6 address that name one client)")
        self.timeouts.check()


def upstream_mode(endpoint: Endpoint, starttls: bool, tls: bool) -> TLSMode:
    """``--tls`` / ``--starttls`` if given, else implicit TLS on port 465 and STARTTLS elsewhere."""
    if tls:
        return TLSMode.IMPLICIT
    if starttls:
        return TLSMode.STARTTLS
    return TLSMode.IMPLICIT if endpoint.port == IMPLICIT_TLS_PORT else TLSMode.STARTTLS


# endregion
# region TLS engine and certificate policy --------------------------------------------------------
#
# Both ends run TLS on pyOpenSSL Connections over memory BIOs, driven by certproxy's own pumps (see
# _Pump): bytes from the socket go in, plaintext and the bytes owed to the socket come out. The verify
# callback never decides on the server: it records OpenSSL's verdict on the chain and says yes, so
# that every client certificate completes the handshake and is judged in Python afterwards (like
# Postfix and Exim), with a reason, a fingerprint and an SMTP reply. On the client it is the gate: a
# server that fails the pin (or CA and name) is refused inside the handshake, before our own
# certificate is sent.

# Python's own default cipher string (3.10+): TLS 1.2 suites with forward secrecy and AEAD or AES only.
_CIPHERS = b"@SECLEVEL=2:ECDH+AESGCM:ECDH+CHACHA20:ECDH+AES:DHE+AES:!aNULL:!eNULL:!aDSS:!SHA1:!AESCCM"
_BIO_CHUNK = 65536  # bytes taken from OpenSSL's outgoing memory BIO per call
_RECV_CHUNK = 16384  # plaintext taken per call: one TLS record at most
# OpenSSL's X509_V_ERR_* numbers that people meet, in words (the rest are shown by number).
_VERIFY_ERRORS = {
    2: "the issuer certificate could not be found", 7: "the certificate signature does not verify",
    9: "the certificate is not yet valid", 10: "the certificate has expired",
    13: "the certificate's notBefore is malformed", 14: "the certificate's notAfter is malformed",
    18: "self-signed certificate", 19: "self-signed certificate in the chain",
    20: "unable to get the local issuer certificate", 21: "unable to verify the first certificate",
    23: "the certificate has been revoked", 24: "invalid CA certificate", 25: "path length constraint exceeded",
    26: "unsupported certificate purpose", 27: "the certificate is not trusted", 28: "the certificate is rejected",
    32: "the issuer's key usage does not allow signing certificates",
    47: "permitted subtree violation (name constraints)", 48: "excluded subtree violation (name constraints)",
    62: "hostname mismatch",
}


# OpenSSL's words when a handshake fails because of what we allow (not because the peer spoke nonsense).
_POLICY_REFUSALS = ("unsupported protocol", "protocol version", "no shared cipher", "no suitable",
                    "inappropriate fallback", "renegotiation", "certificate")


def _verify_error(errno: int) -> str:
    return _VERIFY_ERRORS.get(errno, f"OpenSSL verify error {errno}")


def _tls_reason(e: Exception) -> str:
    """The words of a pyOpenSSL error: OpenSSL's reason strings ('tlsv1 alert unknown ca'), never a repr."""
    if isinstance(e, SSL.SysCallError):
        return "connection closed during the TLS handshake"
    reasons = [r[2] for r in (e.args[0] if e.args and isinstance(e.args[0], list) else ())
               if isinstance(r, tuple) and len(r) == 3 and r[2]]
    return "; ".join(dict.fromkeys(reasons)) or str(e) or type(e).__name__


try:  # OpenSSL's per-thread error queue; see _PeerCheck.on_verify
    from OpenSSL._util import lib as _ossl

    _clear_openssl_errors = _ossl.ERR_clear_error
except (ImportError, AttributeError):  # pragma: no cover - then an overridden failure fails closed
    def _clear_openssl_errors() -> None:
        pass


class _PeerCheck:
    """What the verify callback learned about one connection's peer. On a server it only records
    OpenSSL's first complaint about the chain and says yes. On a client ``leaf`` (the pin, or the CA
    and name check) decides at depth 0, and with ``strict`` (--ca) any complaint of OpenSSL's at any
    depth refuses too (some, such as name constraints, come after the depth-0 call); the reason is
    kept for the log."""

    __slots__ = ("error", "leaf", "strict", "refusal", "der")

    def __init__(self, leaf=None, strict: bool = False) -> None:
        self.error: tuple[int, int] | None = None  # (X509_V_ERR number, depth) of the first complaint
        self.leaf = leaf  # client only: callable(der, chain_error) -> "" (fine) or why not
        self.strict = strict
        self.refusal = ""
        self.der = b""  # client only: the server's leaf certificate, as judged

    def on_verify(self, cert, errno: int, depth: int, ok: int) -> bool:
        try:
            return self._verdict(cert, errno, depth, ok)
        except Exception as e:  # a certificate OpenSSL parsed and cryptography cannot: never a yes
            self.refusal = f"cannot check the peer's certificate ({type(e).__name__}: {e})"
            return False

    def _verdict(self, cert, errno: int, depth: int, ok: int) -> bool:
        if not ok:
            if self.error is None:
                self.error = (errno, depth)
            if self.strict:
                self.refusal = f"server certificate not trusted by --ca: {_verify_error(errno)} (depth {depth})"
                return False
        if self.leaf is not None and not depth:
            if not self.der:
                self.der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
            self.refusal = self.leaf(self.der, self.error)
            if self.refusal:
                return False
        if not ok:
            # We say yes to a complaint (the policy judges later): a signature failure also left an
            # entry on OpenSSL's error queue, which would turn the handshake's next WANT_READ into a
            # fatal error. The verdict itself is kept in ``error``.
            _clear_openssl_errors()
        return True


def _on_verify(conn, cert, errno: int, depth: int, ok: int) -> bool:
    return conn.get_app_data().on_verify(cert, errno, depth, ok)


class _TLS:
    """One TLS connection on memory BIOs, sans-IO: ``receive`` takes bytes from the socket and returns
    plaintext; after every call ``outgoing`` holds what must go to the socket (handshake messages,
    records, alerts, close_notify)."""

    __slots__ = ("conn", "check", "up", "closed", "first_in")

    def __init__(self, ctx: SSL.Context, *, server: bool, sni: str | None = None, leaf=None,
                 strict: bool = False) -> None:
        conn = SSL.Connection(ctx, None)
        self.check = _PeerCheck(leaf, strict)
        conn.set_app_data(self.check)
        if server:
            conn.set_accept_state()
        else:
            conn.set_connect_state()
            if sni and not _is_ip(sni):
                conn.set_tlsext_host_name(sni.encode("idna"))
        self.conn = conn
        self.up = False  # the handshake is complete
        self.closed = False  # the peer's close_notify arrived
        self.first_in = b""  # the first bytes the peer sent: "220 " says it is no TLS server

    def start(self) -> bytes:
        """Begin the handshake: a client's ClientHello, nothing for a server."""
        self._step()
        return self.outgoing()

    def _step(self) -> None:
        try:
            self.conn.do_handshake()
        except SSL.WantReadError:
            return
        self.up = True

    def receive(self, data: bytes) -> bytes:
        """Bytes from the socket in; the plaintext they complete out. Raises SSL.Error."""
        conn = self.conn
        if not self.first_in:
            self.first_in = data[:8]
        conn.bio_write(data)
        if not self.up:
            self._step()
            if not self.up:
                return b""
        out = []
        while True:
            try:
                out.append(conn.recv(_RECV_CHUNK))
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self.closed = True
                break
        return out[0] if len(out) == 1 else b"".join(out)

    def send(self, data: bytes) -> bytes:
        """Plaintext in; the records to write to the socket out."""
        self.conn.sendall(data)
        return self.outgoing()

    def outgoing(self) -> bytes:
        chunks = []
        while True:
            try:
                chunk = self.conn.bio_read(_BIO_CHUNK)
            except SSL.WantReadError:
                break
            chunks.append(chunk)
            if len(chunk) < _BIO_CHUNK:  # a memory BIO gives all it holds: it is empty now
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def shutdown(self) -> bytes:
        """Our close_notify (once the handshake is done; an unfinished handshake just ends)."""
        if not self.up:
            return b""
        try:
            self.conn.shutdown()
        except SSL.Error:
            pass
        return self.outgoing()

    def peer_der(self) -> bytes | None:
        cert = self.conn.get_peer_certificate()
        return None if cert is None else crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)

    def verified_chain(self) -> list[bytes]:
        """The chain OpenSSL built for the peer, leaf first, trust anchor last (whatever its verdict)."""
        chain = self.conn.get_verified_chain() or []
        return [crypto.dump_certificate(crypto.FILETYPE_ASN1, c) for c in chain]

    def peer_chain(self) -> list[bytes]:
        """The certificates as the peer sent them."""
        chain = self.conn.get_peer_cert_chain() or []
        return [crypto.dump_certificate(crypto.FILETYPE_ASN1, c) for c in chain]

    def facts(self) -> dict[str, str]:
        conn = self.conn
        return {"tls_version": conn.get_protocol_version_name() or "?", "cipher": conn.get_cipher_name() or "?"}


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _no_password(*_args) -> bytes:
    return b""  # an encrypted key then fails to load instead of prompting on the terminal


def _tls_context(server: bool) -> SSL.Context:
    """TLS >= 1.2, no compression, no renegotiation, no tickets and no session cache (so no resumption:
    a removed or expired certificate cannot ride a cached session), buffers released when idle."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD if server else SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_cipher_list(_CIPHERS)
    ctx.set_passwd_cb(_no_password)
    return ctx


def _read_file(path: str, option: str) -> bytes:
    """A file's bytes, or a ConfigError that says why not (missing, permissions, a directory)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(option, f"{path!r} does not exist") from None
    except PermissionError:
        raise ConfigError(option, f"cannot read {path!r}: permission denied for user {_user()}; give that user "
                                  "read access (chmod/chown), or point to a copy it can read") from None
    except IsADirectoryError:
        raise ConfigError(option, f"{path!r} is a directory, not a PEM file") from None
    except OSError as e:
        raise ConfigError(option, f"cannot read {path!r}: {e.strerror or e}") from None


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())


def _load_identity(ctx: SSL.Context, cert: str, key: str | None) -> None:
    """Our certificate (with its chain) and key, every mistake named: missing, unreadable, swapped,
    encrypted, or not belonging together."""
    cert_pem = _read_file(cert, "--cert")
    key_pem = _read_file(key, "--key") if key else cert_pem
    if b"CERTIFICATE-----" not in cert_pem:
        swapped = b"PRIVATE KEY-----" in cert_pem
        raise ConfigError("--cert", f"{cert!r} holds " + ("a private key, not a certificate: are --cert and --key "
                                                           "swapped?" if swapped else "no PEM certificate"))
    if b"PRIVATE KEY-----" not in key_pem:
        if not key:
            raise ConfigError("--key", f"{cert!r} holds no private key: give the key with --key FILE")
        swapped = b"CERTIFICATE-----" in key_pem
        raise ConfigError("--key", f"{key!r} holds " + ("a certificate, not a private key: are --cert and --key "
                                                         "swapped?" if swapped else "no PEM private key"))
    if b"ENCRYPTED" in key_pem:
        where = key or cert
        raise ConfigError("--key" if key else "--cert",
                          f"the key in {where!r} is encrypted (it has a passphrase) and certproxy runs unattended: "
                          f"decrypt it once with  openssl pkey -in {where} -out {where}.plain  and use that "
                          "(mode 0600)")
    try:
        ctx.use_certificate_chain_file(cert)
    except SSL.Error as e:
        raise ConfigError("--cert", f"cannot load a PEM certificate from {cert!r} ({_tls_reason(e)})") from None
    try:
        ctx.use_privatekey_file(key or cert)
    except SSL.Error as e:
        if "mismatch" in _tls_reason(e):
            raise ConfigError("--key", f"the key {key or cert!r} does not belong to the certificate {cert!r}") from None
        raise ConfigError("--key" if key else "--cert",
                          f"cannot load the key from {key or cert!r} ({_tls_reason(e)}); it must be an "
                          "unencrypted PEM key") from None
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise ConfigError("--key", f"the key {key or cert!r} does not belong to the certificate {cert!r}") from None


def _load_trust(ctx: SSL.Context, path: str, option: str) -> list[bytes]:
    """Trust anchors for OpenSSL's chain check; returns their DER. A non-self-signed anchor (an
    intermediate, or a pinned leaf) is accepted as such (PARTIAL_CHAIN)."""
    try:
        ders = _pem_to_der(path)
        if not ders:
            raise ValueError("no PEM certificate in it")
        ctx.load_verify_locations(path)
    except (OSError, ValueError, SSL.Error) as e:
        reason = _tls_reason(e) if isinstance(e, SSL.Error) else getattr(e, "strerror", None) or e
        raise ConfigError(option, f"cannot load {path!r}: {reason}") from None
    ctx.get_cert_store().set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    return ders


def client_context(cfg: ClientConfig) -> SSL.Context:
    """The context for talking to the upstream: our client certificate; the server is checked by
    _server_check inside the handshake (pins and/or the --ca chain and name)."""
    ctx = _tls_context(server=False)
    if cfg.ca:
        _load_trust(ctx, cfg.ca, "--ca")
    ctx.set_verify(SSL.VERIFY_PEER, _on_verify)
    _load_identity(ctx, cfg.cert, cfg.key)
    return ctx


def _server_check(cfg: ClientConfig, ep: Endpoint):
    """The client's verdict on the server's leaf certificate, given inside the handshake: "" to go on,
    else why not (the handshake then fails before our certificate is sent)."""
    name = cfg.server_name or ep.host

    def check(der: bytes, chain_error: tuple[int, int] | None) -> str:
        if cfg.ca:
            fp = format_fingerprint(cert_fingerprint(der))
            if chain_error is not None:
                return (f"server certificate not trusted by --ca: {_verify_error(chain_error[0])} (depth "
                        f"{chain_error[1]}); it presented sha256 {fp}")
            if not _name_matches(der, name):
                return (f"server certificate is not valid for {name!r} (its names: {_names_of(der)}); "
                        "give --server-name NAME")
        if cfg.pins.digests and not cfg.pins.match(der):
            fp = format_fingerprint(cert_fingerprint(der))
            return (f"server certificate does not match any --pin; it presented sha256 {fp} "
                    f"(spki {format_fingerprint(spki_fingerprint(der))}); if you expected this change, "
                    f"add --pin {fp}")
        return ""

    return check


@functools.lru_cache(maxsize=64)
def _expired_on(der: bytes) -> str:
    """The date a certificate expired on, or "" while it is valid (remembered per certificate)."""
    from cryptography import x509

    not_after = _validity(x509.load_der_x509_certificate(der))[1]
    return f"{not_after:%Y-%m-%d}" if not_after <= datetime.datetime.now(_UTC) else ""


def _names_of(der: bytes) -> str:
    from cryptography import x509

    try:
        sans = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return "none"
    return ", ".join(str(n.value) for n in sans.value) or "none"


def _name_matches(der: bytes, name: str) -> bool:
    """RFC 6125 as browsers and Python's ssl do it: subjectAltName only, a wildcard only as the whole
    left-most label, IP addresses against IP entries."""
    from cryptography import x509

    try:
        sans = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    if _is_ip(name):
        return ipaddress.ip_address(name) in sans.get_values_for_type(x509.IPAddress)
    want = name.lower().rstrip(".").split(".")
    for dns in sans.get_values_for_type(x509.DNSName):
        labels = dns.lower().rstrip(".").split(".")
        if len(labels) != len(want):
            continue
        if labels == want or (labels[0] == "*" and len(labels) > 2 and labels[1:] == want[1:]):
            return True
    return False


def _pem_to_der(path: str) -> list[bytes]:
    import base64

    with open(path, "rb") as f:
        data = f.read()
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", data, re.DOTALL)
    try:
        return [base64.b64decode(b"".join(b.split()), validate=True) for b in blocks]
    except ValueError:
        raise ValueError("a certificate block is not valid base64") from None


_UTC = datetime.timezone.utc


def _validity(cert) -> tuple[datetime.datetime, datetime.datetime]:
    """(notBefore, notAfter) as aware UTC datetimes, with the cryptography of Debian 12 (38) too."""
    nb = getattr(cert, "not_valid_before_utc", None) or cert.not_valid_before.replace(tzinfo=_UTC)
    na = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after.replace(tzinfo=_UTC)
    return nb, na


def _signed_by(cert, issuer) -> bool:
    """``cert`` names ``issuer`` as its issuer and carries a signature its key made: checked in Python,
    independently of OpenSSL's verdict (a CA look-alike with the same name and another key fails)."""
    if cert.issuer != issuer.subject:
        return False
    try:
        direct = getattr(cert, "verify_directly_issued_by", None)  # cryptography >= 40
        if direct is not None:
            direct(issuer)
            return True
        from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

        key = issuer.public_key()
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        else:
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        return True
    except Exception:  # InvalidSignature, ValueError, TypeError (key type), unsupported padding: no
        return False


class Verdict(NamedTuple):
    fingerprint: str
    spki: str
    subject: str
    issuer: str
    allowed: bool
    why: str  # when not allowed: for the log
    reply: str  # when not allowed: the SMTP reply
    name: str  # when allowed: who it is (XCLIENT LOGIN, logs)
    until: float  # time.time() after which this verdict must be made again (a date is crossed)
    kind: str = "allowed"  # else why, in one word (unknown, chain, expired, revoked...): the metrics' label


@dataclass(frozen=True, slots=True)
class ClientPolicy:
    """Who may reach the backend: exact certificates (--allow), certificates a private CA issued
    (--client-ca), optionally narrowed to fingerprints (--allow-fingerprint). Everything is decided
    here, after the handshake: OpenSSL's chain verdict is one input, never the only gate."""

    allowed: frozenset[bytes]  # SHA-256 of each --allow certificate
    ca_fingerprints: frozenset[bytes]  # SHA-256 of each --client-ca certificate
    fingerprints: Pins
    denied: Pins = Pins(frozenset())  # --deny-fingerprint: refused before anything else is asked
    revoked: dict = field(default_factory=dict, compare=False)  # (issuer, serial) -> Revocation, --crl
    crl_updates: dict = field(default_factory=dict, compare=False)  # --crl file -> nextUpdate of what was loaded
    _verdicts: dict = field(default_factory=dict, compare=False, repr=False)  # see judge()

    def judge(self, der: bytes, tls: _TLS | None = None) -> Verdict:
        """The verdict on a client certificate. Made once per certificate, chain and policy (a reload
        makes a new policy) and remembered until a date in it is crossed: parsing with cryptography on
        every session cost about 5% of the server's CPU. Bounded: emptied when full."""
        chain: list[bytes] = []
        error = None
        key = fp = cert_fingerprint(der)
        if self.ca_fingerprints and fp not in self.allowed and tls is not None:
            chain, error = tls.verified_chain(), tls.check.error
            key = fp + hashlib.sha256(b"".join(chain) + repr(error).encode()).digest()
        verdict = self._verdicts.get(key)
        if verdict is None or time.time() >= verdict.until:
            try:
                verdict = self._judge(der, chain, error)
            except ValueError as e:  # OpenSSL took it, cryptography cannot parse it: never a yes
                text = format_fingerprint(fp)
                verdict = Verdict(text, "?", "?", "?", allowed=False, why=f"certificate cannot be parsed ({e})",
                                  reply="554 5.7.1 certificate not authorised", name="", until=float("inf"),
                                  kind="unparsable")
            if len(self._verdicts) >= MAX_VERDICTS:
                self._verdicts.clear()
            self._verdicts[key] = verdict
        return verdict

    def _judge(self, der: bytes, chain: list[bytes], error: tuple[int, int] | None) -> Verdict:
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        fp = cert_fingerprint(der)
        nb, na = _validity(cert)
        now = datetime.datetime.now(_UTC)
        why, reply, kind = "", "554 5.7.1 certificate not authorised", "unknown"
        barred = self.barred(der, cert, chain)
        if barred:
            why, reply, kind = barred
        elif now >= na:
            why = f"certificate expired on {na:%Y-%m-%d %H:%M} UTC ({(now - na).days} days ago)"
            reply, kind = f"554 5.7.1 certificate expired on {na:%Y-%m-%d}", "expired"
        elif now < nb:
            why, reply = f"certificate is not valid before {nb:%Y-%m-%d %H:%M} UTC", "554 5.7.1 certificate not yet valid"
            kind = "not_yet_valid"
        elif fp not in self.allowed:
            why, kind = self._ca_problem(cert, chain, error) if self.ca_fingerprints else \
                ("certificate is not an --allow certificate", "unknown")
        if not why and self.fingerprints.digests and not self.fingerprints.match(der):
            why, kind = "certificate fingerprint is not in --allow-fingerprint", "fingerprint"
        # Judged again once a date in it is crossed: the leaf's (or a CA's) end, or a future start.
        dates = [nb] if now < nb else [na] + [_validity(x509.load_der_x509_certificate(d))[1] for d in chain[1:]]
        until = min((d.timestamp() for d in dates if d > now), default=float("inf"))
        return Verdict(format_fingerprint(fp), format_fingerprint(spki_fingerprint(der)), cert.subject.rfc4514_string(),
                       cert.issuer.rfc4514_string(), allowed=not why, why=why, reply=reply if why else "",
                       name="" if why else self.name(der), until=until, kind=kind if why else "allowed")

    def barred(self, der: bytes, cert=None, chain: list[bytes] = ()) -> tuple[str, str, str] | None:
        """(why, reply, kind) when ``der`` is shut out whatever else allows it: its certificate or key,
        or a CA certificate of its chain, is in --deny-fingerprint, or a --crl revokes it or a CA of its
        chain; else None."""
        if self.denied.digests:
            if self.denied.match(der):
                return "certificate (or its key) is in --deny-fingerprint", "554 5.7.1 certificate revoked", "denied"
            for ca in chain[1:]:  # a CA on the way (a compromised intermediate) shuts out all it issued
                if self.denied.match(ca):
                    return (f"its CA {certificate_subject(ca)} is in --deny-fingerprint", "554 5.7.1 certificate revoked",
                            "denied")
        if not self.revoked:
            return None
        from cryptography import x509

        cert = cert or x509.load_der_x509_certificate(der)
        for c in [cert] + [x509.load_der_x509_certificate(d) for d in chain[1:]]:
            hit = self.revoked.get((_canonical_name(c.issuer), c.serial_number))
            if hit is not None:
                who = "certificate" if c is cert else f"its CA {c.subject.rfc4514_string()}"
                return (f"{who} revoked on {hit.date:%Y-%m-%d %H:%M} UTC ({hit.reason}) by --crl {hit.crl}",
                        f"554 5.7.1 certificate revoked on {hit.date:%Y-%m-%d}", "revoked")
        return None

    def _ca_problem(self, cert, chain: list[bytes], error: tuple[int, int] | None) -> tuple[str, str]:
        """Why ``cert`` is not a certificate a --client-ca issued, and that in one word (unknown: not
        ours at all; chain: ours by name, but the chain fails), or ("", "") if it is: OpenSSL's chain
        ends at one of our CA certificates, OpenSSL found nothing wrong (dates, CA constraints,
        purpose), and every signature on the way is checked again here."""
        from cryptography import x509

        if len(chain) < 2 or cert_fingerprint(chain[-1]) not in self.ca_fingerprints:
            return "certificate is neither an --allow certificate nor issued by --client-ca", "unknown"
        if error is not None:
            return f"--client-ca chain check failed: {_verify_error(error[0])} (depth {error[1]})", "chain"
        certs = [cert] + [x509.load_der_x509_certificate(d) for d in chain[1:]]
        for child, parent in zip(certs, certs[1:]):
            if not _signed_by(child, parent):
                return f"signature by {parent.subject.rfc4514_string()} does not verify (a CA look-alike?)", "chain"
        return "", ""

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


class Revocation(NamedTuple):
    date: datetime.datetime
    reason: str
    crl: str  # the file that says so


def _canonical_name(name) -> tuple:
    """A distinguished name as OpenSSL compares names (X509_NAME canonical form): attribute types and
    values, case-folded, inner white space collapsed, whatever string type encodes them. A CRL's issuer
    and a certificate's issuer written as PrintableString on one side and UTF8String on the other are
    the same CA."""
    return tuple((a.oid.dotted_string, " ".join(str(a.value).split()).casefold()) for a in name)


def _read_crl(path: str):
    """An X.509 CRL from a PEM or DER file (OSError, ValueError)."""
    from cryptography import x509

    with open(path, "rb") as f:
        data = f.read()
    return x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)


def _next_update(crl) -> datetime.datetime | None:
    """A CRL's nextUpdate as an aware UTC datetime, with the cryptography of Debian 12 (38) too."""
    return getattr(crl, "next_update_utc", None) or (crl.next_update and crl.next_update.replace(tzinfo=_UTC))


def _load_crls(paths: tuple[str, ...], ca_ders: list[bytes]) -> tuple[dict, dict]:
    """Every --crl (PEM or DER X.509 CRL, as ``certproxy ca revoke`` or ``openssl ca -gencrl`` write
    them): each must be signed by one of the --client-ca certificates, or certproxy does not start. A
    CRL past its nextUpdate is still enforced (the daily watch says so loudly): an outdated list of
    stolen laptops is better than none. Returns ({(issuer, serial): Revocation}, {file: nextUpdate})."""
    from cryptography import x509

    cas = [x509.load_der_x509_certificate(d) for d in ca_ders]
    revoked: dict[tuple[tuple, int], Revocation] = {}
    next_updates: dict[str, datetime.datetime | None] = {}
    for path in paths:
        try:
            crl = _read_crl(path)
        except OSError as e:
            raise ConfigError("--crl", f"cannot read {path!r}: {e.strerror}") from None
        except ValueError:
            raise ConfigError("--crl", f"{path!r} is not an X.509 CRL (PEM or DER)") from None
        issuer = _canonical_name(crl.issuer)
        named = [ca for ca in cas if _canonical_name(ca.subject) == issuer]
        if not any(crl.is_signature_valid(ca.public_key()) for ca in named):
            raise ConfigError("--crl", f"{path!r} is issued by {crl.issuer.rfc4514_string()}, "
                                       + ("but its signature does not verify with the --client-ca of that name"
                                          if named else "which is not a --client-ca certificate")
                                       + ": a CRL from another CA")
        next_updates[path] = _next_update(crl)
        for entry in crl:
            when = getattr(entry, "revocation_date_utc", None) or entry.revocation_date.replace(tzinfo=_UTC)
            try:
                reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
            except x509.ExtensionNotFound:
                reason = "unspecified"
            revoked[(issuer, entry.serial_number)] = Revocation(when, reason, path)
    return revoked, next_updates


def _crl_next_update(path: str) -> datetime.datetime | None:
    try:
        return _next_update(_read_crl(path))
    except (OSError, ValueError):
        return None


def _due(when: datetime.datetime, past: str, soon: str) -> str | None:
    """``past`` once ``when`` has come, ``soon`` within EXPIRY_WARNING_DAYS of it, else None (templates
    with {date}, and {days} left)."""
    left = when - datetime.datetime.now(_UTC)
    if left.total_seconds() <= 0:
        return past.format(date=f"{when:%Y-%m-%d}")
    if left.days < EXPIRY_WARNING_DAYS:
        return soon.format(days=left.days, date=f"{when:%Y-%m-%d}")
    return None


def crl_problem(nxt: datetime.datetime | None) -> str | None:
    """Like expiry_problem, for a CRL's nextUpdate: it is time to sign a fresh one."""
    if nxt is None:
        return None
    return _due(nxt, "OUTDATED since {date} (its nextUpdate); still enforced", "nextUpdate in {days} days ({date})")


def server_context(cfg: ServerConfig) -> tuple[SSL.Context, ClientPolicy]:
    """The listener's context (asks for a client certificate and accepts any: see ClientPolicy) and the
    policy applied after every handshake."""
    ctx = _tls_context(server=True)
    _load_identity(ctx, cfg.cert, cfg.key)
    allowed = set()
    for path in _allow_files(cfg.allow):
        try:
            ders = _pem_to_der(path)
        except (OSError, ValueError) as e:
            raise ConfigError("--allow", f"cannot read certificates from {path!r}: {e}") from None
        if not ders:
            raise ConfigError("--allow", f"{path!r} holds no PEM certificate")
        allowed.update(cert_fingerprint(der) for der in ders)
    ca_ders: list[bytes] = []
    if cfg.client_ca:
        ca_ders = _load_trust(ctx, cfg.client_ca, "--client-ca")
        from cryptography import x509

        for der in ca_ders:  # the CA names in the certificate request: clients pick the right certificate
            ca = x509.load_der_x509_certificate(der)
            try:
                ctx.add_client_ca(ca)  # pyOpenSSL >= 24
            except TypeError:
                ctx.add_client_ca(crypto.X509.from_cryptography(ca))  # Debian 12's 23.0
    if cfg.client_cert != "none":
        # VERIFY_PEER without FAIL_IF_NO_PEER_CERT: ask, accept any answer (even none), judge afterwards.
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _on_verify)
    revoked, next_updates = _load_crls(cfg.crl, ca_ders)
    return ctx, ClientPolicy(frozenset(allowed), frozenset(cert_fingerprint(d) for d in ca_ders),
                             cfg.allow_fingerprints, cfg.deny_fingerprints, revoked, next_updates)


def certificate_subject(der: bytes) -> str:
    from cryptography import x509

    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


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
            # The same limit whether a line comes whole or in pieces: its length without the line end
            # (trailing CRs included), and in any case at most twice that in bytes.
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > 2 * MAX_REPLY_LINE or len(self._buf.rstrip(b"\r")) > MAX_REPLY_LINE:
                    raise ProtocolError("421 4.5.0 upstream reply line too long", "upstream sent a reply line over the limit")
                return None
            raw = bytes(self._buf[:end]).rstrip(b"\r")
            if end > 2 * MAX_REPLY_LINE or len(raw) > MAX_REPLY_LINE:
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

    done = ready

    def start(self) -> bytes:
        return b""  # the server speaks first

    def eof(self) -> None:
        raise SessionError("421 4.4.2 upstream closed the connection",
                           f"upstream closed the connection during the pre-TLS dialogue ({self.state.value})")

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


class Exchange:
    """One command (or none, to hear a greeting) and its one reply, sans-IO: for the upstream's
    greeting or NOOP inside TLS, the backend's greeting, EHLO, XCLIENT and the hand-over replay.
    With ``keep`` the bytes received are kept in ``raw`` (to be passed on) and may run past the
    reply; otherwise anything behind the reply was never asked for and raises ProtocolError."""

    __slots__ = ("command", "who", "keep", "raw", "reply", "_parser")

    def __init__(self, command: bytes = b"", *, who: str = "upstream", keep: bool = False) -> None:
        self.command, self.who, self.keep = command, who, keep
        self.raw = b""
        self.reply: Reply | None = None
        self._parser = ReplyParser()

    def start(self) -> bytes:
        return self.command

    @property
    def done(self) -> bool:
        return self.reply is not None

    def receive_data(self, data: bytes) -> bytes:
        if self.keep:
            self.raw += data
        self.reply = self._parser.next_reply(data)
        if self.reply is not None and not self.keep and self._parser.trailing_data:
            raise ProtocolError("421 4.5.0 unexpected replies", f"{self.who} sent more than the one reply expected")
        return b""

    def eof(self) -> None:
        raise SessionError("", f"{self.who} closed the connection")


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
        """The opening line; a client that may not pass hears its refusal there (RFC 5321 4.3.1: 554)."""
        if self.refusal is not None:
            return self.refusal.encode() + b"\r\n"
        return f"220 {self.hostname} ESMTP certproxy\r\n".encode()

    def start(self) -> bytes:
        return b""  # the greeting, where one is owed, is the session's to send

    @property
    def done(self) -> bool:
        return self.state is not _GateState.OPEN

    def eof(self) -> None:
        self.state = _GateState.CLOSED
        if not self.reason:
            self.reason = "client left before STARTTLS" if self.refusal is None else "client left"

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
        if verb == "QUIT":
            self.state = _GateState.CLOSED
            self.reason = f"{self.reason}; the client quit" if self.reason else "client quit"
            return b"221 2.0.0 Bye\r\n"
        if self.refusal is not None:  # RFC 3207 4.1: every command but QUIT gets the refusal
            self.errors += 1
            return self.refusal.encode() + b"\r\n"
        if verb in ("EHLO", "HELO"):
            if not arg:
                self.errors += 1
                return f"501 5.5.4 Syntax: {verb} hostname\r\n".encode()
            self.helo = self._raw
            if verb == "EHLO":
                # Only STARTTLS: nothing that invites pipelining or anything else before TLS.
                return f"250-{host}\r\n250 STARTTLS\r\n".encode()
            return f"250 {host}\r\n".encode()
        if verb in ("NOOP", "RSET"):
            return b"250 2.0.0 Ok\r\n"
        if verb == "STARTTLS":
            if arg:
                self.errors += 1
                return b"501 5.5.4 Syntax: STARTTLS takes no arguments\r\n"
            self.state = _GateState.STARTTLS
            return b"220 2.0.0 Ready to start TLS\r\n"
        if self.optional:
            self.state = _GateState.HANDOVER
            self.pending = self._raw + bytes(self._buf)
            self._buf.clear()
            return b""
        self.errors += 1
        self.refused_clear = True
        self.reason = f"{verb or 'empty line'} in clear refused (530 Must issue a STARTTLS command first)"
        return b"530 5.7.0 Must issue a STARTTLS command first\r\n"


class HideExtensions:
    """Filters what the MTA says to a client that is inside TLS already: in an EHLO reply, STARTTLS
    would be a lie there, and XCLIENT / XFORWARD are meant for certproxy (the MTA trusts our address
    with them), not for the client. The MTA-to-client direction carries only replies (mail flows the
    other way), so parsing it costs little; a reply beyond the limits ends the filtering and passes
    through as it is. It also remembers the last complete reply code, so that when the MTA hangs up
    the splice can ask what the client is owed (``farewell``)."""

    __slots__ = ("_buf", "done", "_lines", "hidden", "last_code", "on_reply")
    HIDDEN = frozenset((b"STARTTLS", b"XCLIENT", b"XFORWARD"))
    hold = False  # see CommandWatch: this observer never asks the pump to stop reading
    stop = None

    def __init__(self, hidden: frozenset[bytes] = HIDDEN, on_reply=None) -> None:
        self._buf = bytearray()
        self._lines: list[bytes] = []
        self.done = False
        self.hidden = hidden
        self.last_code = 0  # of the last complete reply passed on; 0: none yet
        self.on_reply = on_reply  # called with (code, lines) for every complete reply

    @property
    def between_replies(self) -> bool:
        """Nothing of a reply is half passed on: a reply of our own would not be spliced into one."""
        return not self.done and not self._buf and not self._lines

    def farewell(self) -> bytes:
        """What the client is owed when the server hangs up. Unless the server's last reply was a
        goodbye (221, 421), the client may be waiting for an answer (say, to the end of DATA) and must
        learn that nothing after the last reply was accepted: 421, as an MTA would say itself."""
        if not self.between_replies or self.last_code in (221, 421):
            return b""
        return SERVER_GONE_REPLY

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
                lines, self._lines = self._lines, []
                out += self._strip(lines)
                self.last_code = int(line[:3]) if line[:3].isdigit() else -1
                if self.on_reply is not None:
                    self.on_reply(self.last_code, lines)

    def _strip(self, lines: list[bytes]) -> list[bytes]:
        if len(lines) < 2 or not lines[0].startswith(b"250") or not self.hidden:
            return lines
        kept = [lines[0]] + [ln for ln in lines[1:] if ln[4:].split(b" ", 1)[0].strip().upper()
                             not in self.hidden]
        if len(kept) < len(lines) and kept[-1][3:4] == b"-":
            kept[-1] = kept[-1][:3] + b" " + kept[-1][4:]
        return kept


_LF_DOT, _CR_DOT = re.compile(rb"\n\."), re.compile(rb"\r\.")


def _content_end(buf: bytes | bytearray) -> int:
    """Where message content may end: the index of the CR or LF before a line holding only ".", that
    line ended by CR or LF (CRLF.CRLF for every MTA, bare LF or CR for some: the SMTP-smuggling
    variants), or such a line cut short by the end of ``buf``; -1 if there is none. memchr-fast."""
    pos, n = buf.find(b"."), len(buf)
    if pos < 0:
        return -1  # no dot at all (a base64 attachment): found by memchr, the common case of bulk
    pos = max(pos - 1, 0)
    while True:
        # re's literal search is faster than bytes.find for a two-byte needle whose first byte is frequent
        lf, cr = _LF_DOT.search(buf, pos), _CR_DOT.search(buf, pos)
        if lf is None and cr is None:
            return -1
        i = cr.start() if lf is None or (cr is not None and cr.start() < lf.start()) else lf.start()
        if i + 2 >= n or buf[i + 2] in (0x0D, 0x0A):
            return i
        pos = i + 2  # a dot-stuffed line ("..") or text after the dot: not an end


class CommandWatch:
    """Watches what a client inside the tunnel sends its MTA, so that the commands certproxy hides
    from it (XCLIENT, XFORWARD: the MTA trusts certproxy's address with them) never get through, while
    message content is never inspected. Sans-IO: ``feed`` takes the client's bytes and returns what may
    go on to the MTA; ``reply`` is told of each of the MTA's replies (in order: SMTP answers every line
    a client sends with one reply, pipelined or not) and returns what it releases.

    The content of a message is recognised only once the MTA has said so: after ``DATA`` the client's
    bytes are held (and its reading paused, ``hold``) until the MTA's reply to DATA; only a 354 starts
    the content, which then ends at the earliest line "." any MTA could take for its end (bare CR or LF
    included: SMTP smuggling). A BDAT chunk is skipped by its length only if the MTA offered CHUNKING.
    Whatever is not surely content is read as commands: a mistake can only refuse a client, never pass
    a hidden command. One found sets ``stop`` = (reply, reason) and nothing from it on goes through."""

    __slots__ = ("_buf", "_mode", "_left", "_pending", "_chunking", "_line_start", "hold", "stop")
    HIDDEN = frozenset((b"XCLIENT", b"XFORWARD"))
    done = False
    _BLANKS = b" \t\r\v\f"  # what Postfix's smtpd_token() skips before a verb and ends it with
    MAX_LINE = 4096  # a command line longer than this is none a real MTA takes whole (Postfix: 2048)

    def __init__(self) -> None:
        self._buf = bytearray()
        self._mode = "command"  # command | wait (DATA sent, its reply not yet seen) | content | chunk
        self._left = 0  # bytes of a BDAT chunk still to pass
        self._pending: collections.deque[bytes] = collections.deque()  # verbs whose reply is outstanding
        self._chunking = False
        self._line_start = True  # in content: the next byte begins a line
        self.hold = False
        self.stop: tuple[bytes, str] | None = None

    def feed(self, data: bytes) -> bytes:
        if self.stop is not None:
            return b""
        if self._mode == "content" and not self._buf and not self._line_start and data[-1:] not in (b"\r", b"\n") \
                and _content_end(data) < 0:
            return data  # the bulk of a message: passed as it is, no copy
        self._buf += data
        out = bytearray()
        while self._buf and self.stop is None and self._mode != "wait":
            if self._mode == "chunk":
                n = min(self._left, len(self._buf))
                piece = bytes(self._buf[:n])
                del self._buf[:n]
                self._left -= n
                if not self._left:
                    self._mode = "command"
            elif self._mode == "content":
                piece = self._content()
            else:
                piece = self._command_line()
            if piece is None:
                break  # more input needed
            out += piece
        self.hold = self._mode == "wait"
        return bytes(out)

    def _content(self) -> bytes | None:
        """Message content up to and including its end, or what surely is not the start of an end."""
        buf = self._buf
        if self._line_start:  # the first byte of the content: a "." here may end it already
            if buf[:1] == b".":
                if len(buf) < 2 or (buf[1:2] == b"\r" and len(buf) < 3):
                    return None
                if buf[1:2] in (b"\r", b"\n"):
                    return self._end_of_content(0)
            self._line_start = False
        i = _content_end(buf)
        if i >= 0:
            t = i + 2  # the CR or LF behind the dot
            if t < len(buf) and (buf[t] == 0x0A or t + 1 < len(buf)):
                return self._end_of_content(i + 1)
            cut = i  # not decided yet: keep the line break and the dot for the next read
        else:
            cut = len(buf) - (buf[-1:] in (b"\r", b"\n"))  # a "." may follow in the next read
        piece = bytes(buf[:cut])
        del buf[:cut]
        return piece or None

    def _end_of_content(self, dot: int) -> bytes:
        buf, t = self._buf, dot + 1
        end = t + 2 if buf[t: t + 2] == b"\r\n" else t + 1
        piece = bytes(buf[:end])
        del buf[:end]
        self._mode = "command"
        self._pending.append(b".")  # the MTA's verdict on the message
        return piece

    def _command_line(self) -> bytes | None:
        end = self._buf.find(b"\n")
        if end < 0:
            if len(self._buf) > self.MAX_LINE:
                self.stop = (b"500 5.5.2 line too long\r\n", "client sent a command line over 4096 octets")
            return None
        line = bytes(self._buf[: end + 1])
        words = line.lstrip(self._BLANKS).split(None, 2)
        verb = words[0].upper() if words else b""
        if verb in self.HIDDEN:
            self.stop = (b"421 4.7.0 " + verb + b" is not for clients; closing\r\n",
                         f"client sent {verb.decode('latin-1')} inside the tunnel: not passed to the MTA, session ended")
            return None
        del self._buf[: end + 1]
        self._pending.append(verb)
        if verb == b"DATA":
            self._mode = "wait"
        elif verb == b"BDAT" and self._chunking and len(words) > 1 and words[1].isdigit() and len(words[1]) < 12 \
                and (len(words) == 2 or words[2].strip().upper() == b"LAST"):
            self._left = int(words[1])
            self._mode = "chunk" if self._left else "command"
        return line

    def reply(self, code: int, lines: list[bytes]) -> bytes:
        """The MTA's next reply: the one owed to the oldest outstanding line. Returns what it releases."""
        if not self._pending or self.stop is not None:
            return b""  # unsolicited (a 421 before closing): nothing to learn
        verb = self._pending.popleft()
        if code == 354:
            if verb != b"DATA" or self._mode != "wait" or self._pending:
                self.stop = (b"421 4.7.0 protocol out of step; closing\r\n",
                             "the MTA started message content where certproxy saw no DATA waiting; session ended")
                return b""
            self._mode, self._line_start = "content", True  # its end is owed one more reply: see "."
        elif verb == b"DATA" and self._mode == "wait":
            self._mode = "command"  # refused: what the client sent behind it is commands
        elif verb == b"EHLO" and code == 250:
            self._chunking = any(ln[4:].split(None, 1)[:1] == [b"CHUNKING"] for ln in lines[1:])
        if self._mode == "wait":
            return b""
        return self.feed(b"")


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
    """One side of a spliced pair, on a plain TCP transport, with TLS (a _TLS engine) once
    ``start_tls`` has run. Knows nothing about SMTP: plaintext in here goes out of ``peer``.

    Data arriving before the pair is linked is held (and reading paused) until ``link``.
    Backpressure: when our transport's write buffer is full, the peer stops reading.
    """

    __slots__ = ("transport", "tls", "peer", "held", "nbytes", "lost", "eof", "waiter", "filter", "handshake",
                 "tls_error", "_splice", "_released")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.tls: _TLS | None = None
        self.peer: _Pump | None = None
        self.held: list[bytes] = []
        self.nbytes = 0  # plaintext received
        self.lost = False
        self.eof = False
        self.waiter: asyncio.Future[None] | None = None  # woken by held data or loss, before linking
        self.filter = None  # an observer that may rewrite what we receive (feed(bytes) -> bytes), see HideExtensions
        self.handshake: asyncio.Future[None] | None = None  # the TLS handshake, once started
        self.tls_error = ""  # why TLS failed, in OpenSSL's words
        self._splice: _Splice | None = None
        self._released = False

    # -- the transport's side -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.tls is not None:  # TLS from the first byte (implicit TLS): a client's ClientHello
            hello = self.tls.start()
            if hello:
                transport.write(hello)

    def data_received(self, data: bytes) -> None:
        tls = self.tls
        if tls is not None:
            was_up = tls.up
            try:
                data = tls.receive(data)
            except SSL.Error as e:
                self._tls_failed(_tls_reason(e))
                return
            except Exception as e:  # pyOpenSSL re-raises what a callback raised: still a failed handshake
                self._tls_failed(f"{type(e).__name__}: {e}")
                return
            out = tls.outgoing()
            if out:
                self.transport.write(out)
            if not was_up and tls.up:
                self._handshake_over(None)
            if tls.closed:  # close_notify: the peer has said all it will
                if data:
                    self._deliver(data)
                self._end_of_input()
                return
            if not data:
                return
        self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        self.nbytes += len(data)
        self._pass(data)

    def _pass(self, data: bytes) -> None:
        """Through the observer (``filter``), then to the peer, or held until the pair is linked. The
        observer may ask to stop reading for a while (``hold``) or to end the splice (``stop``)."""
        watch = self.filter
        if watch is not None:
            data = watch.feed(data)
            if watch.done:
                self.filter = None
            if watch.stop is not None:
                self.stop_splice(*watch.stop)
                return
            if watch.hold and self.transport is not None:
                self.transport.pause_reading()
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
        peer.write(data)

    def eof_received(self) -> bool:
        self._end_of_input()
        return True  # keep our sending half open: the other direction may still have bytes for us

    def _end_of_input(self) -> None:
        if self.eof:
            return
        self.eof = True
        self._handshake_over(SessionError("", "connection closed during the TLS handshake"))
        self._wake()
        peer, splice = self.peer, self._splice
        if splice is not None and self is splice.b:
            splice.far_gone()
        if peer is not None and splice is not None and not peer.lost:
            if peer.eof:
                splice.close()  # both have said all they will: done
            elif peer.can_write_eof():
                peer.write_eof()
            elif self is splice.b or self.nbytes == 0:
                # The server side is done talking, or a client that never said anything left: TLS
                # cannot pass on a half-close, and nobody is owed an answer.
                splice.close()
            else:
                splice.linger()  # the client is done talking; the server may still answer

    def stop_splice(self, reply: bytes, reason: str) -> None:
        if self._splice is not None:
            self._splice.stop(reply, reason)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.lost:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.lost:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._handshake_over(SessionError("", "connection closed during the TLS handshake"))
        self._wake()
        peer = self.peer
        if self._splice is not None and self is self._splice.b:
            self._splice.far_gone()
        if peer is not None and not peer.lost and peer.transport is not None:
            peer.close()  # flushes what is buffered for it first
        if self._splice is not None:
            self._splice.side_lost()
        if self._released:
            self.transport = None

    # -- TLS --------------------------------------------------------------------------------------

    def start_tls(self, tls: _TLS) -> asyncio.Future[None]:
        """Switch to TLS; the future completes when the handshake has. Called before the transport
        exists, TLS starts with the first byte (implicit TLS). Called on a connection that spoke in
        clear (STARTTLS), whatever arrived in clear and is still held would be read as if it came
        inside TLS (CVE-2011-0411, CVE-2014-3556): refused, whichever side we are."""
        if self.held:
            raise ProtocolError("421 4.7.0 data pipelined before the TLS handshake; closing",
                                f"{sum(map(len, self.held))} bytes arrived in clear behind the switch to TLS "
                                "(command or response injection, CVE-2011-0411); refused")
        self.tls = tls
        self.handshake = asyncio.get_running_loop().create_future()
        if self.transport is not None:
            hello = tls.start()
            if hello:
                self.transport.write(hello)
            self.transport.resume_reading()
        return self.handshake

    def _handshake_over(self, error: SessionError | None) -> None:
        waiter = self.handshake
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def _tls_failed(self, reason: str) -> None:
        """A TLS error: send the alert OpenSSL wrote, close, and let whoever waits know why."""
        self.tls_error = reason
        out = self.tls.outgoing()
        self.tls = None  # nothing more goes through it
        if out:
            self.transport.write(out)
        self._handshake_over(SessionError("", reason))
        self.transport.close()

    # -- our side ---------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        tls = self.tls
        if tls is not None:
            if not tls.up:
                return  # nothing of ours goes out before the handshake is done, and never in clear
            data = tls.send(data)
        elif self.tls_error:
            return  # TLS broke: nothing may go out in clear now
        self.transport.write(data)

    def can_write_eof(self) -> bool:
        """A half-close we can pass on as it is: plain TCP (TLS has no half-close of its own here)."""
        return self.tls is None and not self.tls_error and self.transport.can_write_eof()

    def write_eof(self) -> None:
        """No more from us: close_notify first under TLS, then the TCP half-close."""
        if self.tls is not None:
            self.transport.write(self.tls.shutdown())
        if self.transport.can_write_eof():
            try:
                self.transport.write_eof()
            except OSError:  # the peer is gone already
                pass

    def close(self) -> None:
        t = self.transport
        if t is None or self.lost or t.is_closing():
            return
        if self.tls is not None:
            out = self.tls.shutdown()
            if out:
                t.write(out)
        t.close()

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


async def _pull(pump: _Pump) -> bytes:
    """The next bytes a not-yet-linked pump received; b"" when the peer has closed."""
    await pump.wait_held()
    data = b"".join(pump.held)
    pump.held.clear()
    return data


async def _drive(pump: _Pump, dialogue) -> None:
    """Run one sans-IO SMTP dialogue over a not-yet-spliced pump until it is done: what it says to
    ``start`` is sent, every byte received is fed to it and its answer sent back. At the end of the
    input it is told (``eof``: it raises SessionError, or ends itself); a TLS failure raises."""
    out = dialogue.start()
    if out:
        pump.write(out)
    while not dialogue.done:
        data = await _pull(pump)
        if not data:
            if pump.tls_error:
                raise SessionError("", f"TLS failed: {pump.tls_error}")
            dialogue.eof()
            return
        out = dialogue.receive_data(data)
        if out and not pump.lost:
            pump.write(out)


def _close_all(*pumps: _Pump | None) -> None:
    """Whatever a session ends with, none of its transports outlives it."""
    for p in pumps:
        if p is not None:
            p.close()


def _abort_all(*pumps: _Pump | None) -> None:
    for p in pumps:
        # A pump whose TLS failed is closing already, behind its alert: a reset would eat the alert.
        if p is not None and p.transport is not None and not p.lost and not p.tls_error:
            p.transport.abort()


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
        p.peer = p._splice = p.filter = p.waiter = p.handshake = None
        p.held = []
        p._released = True
        if p.lost:
            p.transport = None
            p.tls = None


async def _goodbye(pump: _Pump, reply: str | bytes) -> None:
    """Send a last reply and close without losing it: half-close (after close_notify under TLS), then
    discard what the peer still sends for a moment (closing with unread input makes the kernel send a
    reset, which can destroy the reply in flight)."""
    t = pump.transport
    if t is None or pump.lost or t.is_closing():
        return
    if reply:
        pump.write(reply if isinstance(reply, bytes) else reply.encode() + b"\r\n")
    if t.can_write_eof():
        pump.write_eof()
        try:
            async with asyncio.timeout(GOODBYE_LINGER_S):
                while await _pull(pump):
                    pass
        except (TimeoutError, asyncio.TimeoutError):
            pass
    pump.close()


class _Splice:
    """Two linked pumps, an idle timer, and a future that completes when both sides are closed.
    ``a`` is the side that connected to us, ``b`` the side we dialed. ``watch``, if given, is asked
    (``farewell()``) what ``a`` is owed when ``b`` hangs up: the splice itself knows no protocol."""

    def __init__(self, a: _Pump, b: _Pump, idle: float, watch=None) -> None:
        self.a, self.b = a, b
        self.idle = idle
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self.last = self.loop.time()
        self.outcome, self.reason = "ok", ""
        self._timer = self.loop.call_later(idle, self._check_idle)
        self._linger: asyncio.TimerHandle | None = None
        self.watch = watch
        self._far_gone = False
        a.peer, b.peer = b, a
        a._splice = b._splice = self
        for side in (a, b):
            held, side.held = side.held, []
            if held and not side.peer.lost:
                side._pass(b"".join(held))  # what arrived before the link meets the observers too
            if not side.lost and not (side.filter is not None and side.filter.hold):
                side.transport.resume_reading()
        for side in (a, b):
            if side.lost:
                side.connection_lost(None)
            elif side.eof:
                side.eof = False
                side._end_of_input()

    def touch(self) -> None:
        self.last = self.loop.time()

    def far_gone(self) -> None:
        """``b`` hung up (closed, or the connection broke): say to ``a`` what the watch says it is owed."""
        if self._far_gone:
            return
        self._far_gone = True
        a = self.a
        if self.watch is None or a.lost or a.transport is None or a.transport.is_closing():
            return
        owed = self.watch.farewell()
        if owed:
            a.write(owed)

    def stop(self, reply: bytes, reason: str) -> None:
        """An observer found what may not pass: ``b`` gets nothing more (cut), ``a`` gets ``reply``."""
        if self.a is None or self.outcome == "refused":
            return
        self.outcome, self.reason = "refused", reason
        self._far_gone = True  # the farewell is this reply
        _abort_all(self.b)
        a = self.a
        if not a.lost and a.transport is not None and not a.transport.is_closing():
            a.write(reply)
        a.close()

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
            side.close()

    def abort(self) -> None:
        _abort_all(self.a, self.b)

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
# region One connection: phases, and the listeners ------------------------------------------------

_session_ids = itertools.count(1)
_WORKER: int | None = None  # with --workers N: this process's number, in every session line
_REUSE_PORT = False  # with --workers N: every worker binds the same port (SO_REUSEPORT)


# Characters a peer could use to forge or hide log lines: C0 controls (CR, LF, ESC ...), DEL, C1 (NEL
# U+0085 among them) and the Unicode line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match) -> str:
    c = ord(match.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def _kv(**facts: object) -> str:
    """``key=value`` pairs, quoted where needed, in a stable order: what operators grep. A value a
    peer controls (a command, a name, a certificate subject) can neither end the line nor fake one:
    control characters are written as ``\\xNN`` / ``\\uNNNN`` inside quotes."""
    out = []
    for k, v in facts.items():
        if v is None or v == "":
            continue
        s = str(v)
        if any(c in s for c in ' "=\t\\') or _UNSAFE.search(s):
            s = '"' + _UNSAFE.sub(_escape, s.replace("\\", "\\\\").replace('"', '\\"')) + '"'
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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SSL.Error):
        return f"TLS error: {_tls_reason(exc)}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


Phase = tuple  # (name, deadline in seconds or None, step: async () -> None, SMTP reply owed on timeout)


class _Session:
    """One connection: what it has learned (``facts``), its two pumps (``client``, the side that
    connected to us; ``far``, the side we dialled), and how it ended. A session is a list of named
    phases, each under its own deadline (``phases``), that _Listener._run drives; a step ends the
    session early with ``finish`` or by raising SessionError, whose reply goes to the client."""

    __slots__ = ("sid", "t0", "settings", "facts", "outcome", "reason", "client", "far", "finished", "refusal",
                 "handshake_s")

    def __init__(self, settings) -> None:
        self.sid = next(_session_ids)
        self.t0 = time.monotonic()
        self.settings = settings  # frozen for the whole session: a reload swaps the listener's, not ours
        self.facts: dict[str, object] = {}
        self.outcome, self.reason = "ok", ""
        self.client: _Pump | None = None
        self.far: _Pump | None = None
        self.finished = False
        self.refusal = ""  # why a refused session was refused, in one word (the metrics' label)
        self.handshake_s: float | None = None  # how long the TLS handshake took (the metrics' histogram)

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def finish(self, outcome: str, reason: str) -> None:
        self.outcome, self.reason, self.finished = outcome, reason, True

    async def splice(self, watch) -> None:
        splice = _Splice(self.client, self.far, self.settings.cfg.timeouts.idle, watch)
        await splice.done
        self.outcome, self.reason = splice.outcome, splice.reason
        if splice.outcome == "refused":  # an observer stopped it (a command the client may not send)
            self.refusal = "command"


_probe_context: SSL.Context | None = None


async def _speaks_tls(ep: Endpoint, timeout: float) -> bool:
    """Whether ``ep`` answers a TLS ClientHello (on a connection of its own, without a certificate)."""
    global _probe_context
    if _probe_context is None:
        _probe_context = _tls_context(server=False)
        _probe_context.set_verify(SSL.VERIFY_NONE, lambda *a: True)
    tls, pump = _TLS(_probe_context, server=False), None
    try:
        async with asyncio.timeout(timeout):
            pump = await _dial(ep, tls, timeout=timeout)
            await pump.handshake
        return True
    except SessionError:
        return bool(pump is not None and pump.tls_error and tls.first_in[:1] in (b"\x15", b"\x16"))
    except OSError:  # TimeoutError included
        return False
    finally:
        if pump is not None:
            _abort_all(pump)
            _release(pump)


def _greets_in_clear(tls: _TLS) -> WrongMode | None:
    """After a failed implicit-TLS handshake: did the server greet in clear (a STARTTLS port)?"""
    if not _REPLY_LINE.match(tls.first_in[:4]):
        return None
    return WrongMode(TLSMode.STARTTLS, f"it greets in clear ({tls.first_in[:4].decode()!r}...) instead of speaking "
                                       "TLS: it is a STARTTLS port; drop --tls, or say --starttls")


async def _greeting_or_tls(pump: _Pump, ep: Endpoint, connect_timeout: float) -> None:
    """Wait for an SMTP server's first words; a silent one is asked, on a second connection, whether
    it speaks implicit TLS instead: then the configuration is wrong, and the error says how to fix it."""
    try:
        async with asyncio.timeout(GREETING_SNIFF_S):
            await pump.wait_held()
        return
    except (TimeoutError, asyncio.TimeoutError):
        pass
    if await _speaks_tls(ep, min(connect_timeout, GREETING_SNIFF_S)):
        raise WrongMode(TLSMode.IMPLICIT, f"no SMTP greeting in {GREETING_SNIFF_S:g} s, and the port answers a TLS "
                                          "ClientHello: it speaks implicit TLS; add --tls")


async def _adopt(sock: socket.socket, tls: _TLS | None = None) -> _Pump:
    """A transport for an accepted socket: plain (what the peer sends is held until asked for), or
    TLS from the first byte, whose handshake then runs (await ``pump.handshake``)."""
    pump = _Pump()
    if tls is not None:
        pump.start_tls(tls)
    await asyncio.get_running_loop().connect_accepted_socket(lambda: pump, sock)
    if tls is None:
        pump.transport.pause_reading()
    return pump


async def _resolve(host: str, port: int) -> list[tuple[int, tuple]]:
    """(family, sockaddr) of every address of ``host``, IPv6 and IPv4 alternating (RFC 8305 4)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    by_family: dict[int, list[tuple]] = {}
    for family, _, _, _, sockaddr in infos:
        if sockaddr not in by_family.setdefault(family, []):
            by_family[family].append(sockaddr)
    lists = [[(family, a) for a in addrs] for family, addrs in by_family.items()]
    return [pair for group in itertools.zip_longest(*lists) for pair in group if pair is not None]


async def _connect_one(family: int, sockaddr: tuple, timeout: float) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


async def _happy_eyeballs(addrs: list[tuple[int, tuple]], timeout: float) -> socket.socket:
    """RFC 8305: start with the first address; start the next one when the last attempt failed or has
    not connected within HAPPY_EYEBALLS_DELAY_S; the first connection wins, the others are dropped.
    Each attempt has ``timeout`` of its own, so a dead IPv6 path costs every session 250 ms, not 30 s."""
    attempts: set[asyncio.Task] = set()
    errors: list[BaseException] = []

    def winner(done: set[asyncio.Task]) -> socket.socket | None:
        won = None
        for task in done:
            attempts.discard(task)
            if task.exception() is not None:
                errors.append(task.exception())
            elif won is None:
                won = task.result()
            else:
                task.result().close()  # two at once: one is enough
        return won

    try:
        for family, sockaddr in addrs:
            attempts.add(asyncio.get_running_loop().create_task(_connect_one(family, sockaddr, timeout)))
            done, _ = await asyncio.wait(attempts, timeout=HAPPY_EYEBALLS_DELAY_S, return_when=asyncio.FIRST_COMPLETED)
            if (sock := winner(done)) is not None:
                return sock
        while attempts:
            done, _ = await asyncio.wait(attempts, return_when=asyncio.FIRST_COMPLETED)
            if (sock := winner(done)) is not None:
                return sock
    finally:
        for task in attempts:
            task.cancel()
        if attempts:
            await asyncio.gather(*attempts, return_exceptions=True)
    raise errors[-1] if errors else OSError("no address to connect to")


async def _dial(ep: Endpoint, tls: _TLS | None = None, *, timeout: float = CONNECT_TIMEOUT_S) -> _Pump:
    """A connection to ``ep``: plain (what the server sends is held until asked for), or TLS from the
    first byte (the ClientHello is sent at once; await ``pump.handshake``). An address is connected
    at once; a name's addresses are tried as RFC 8305 says, each for ``timeout``."""
    pump = _Pump()
    if tls is not None:
        pump.start_tls(tls)
    loop = asyncio.get_running_loop()
    try:
        if _is_ip(ep.host):
            async with asyncio.timeout(timeout):
                await loop.create_connection(lambda: pump, ep.host, ep.port)
        else:
            async with asyncio.timeout(timeout):
                addrs = await _resolve(ep.host, ep.port)
            if not addrs:
                raise OSError(f"{ep.host} has no address")
            sock = await _happy_eyeballs(addrs, timeout) if len(addrs) > 1 else \
                await _connect_one(*addrs[0], timeout)
            await loop.create_connection(lambda: pump, sock=sock)
    except BaseException:
        _abort_all(pump)
        _release(pump)
        raise
    return pump


def _address(sockaddr: tuple) -> Address:
    return sockaddr[0], sockaddr[1]


def _show(addr: Address) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def _client_network(ip: str, v6_prefix: int) -> str:
    """One client, for per-address limits: an IPv4 address (an IPv4-mapped IPv6 one included), or the
    IPv6 network of ``v6_prefix`` bits it is in (a host gets a whole /64, and more, to hop around in)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if addr.version == 4:
        return str(addr)
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(ipaddress.ip_network(f"{addr}/{v6_prefix}", strict=False))


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


class _Metrics:
    """What --metrics serves, in the Prometheus text exposition format 0.0.4 (Prometheus, Grafana
    Agent, VictoriaMetrics scrape it unchanged): sessions by service and outcome, refusals by reason,
    bytes each way, handshake and session duration histograms, live sessions, and seconds until each
    certificate the service relies on expires. Process-wide and kept across reloads (a counter that
    restarted at each SIGHUP would read as a reset). Only exists with --metrics: without it the
    session driver does not count at all."""

    def __init__(self) -> None:
        self.sessions: dict[tuple[str, str], int] = {}
        self.refusals: dict[tuple[str, str], int] = {}
        self.bytes: dict[tuple[str, str], int] = {}
        self.handshake: dict[str, list] = {}  # service -> per-bucket counts (+Inf last), sum
        self.duration: dict[str, list] = {}
        self.seen: dict[str, dict[tuple[str, str], bytes]] = {}  # service -> (role, name) -> its newest certificate

    @staticmethod
    def _observe(hists: dict[str, list], service: str, buckets: tuple[float, ...], value: float) -> None:
        h = hists.get(service)
        if h is None:
            h = hists[service] = [0] * (len(buckets) + 1) + [0.0]
        h[bisect.bisect_left(buckets, value)] += 1
        h[-1] += value

    def session(self, service: str, s: _Session, bytes_in: int, bytes_out: int, duration: float) -> None:
        key = (service, s.outcome)
        self.sessions[key] = self.sessions.get(key, 0) + 1
        if s.outcome == "refused":
            self.refused(service, s.refusal or "other")
        for direction, n in (("in", bytes_in), ("out", bytes_out)):
            self.bytes[(service, direction)] = self.bytes.get((service, direction), 0) + n
        self._observe(self.duration, service, SESSION_BUCKETS, duration)
        if s.handshake_s is not None:
            self._observe(self.handshake, service, HANDSHAKE_BUCKETS, s.handshake_s)

    def refused(self, service: str, kind: str) -> None:
        self.refusals[(service, kind)] = self.refusals.get((service, kind), 0) + 1

    def saw(self, service: str, role: str, name: str, der: bytes) -> None:
        """A certificate met in a session (an allowed client's, the upstream's): its expiry is watched
        too, the newest one per name (a renewal replaces the old one, whose expiry no longer matters).
        Bounded per service: the name seen longest ago goes first."""
        seen = self.seen.setdefault(service, {})
        seen.pop((role, name), None)
        if len(seen) >= METRICS_MAX_SEEN:
            seen.pop(next(iter(seen)))
        seen[(role, name)] = der

    def forget_barred(self, service: str, policy: ClientPolicy) -> None:
        """After a reload: certificates the new policy revokes or denies are no longer watched."""
        seen = self.seen.get(service, {})
        for key in [k for k, der in seen.items() if policy.barred(der)]:
            del seen[key]

    def render(self, services: dict[str, _Listener]) -> bytes:
        out: list[str] = []

        def family(name: str, kind: str, text: str, samples) -> None:
            out.append(f"# HELP {name} {text}\n# TYPE {name} {kind}\n")
            out.extend(f"{name}{_labels(labels)} {_number(value)}\n" for labels, value in samples)

        family("certproxy_info", "gauge", "certproxy's version", [({"version": __version__}, 1)])
        family("certproxy_sessions_total", "counter", "Sessions ended, by service and outcome",
               [({"service": k[0], "outcome": k[1]}, v) for k, v in sorted(self.sessions.items())])
        family("certproxy_refusals_total", "counter", "Clients refused, by service and reason",
               [({"service": k[0], "reason": k[1]}, v) for k, v in sorted(self.refusals.items())])
        family("certproxy_bytes_total", "counter", "Bytes from the client (in) and from the far side (out)",
               [({"service": k[0], "direction": k[1]}, v) for k, v in sorted(self.bytes.items())])
        listeners = sorted(services.values(), key=lambda svc: svc.service_name)
        family("certproxy_sessions_active", "gauge", "Sessions open now",
               [({"service": svc.service_name}, len(svc.active)) for svc in listeners])
        for name, hists, buckets, text in (
                ("certproxy_handshake_seconds", self.handshake, HANDSHAKE_BUCKETS, "TLS handshake duration"),
                ("certproxy_session_seconds", self.duration, SESSION_BUCKETS, "Session duration")):
            out.append(f"# HELP {name} {text}\n# TYPE {name} histogram\n")
            for service, h in sorted(hists.items()):
                total = 0
                for le, n in zip([*map(_number, buckets), "+Inf"], h[:-1]):
                    total += n
                    out.append(f"{name}_bucket{_labels({'service': service, 'le': le})} {total}\n")
                out.append(f"{name}_sum{_labels({'service': service})} {_number(h[-1])}\n")
                out.append(f"{name}_count{_labels({'service': service})} {total}\n")
        now, expiry, crls = time.time(), [], []
        for svc in listeners:
            service = svc.service_name
            certificates = {cert_fingerprint(der): (role, name, until) for role, name, der, until in svc._watched()}
            policy = getattr(svc.settings, "policy", None)
            for (role, name), der in self.seen.get(service, {}).items():  # taken by a handshake: parses
                certificates.setdefault(cert_fingerprint(der), (role, name, _not_after(der)))
            for fp, (role, name, until) in certificates.items():
                labels = {"service": service, "role": role, "name": name, "sha256": fp.hex()}
                expiry.append((labels, round(until - now)))
            for path, nxt in (policy.crl_updates.items() if policy is not None else ()):
                if nxt is not None:
                    crls.append(({"service": service, "file": path}, round(nxt.timestamp() - now)))
        family("certproxy_certificate_expiry_seconds", "gauge",
               "Seconds until a certificate expires (negative: expired); role own, allowed, client_ca, client "
               "(an allowed client seen), ca, upstream (the server a client service reached)", expiry)
        family("certproxy_crl_next_update_seconds", "gauge", "Seconds until a --crl is due for a fresh one", crls)
        return "".join(out).encode()


_METRICS: _Metrics | None = None  # set by --metrics


def _labels(labels: dict[str, str]) -> str:
    """``{k="v",...}`` with the text format's escapes (backslash, double quote, line feed)."""
    def value(v) -> str:
        return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{value(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return repr(value) if isinstance(value, float) else str(value)


@functools.lru_cache(maxsize=4096)
def _not_after(der: bytes) -> float:
    from cryptography import x509

    return _validity(x509.load_der_x509_certificate(der))[1].timestamp()


def metrics_endpoint(text: str, public: bool) -> Endpoint:
    """``--metrics``: HOST:PORT, or a bare PORT on 127.0.0.1. A public address only with
    --metrics-public: the figures name clients' certificates and how much mail flows."""
    text = text.strip()
    ep = Endpoint(host="127.0.0.1", port=int(text)) if text.isdigit() else Endpoint.parse(text, "--metrics")
    if not 0 < ep.port <= 65535:
        raise ConfigError("--metrics", f"{text!r}: give a port 1-65535")
    if not ep.is_loopback() and not public:
        raise ConfigError("--metrics", f"{ep} is not a loopback address: the metrics name your clients' "
                                       "certificates; add --metrics-public to serve them there anyway (firewall it)")
    return ep


async def _serve_metrics(ep: Endpoint, services) -> asyncio.Task:
    """A minimal HTTP/1.1 endpoint: GET /metrics (or /) answers ``_METRICS.render(services())``.
    Bounded: request size, METRICS_TIMEOUT_S for the whole exchange, concurrent connections.
    Returns a task that serves until cancelled (and then ends every scrape in progress)."""
    handlers: set[asyncio.Task] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(task := asyncio.current_task())
        try:
            if len(handlers) > METRICS_MAX_CONNECTIONS:
                return
            async with asyncio.timeout(METRICS_TIMEOUT_S):  # reading the request and writing the answer
                head = await reader.readuntil(b"\r\n\r\n")
                method, target = (head.split(b" ") + [b"", b""])[:2]
                status, body, extra = "200 OK", b"", ""
                if method not in (b"GET", b"HEAD"):
                    status, body, extra = "405 Method Not Allowed", b"GET /metrics\n", "Allow: GET, HEAD\r\n"
                elif target.split(b"?")[0] not in (b"/metrics", b"/"):
                    status, body = "404 Not Found", b"GET /metrics\n"
                else:
                    body = _METRICS.render(services())
                kind = "text/plain; version=0.0.4; charset=utf-8"
                writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                             f"{extra}Connection: close\r\n\r\n".encode() + (body if method != b"HEAD" else b""))
                writer.close()  # everything written, then closed: within the deadline too
                await writer.wait_closed()
        except (OSError, TimeoutError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                asyncio.CancelledError):  # a scrape that goes wrong, or the end of the service: just close
            pass
        finally:
            handlers.discard(task)
            writer.transport.abort()  # a no-op once closed; else whatever is left is dropped

    try:
        server = await asyncio.start_server(handle, ep.host, ep.port, limit=METRICS_MAX_REQUEST,
                                            reuse_address=True)
    except OSError as e:
        raise ConfigError("--metrics", _cannot_listen(ep, e)) from None

    async def serve() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            server.close()
            for task in list(handlers):
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

    return asyncio.get_running_loop().create_task(serve())


# What to do about a configured certificate that expires, by the option that names it: only the
# service's own certificate is the operator's to renew.
_EXPIRY_ACTIONS = {
    "--allow": "ask its owner for a renewed certificate and put that in --allow; until then that client is "
               "refused, everyone else is served",
    "--client-ca": "renew the CA (certproxy ca init) and re-issue its certificates; until then its clients are refused",
    "--ca": "get the mail server's new CA bundle; until then the upstream is refused unless a --pin matches",
    "--crl": "sign a fresh one (certproxy ca crl --dir CA_DIR), copy it here and reload; the old one is still enforced",
}


class _Listener:
    """What both services share: a listening socket, an accept loop with a connection limit, the live
    sessions, and the one driver that runs a session's phases and writes its line. The settings (a
    frozen object: configuration, TLS context, policy) are swapped whole on reload; a session keeps
    the ones it started with. Sockets are accepted raw, so each session decides how its transport
    starts."""

    role = ""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.listen = settings.cfg.listen
        self.per_ip: dict[str, int] = {}
        self.sock: socket.socket | None = None
        self.active: set[asyncio.Task] = set()
        self._accepting: asyncio.Task | None = None
        self._watching: asyncio.Task | None = None
        self._watched_cache: tuple | None = None

    @property
    def cfg(self):
        return self.settings.cfg

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    @property
    def service_name(self) -> str:
        return self.cfg.name

    def _certificate_files(self) -> list[tuple[str, str]]:
        """(option, path) of every certificate file this service relies on, for the expiry watch."""
        return []

    def _files_now(self) -> list[tuple[str, str]]:
        """_certificate_files, or none if an --allow directory has gone since start (never a crash
        in the daily watch or a scrape)."""
        try:
            return self._certificate_files()
        except ConfigError:
            return []

    def _watched(self) -> list[tuple[str, str, bytes, float]]:
        """(role, name, certificate, notAfter) for every certificate file this service relies on, for
        the metrics' expiry gauge; read once per configuration (a reload brings a new one)."""
        cached = self._watched_cache
        if cached is None or cached[0] is not self.settings:
            roles = {"--cert": "own", "--allow": "allowed", "--client-ca": "client_ca", "--ca": "ca"}
            policy = getattr(self.settings, "policy", None)
            items = []
            for option, path in self._files_now():
                try:
                    ders = _pem_to_der(path)
                    for der in ders[:1] if option == "--cert" else ders:  # our own: the leaf, not its chain
                        if option == "--allow" and policy.barred(der):  # shut out: its expiry is no news
                            continue
                        name = policy.name(der) if option == "--allow" else certificate_subject(der)
                        items.append((roles[option], name, der, _not_after(der)))
                except (OSError, ValueError):  # gone or broken since start: the daily watch says so
                    continue
            cached = self._watched_cache = (self.settings, items)
        return cached[1]

    def _expiring(self) -> list[tuple[str, str, str, str]]:
        """(option, file, subject, problem) for every configured certificate that expires within
        EXPIRY_WARNING_DAYS or has expired, and every --crl due for a fresh one: what the daily watch
        logs and ``check`` prints."""
        out = []
        for option, path in self._files_now():
            try:
                ders = _pem_to_der(path)
            except (OSError, ValueError):
                continue
            out += [(option, path, certificate_subject(der), problem) for der in ders
                    if (problem := expiry_problem(der))]
        policy = getattr(self.settings, "policy", None)  # the CRLs loaded, not what the files say now
        for path, nxt in (policy.crl_updates.items() if policy is not None else ()):
            if problem := crl_problem(nxt):
                out.append(("--crl", path, "CRL", problem))
        return out

    def _busy_reply(self) -> bytes | None:
        return None

    def _max_per_ip(self) -> int:
        return 0

    def _limit_key(self, ip: str) -> str:
        """Who counts as one client for --max-per-ip."""
        return ip

    def _new_session(self, sock: socket.socket, peer: str, addr: tuple) -> _Session:
        raise NotImplementedError

    def replace(self, new: _Listener) -> None:
        """Take over ``new``'s settings (a reload): later connections use them; live ones keep theirs."""
        self.settings = new.settings
        policy = getattr(new.settings, "policy", None)
        if _METRICS is not None and policy is not None:
            _METRICS.forget_barred(self.service_name, policy)

    async def _watch_expiry(self) -> None:
        """At start-up and daily: a warning when a configured certificate expires within 30 days,
        an error once it has."""
        while True:
            for option, path, subject, problem in self._expiring():
                level = logging.ERROR if problem.startswith(("EXPIRED", "OUTDATED")) else logging.WARNING
                _log_event(level, "certificate" if option != "--crl" else "crl", service=self.service_name,
                           option=option, file=path, subject=subject, problem=problem, action=_EXPIRY_ACTIONS.get(
                               option, "renew it (certproxy gencert NAME --renew) and reload"))
            await asyncio.sleep(86400)

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
            ip = self._limit_key(addr[0])
            peer = _show(addr)
            max_connections, max_per_ip = self.cfg.max_connections, self._max_per_ip()
            if len(self.active) >= max_connections:
                why = f"connection limit ({max_connections}) reached; raise --max-connections if this is normal load"
            elif max_per_ip and self.per_ip.get(ip, 0) >= max_per_ip:
                why = f"per-address limit ({max_per_ip}) reached for {ip}; raise --max-per-ip if this is normal"
            else:
                why = ""
            if why:
                busy = self._busy_reply()
                try:
                    if busy:
                        sock.send(busy)
                except OSError:
                    pass
                sock.close()
                _log_event(logging.WARNING, "refused", service=self.service_name, peer=peer, outcome="busy",
                           reason=why)
                if _METRICS is not None:
                    _METRICS.refused(self.service_name, "busy")
                continue
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
            task = loop.create_task(self._run(self._new_session(sock, peer, addr), sock, peer))
            self.active.add(task)
            task.add_done_callback(lambda t, ip=ip: self._done(t, ip))

    def _done(self, task: asyncio.Task, ip: str) -> None:
        self.active.discard(task)
        left = self.per_ip.pop(ip, 1) - 1
        if left > 0:
            self.per_ip[ip] = left

    async def _run(self, s: _Session, sock: socket.socket, peer: str) -> None:
        """The driver: run the session's phases in order, each under its deadline; a SessionError (a
        timeout becomes one, with the phase's reply) says its reply to the client and ends the
        session; then close everything and write the one session line."""
        name = "accept"
        try:
            try:
                for name, deadline, step, timeout_reply in s.phases():
                    if s.finished:
                        break
                    if deadline is None:
                        await step()
                        continue
                    try:
                        async with asyncio.timeout(deadline):
                            await step()
                    except (TimeoutError, asyncio.TimeoutError):
                        raise SessionError(timeout_reply, f"{name}: timed out after {deadline:g} s",
                                           outcome="timeout") from None
            except SessionError as e:
                if not s.finished:  # a verdict made already (a refusal being told) stands
                    s.outcome, s.reason = e.outcome, e.reason
                if s.client is not None:
                    if e.reply:
                        await _goodbye(s.client, e.reply)
                    else:
                        _abort_all(s.client)
            except OSError as e:  # a reset before anything was said: a port probe, a client giving up
                if not s.finished:
                    s.outcome, s.reason = "closed", f"{name}: the peer went away ({_describe(e)})"
        except asyncio.CancelledError:
            s.outcome, s.reason = "cancelled", "service stopping"
            _abort_all(s.client, s.far)
            raise
        except Exception as e:  # a bug: say so, and lose the session rather than the process
            s.outcome, s.reason = "error", f"internal error in {name}: {type(e).__name__}: {e}"
            log.exception("session id=%d internal error", s.sid)
            if s.client is not None and not s.client.lost and s.client.transport is not None:
                s.client.write(b"421 4.3.0 certproxy internal error\r\n")
            _abort_all(s.far)
        finally:
            if s.client is None:
                sock.close()
            _close_all(s.client, s.far)
            client, far = s.client, s.far
            bytes_in, bytes_out = client.nbytes if client else 0, far.nbytes if far else 0
            duration = time.monotonic() - s.t0
            _log_event(logging.INFO if s.outcome == "ok" else logging.WARNING, "session", id=s.sid,
                       service=self.service_name, worker=_WORKER, **{"peer": peer, **s.facts},
                       bytes_in=bytes_in, bytes_out=bytes_out, duration=round(duration, 3), outcome=s.outcome,
                       reason=s.reason)
            if _METRICS is not None:
                _METRICS.session(self.service_name, s, bytes_in, bytes_out, duration)
            _release(client, far)

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


# endregion
# region Client mode ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ClientSettings:
    cfg: ClientConfig
    ctx: SSL.Context
    own_fp: str  # our client certificate's fingerprint: what the server admin must allow


def _own_fingerprint(cert: str) -> str:
    try:
        ders = _pem_to_der(cert)
    except (OSError, ValueError):
        return ""
    return format_fingerprint(cert_fingerprint(ders[0])) if ders else ""


class _ClientSession(_Session):
    """Laptop side: a local mail program in plain SMTP → the first upstream that passes (connect,
    STARTTLS dialogue, handshake with the pin checked inside it, the server's first words in TLS)
    → the splice."""

    __slots__ = ("sock",)

    def __init__(self, settings: _ClientSettings, sock: socket.socket) -> None:
        super().__init__(settings)
        self.sock = sock

    def phases(self) -> list[Phase]:
        return [("accept", None, self.accept, ""),
                ("upstream", None, self.upstream, ""),
                ("splice", None, self.run_splice, "")]

    async def accept(self) -> None:
        self.client = await _adopt(self.sock)

    async def upstream(self) -> None:
        """Try each upstream in order; the first that passes every sub-phase is ours."""
        failures: list[SessionError] = []
        for up in self.settings.cfg.upstreams:
            try:
                self.far = await self._open(up)
            except SessionError as e:
                failures.append(e)
                continue
            if failures:
                self.facts["failover"] = "; ".join(e.reason for e in failures)
            return
        self.refusal = "upstream"
        raise SessionError(failures[-1].reply, "; ".join(e.reason for e in failures), outcome="refused")

    async def _open(self, up: Upstream) -> _Pump:
        """connect → [STARTTLS dialogue] → handshake (pin inside) → the server's first words inside TLS.
        Raises SessionError with the 421 owed to the local client."""
        cfg, ep = self.settings.cfg, up.endpoint
        to = cfg.timeouts
        self.facts["upstream"] = str(ep)
        self.facts["tls"] = "implicit" if up.mode is TLSMode.IMPLICIT else "starttls"
        pump = None
        implicit = up.mode is TLSMode.IMPLICIT
        tls = _TLS(self.settings.ctx, server=False, sni=cfg.server_name or ep.host, leaf=_server_check(cfg, ep),
                   strict=bool(cfg.ca))
        phase, reply = "connect", "421 4.4.1 upstream unreachable"
        try:
            pump = await _dial(ep, tls if implicit else None, timeout=to.connect)
            if not implicit:
                phase, reply = "starttls", "421 4.4.2 upstream timed out"
                async with asyncio.timeout(to.dialogue):
                    await _greeting_or_tls(pump, ep, to.connect)
                    await _drive(pump, StartTLSClient(cfg.ehlo))
                pump.start_tls(tls)
            phase, reply = "handshake", "421 4.7.0 TLS with upstream failed"
            try:
                t0 = time.monotonic()
                async with asyncio.timeout(to.handshake):
                    await pump.handshake
                self.handshake_s = time.monotonic() - t0
            except SessionError as e:
                if tls.check.refusal:
                    raise PeerRejected("421 4.7.0 upstream certificate not trusted", tls.check.refusal) from None
                if implicit and (wrong := _greets_in_clear(tls)) is not None:
                    raise wrong from None
                raise SessionError(reply, f"TLS handshake failed: {e.reason}") from None
            if tls.check.strict and tls.check.error is not None:  # belt and braces: nothing crosses now
                errno, depth = tls.check.error
                raise PeerRejected("421 4.7.0 upstream certificate not trusted",
                                   f"server certificate not trusted by --ca: {_verify_error(errno)} (depth {depth})")
            self.facts.update(tls.facts())
            self.facts["server_fp"] = format_fingerprint(cert_fingerprint(tls.check.der))
            if _METRICS is not None:
                _METRICS.saw(cfg.name, "upstream", str(ep), tls.check.der)
            expired = _expired_on(tls.check.der)
            if expired:  # pinning makes it work; the user should still know
                self.facts["warning"] = (f"the server's certificate expired on {expired}; the pin keeps it working, "
                                         "but ask the server's admin to renew it")
            # TLS 1.3 finishes the client's handshake before the server has judged our certificate; a
            # refusal arrives as an alert (or a 554) afterwards. So hear the server speak inside TLS:
            # the greeting (implicit TLS, passed on to the local client) or the reply to a NOOP.
            phase, reply = "confirm", "421 4.7.0 upstream refused our client certificate"
            exchange = Exchange(b"" if implicit else b"NOOP\r\n", keep=implicit)
            try:
                async with asyncio.timeout(to.dialogue):
                    await _drive(pump, exchange)
            except SessionError as e:
                if not (pump.lost or pump.eof):
                    raise
                raise PeerRejected(reply, f"the server ended the TLS session at once ({e.reason}): it does not "
                                          f"accept our client certificate; {self._ask_admin()}") from None
            answer = exchange.reply
            said = f"{answer.code} {answer.lines[0]}"
            if _refuses_certificate(answer):  # what certproxy server, and RFC 3207 4.1 servers, say
                raise PeerRejected(reply, f"the server refused our client certificate ({said}); {self._ask_admin()}")
            if answer.code != (220 if implicit else 250):
                raise SessionError("421 4.3.0 upstream is not accepting mail",
                                   f"upstream answered {'with its greeting' if implicit else 'NOOP'} inside TLS: {said}")
            if implicit:
                pump.held.insert(0, exchange.raw)
            return pump
        except BaseException as e:
            if pump is not None:
                if isinstance(e, ProtocolError) and pump.tls is None and not pump.lost:
                    pump.write(b"QUIT\r\n")  # the only thing we ever send after a failed dialogue in clear
                    pump.close()
                else:
                    _abort_all(pump)
                _release(pump)
            if isinstance(e, SessionError):
                e.reason = f"{ep}: {e.reason}"
                raise
            if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
                raise SessionError("421 4.4.2 upstream timed out", f"{ep}: {phase} timed out") from None
            if isinstance(e, OSError):
                raise SessionError("421 4.4.1 upstream unreachable", f"{ep}: {_describe(e)}") from None
            raise

    def _ask_admin(self) -> str:
        fp = self.settings.own_fp
        return (f"our certificate is sha256 {fp}: the server's admin must allow it (certproxy server "
                f"--allow-fingerprint {fp}, or Postfix relay_clientcerts '{fp} laptop')")

    async def run_splice(self) -> None:
        client = self.client
        if client.lost or (client.eof and not client.held):
            self.finish("client-gone", "local client left before the tunnel was up")
            return
        if self.facts["tls"] == "starttls":
            client.write(f"220 {self.settings.cfg.ehlo} ESMTP certproxy: TLS to {self.facts['upstream']} "
                         "verified\r\n".encode())
        self.far.filter = watch = HideExtensions(frozenset())  # only to follow the replies
        await self.splice(watch)


class ClientService(_Listener):
    """Listens for plain SMTP clients and carries each session to a pinned upstream over TLS."""

    role = "client"

    def __init__(self, cfg: ClientConfig) -> None:
        super().__init__(_ClientSettings(cfg, client_context(cfg), _own_fingerprint(cfg.cert)))

    def _busy_reply(self) -> bytes:
        return b"421 4.7.0 certproxy: too many connections, try again later\r\n"

    def _certificate_files(self) -> list[tuple[str, str]]:
        return [("--cert", self.cfg.cert)] + ([("--ca", self.cfg.ca)] if self.cfg.ca else [])

    def _new_session(self, sock: socket.socket, peer: str, addr: tuple) -> _Session:
        return _ClientSession(self.settings, sock)

    async def start(self) -> None:
        await self._listen()
        ups = ", ".join(f"{u.endpoint} ({u.mode.value})" for u in self.cfg.upstreams)
        _log_event(logging.INFO, "listening", service=self.service_name, role="client",
                   listen=f"{self.listen.host}:{self.port}", upstreams=ups)


# endregion
# region Server mode ------------------------------------------------------------------------------


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
            raise SessionError("", "the load balancer closed before sending a PROXY header", outcome="closed")
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


@dataclass(frozen=True, slots=True)
class _ServerSettings:
    cfg: ServerConfig
    ctx: SSL.Context
    policy: ClientPolicy
    hostname: str


class _ServerSession(_Session):
    """Mail-server side: [PROXY header from a load balancer] → [which TLS, on a dual port] →
    [STARTTLS dialogue] → TLS handshake (any certificate) → judge the certificate and route, or refuse
    in SMTP → backend connect, [PROXY header] → backend greeting, [EHLO + XCLIENT], [hand-over replay]
    → splice."""

    __slots__ = ("sock", "src", "dst", "mode", "gate", "route", "login", "tls", "listener")

    def __init__(self, settings: _ServerSettings, sock: socket.socket, peer: str, src: Address,
                 listener: _Listener | None = None) -> None:
        super().__init__(settings)
        self.listener = listener  # its settings now: a reload's policy judges a handshake that ends after it
        self.sock = sock
        self.facts["peer"] = peer
        self.src = src  # the client, as the MTA is told it (a load balancer's PROXY header may say better)
        try:
            self.dst = _address(sock.getsockname())
        except OSError:
            listen = settings.cfg.listen
            self.dst = (listen.host, listen.port)
        self.mode = settings.cfg.mode
        self.gate: SMTPGate | None = None  # the STARTTLS dialogue, if there was one
        self.route: Endpoint | None = None
        self.login: str | None = None
        self.tls: _TLS | None = None

    def phases(self) -> list[Phase]:
        cfg, host = self.settings.cfg, self.settings.hostname
        to = cfg.timeouts
        unavailable = "421 4.3.0 mail server unavailable, try again later"
        phases = []  # only what this configuration needs: every phase costs a timer
        if cfg.proxy_from or cfg.mode is TLSMode.EITHER:
            phases.append(("front", to.handshake, self.front, ""))
        if cfg.mode is not TLSMode.IMPLICIT:
            phases.append(("starttls", to.dialogue, self.starttls, f"421 4.4.2 {host} Error: timeout exceeded"))
        return phases + [
                ("handshake", to.handshake, self.handshake, ""),
                ("authorise", to.dialogue, self.authorise, ""),
                ("backend", None, self.backend, unavailable),  # _dial times each address itself
                ("backend-dialogue", to.dialogue, self.backend_dialogue, unavailable),
                ("splice", None, self.run_splice, "")]

    async def front(self) -> None:
        """Who the client really is (a PROXY header from --proxy-from), and on a dual port which TLS."""
        cfg = self.settings.cfg
        sock = self.sock
        if cfg.proxy_from and any(ipaddress.ip_address(self.src[0]) in net for net in cfg.proxy_from):
            told_src, told_dst = await _accept_proxy_header(sock)
            if told_src is not None:
                self.facts["via"] = self.facts["peer"]
                self.facts["peer"] = _show(told_src)
                self.src, self.dst = told_src, told_dst
        if self.mode is TLSMode.EITHER:
            self.mode = await _sniff(sock)
            if self.mode is None:
                self.finish("closed", "client left before saying anything")

    async def starttls(self) -> None:
        if self.mode is not TLSMode.STARTTLS:
            return
        self.facts["tls"] = "none"  # "starttls" once it has
        self.client = await _adopt(self.sock)
        cfg = self.settings.cfg
        gate = self.gate = SMTPGate(self.settings.hostname, optional=cfg.starttls_optional)
        self.client.write(gate.greeting())
        await _drive(self.client, gate)
        if gate.state is _GateState.CLOSED:
            await _goodbye(self.client, b"")
            self.finish("refused" if gate.refused_clear else "closed", gate.reason or "client left before STARTTLS")
            self.refusal = "cleartext"
        elif gate.state is _GateState.HANDOVER:
            # --starttls-optional: a client staying in clear is a stranger, whatever it claims.
            self.facts["cert"] = "none"
            self.route = cfg.untrusted_backend

    async def handshake(self) -> None:
        if self.gate is not None and self.gate.state is _GateState.HANDOVER:
            return
        self.tls = tls = _TLS(self.settings.ctx, server=True)
        if self.gate is None:
            self.facts["tls"] = "implicit"
        try:
            if self.client is None:  # implicit TLS: from the first byte
                self.client = await _adopt(self.sock, tls)
            else:
                self.client.start_tls(tls)
            t0 = time.monotonic()
            await self.client.handshake
            self.handshake_s = time.monotonic() - t0
        except SessionError as e:
            if self.client.tls_error:  # refused by our TLS policy (old protocol, no shared cipher), or garbage
                refused = any(w in e.reason for w in _POLICY_REFUSALS)
                self.refusal = "tls_policy"
                raise SessionError("", f"TLS handshake failed: {e.reason}",
                                   outcome="refused" if refused else "failed") from None
            raise SessionError("", f"client closed the connection during the TLS handshake ({e.reason})") from None
        if self.gate is not None:
            self.facts["tls"] = "starttls"
        self.facts.update(tls.facts())

    async def authorise(self) -> None:
        """Judge the client certificate and choose the backend; a client that may not pass is told
        why in SMTP, inside TLS (greeted, then every mail command refused), and logged with what to
        add to allow it."""
        if self.tls is None:
            return
        # The newest policy, not the one this connection was accepted under: a revocation reloaded while
        # a client sat in its handshake or STARTTLS dialogue applies to it. Sessions already past this
        # point finish.
        cfg = self.settings.cfg
        policy = (self.listener or self).settings.policy
        der = self.tls.peer_der()
        facts = self.facts
        if der is None:
            reply, why = "530 5.7.0 client certificate required", "no client certificate"
            facts["cert"], self.refusal = "none", "no_certificate"
        else:
            verdict = policy.judge(der, self.tls)
            facts["cert_subject"], facts["cert_fp"] = verdict.subject, verdict.fingerprint
            if verdict.allowed:
                facts["cert"], facts["cert_name"] = "allowed", verdict.name
                if _METRICS is not None:
                    _METRICS.saw(cfg.name, "client", verdict.name, der)
                self.route, self.login = cfg.backend, verdict.name
                return
            facts["cert"] = "refused"
            facts["cert_issuer"], facts["cert_spki"] = verdict.issuer, verdict.spki
            reply, why, self.refusal = verdict.reply, verdict.why, verdict.kind
            if cfg.client_cert != "none":
                facts["action"] = _allow_hint(cfg, verdict)
        if cfg.client_cert != "required":
            if cfg.client_cert == "optional":
                facts["untrusted"] = why
            self.route = cfg.untrusted_backend
            return
        if cfg.soft_refusal and self.refusal not in ("revoked", "denied"):  # those are meant for good
            reply = facts["reply"] = _soft(reply)  # the line says the client was told to come back
        gate = SMTPGate(self.settings.hostname, refusal=reply)
        if self.mode is TLSMode.IMPLICIT:
            self.client.write(gate.greeting())
        self.finish("refused", why)
        try:
            async with asyncio.timeout(REFUSAL_LINGER_S):  # told: no slot held for minutes after that
                await _drive(self.client, gate)
        except ProtocolError as e:
            await _goodbye(self.client, e.reply)
            return
        except (SessionError, TimeoutError, asyncio.TimeoutError):
            pass
        await _goodbye(self.client, b"")

    async def backend(self) -> None:
        """Connect to the MTA and say who the client is with a PROXY header if configured."""
        cfg, ep = self.settings.cfg, self.route
        self.facts["backend"] = str(ep)
        try:
            self.far = await _dial(ep, timeout=cfg.timeouts.connect)
        except OSError as e:
            raise SessionError("421 4.3.0 mail server unavailable, try again later",
                               f"backend {ep}: {_describe(e)}") from None
        if cfg.proxy_protocol:
            self.far.write(proxy_header(cfg.proxy_protocol, self.src, self.dst))

    async def backend_dialogue(self) -> None:
        """The MTA's greeting, [EHLO + XCLIENT and the new greeting], [the hand-over's EHLO replayed,
        its reply swallowed]. In implicit TLS the client has heard nothing yet, so the MTA's (last)
        greeting becomes the client's; a hand-over's pending command goes on at the end."""
        cfg, host, far = self.settings.cfg, self.settings.hostname, self.far
        who = f"backend {self.route}"
        try:
            greeting = await _exchange(far, b"", who)
            if greeting.code != 220:
                raise ProtocolError("", f"{who} greeted with {greeting.code} {greeting.lines[0]}")
            if cfg.xclient:
                ehlo = await _exchange(far, f"EHLO {host}\r\n".encode(), who)
                offered = _xclient_offer(ehlo)
                if offered is None or "ADDR" not in offered:
                    raise ProtocolError("", f"{who} does not offer XCLIENT to certproxy; allow it (Postfix: "
                                            "smtpd_authorized_xclient_hosts = 127.0.0.1) or drop --xclient")
                greeting = await _exchange(far, xclient_command(offered, self.src, self.login), who)
                if greeting.code != 220:
                    raise ProtocolError("", f"{who} refused XCLIENT: {greeting.code} {greeting.lines[0]}")
            handover = self.gate if self.gate is not None and self.gate.state is _GateState.HANDOVER else None
            if handover is not None and handover.helo:
                reply = await _exchange(far, handover.helo, who)
                if reply.code // 100 != 2:
                    raise ProtocolError("", f"{who} refused the client's replayed "
                                            f"{handover.helo[:4].decode('latin-1')}: {reply.code} {reply.lines[0]}")
        except SessionError as e:
            raise SessionError("421 4.3.0 mail server unavailable, try again later", e.reason) from None
        if self.mode is TLSMode.IMPLICIT:
            self.client.write(greeting.encode())
        if handover is not None:  # as if just sent: it meets the command watch like everything else
            self.client.held.insert(0, handover.pending)

    async def run_splice(self) -> None:
        """Splice, with two observers: the MTA's replies (EHLO keywords hidden, and the reply owed when
        it hangs up) and the client's commands (no XCLIENT/XFORWARD ever reaches the MTA), the second
        told of every reply by the first."""
        client, far = self.client, self.far
        commands = CommandWatch()

        def on_reply(code: int, lines: list[bytes]) -> None:
            released = commands.reply(code, lines)
            if commands.stop is not None:
                client.stop_splice(*commands.stop)
                return
            if released and not far.lost:
                far.write(released)
            if not commands.hold and not client.lost and client.transport is not None:
                client.transport.resume_reading()

        client.filter = commands
        far.filter = watch = HideExtensions(on_reply=on_reply)  # inside TLS already: STARTTLS there is a lie
        await self.splice(watch)


def _soft(reply: str) -> str:
    """--soft-refusal: the 4xx twin of a certificate refusal (554 5.7.1 X -> 454 4.7.1 X), which a
    sending MTA answers by keeping the mail queued and trying again later."""
    code, enhanced, text = reply.split(" ", 2)
    return f"454 4{enhanced[1:]} {text}; try again later"


def _refuses_certificate(reply: Reply) -> bool:
    """A server's answer inside TLS that refuses our client certificate: RFC 3207 4.1's 530 and 554,
    and certproxy server's --soft-refusal 454 4.7.x."""
    return reply.code in (530, 554) or (reply.code == 454 and reply.lines[0].startswith("4.7."))


def _allow_hint(cfg: ServerConfig, verdict: Verdict) -> str:
    """What the operator adds to let a refused certificate in (pasteable)."""
    if verdict.kind in ("revoked", "denied"):
        return "none: it is shut out on purpose (--crl / --deny-fingerprint); its owner needs a new certificate"
    if verdict.kind in ("expired", "not_yet_valid"):
        return "ask the certificate's owner for a renewed one and put that in --allow (or issue it from --client-ca)"
    if cfg.client_ca and cfg.allow_fingerprints.digests:
        return f"if this is a laptop of yours: --allow-fingerprint '{verdict.spki} NAME'"
    return f"if this is a laptop of yours: save its certificate in an --allow file or directory, or " \
           f"--allow-fingerprint '{verdict.spki} NAME' with --client-ca"


async def _exchange(pump: _Pump, command: bytes, who: str) -> Reply:
    exchange = Exchange(command, who=who)
    await _drive(pump, exchange)
    return exchange.reply


def _xclient_offer(ehlo: Reply) -> set[str] | None:
    """The XCLIENT attributes an EHLO reply offers, or None."""
    offered = None
    for line in ehlo.lines[1:] if ehlo.code == 250 else ():
        words = line.upper().split()
        if words and words[0] == "XCLIENT":
            offered = set(words[1:])
    return offered


class ServerService(_Listener):
    """Terminates TLS (implicit or STARTTLS), judges the client certificate, splices to the MTA."""

    role = "server"

    def __init__(self, cfg: ServerConfig) -> None:
        hostname = cfg.hostname or socket.getfqdn() or "localhost"
        ctx, policy = server_context(cfg)
        super().__init__(_ServerSettings(cfg, ctx, policy, hostname))

    @property
    def policy(self) -> ClientPolicy:
        return self.settings.policy

    def _busy_reply(self) -> bytes | None:
        # Before TLS we can say we are busy; on an implicit-TLS port only a close is possible (on a
        # dual port a TLS client takes the reply for a broken ServerHello: refused either way).
        if self.cfg.mode is TLSMode.IMPLICIT:
            return None
        return f"421 4.7.0 {self.settings.hostname} too busy, try again later\r\n".encode()

    def _max_per_ip(self) -> int:
        return self.cfg.max_per_ip

    def _limit_key(self, ip: str) -> str:
        return _client_network(ip, self.cfg.ipv6_prefix_length)

    def _certificate_files(self) -> list[tuple[str, str]]:
        files = [("--cert", self.cfg.cert)] + [("--allow", f) for f in _allow_files(self.cfg.allow)]
        return files + ([("--client-ca", self.cfg.client_ca)] if self.cfg.client_ca else [])

    def _new_session(self, sock: socket.socket, peer: str, addr: tuple) -> _Session:
        return _ServerSession(self.settings, sock, peer, _address(addr), self)

    async def start(self) -> None:
        await self._listen()
        cfg = self.cfg
        _log_event(logging.INFO, "listening", service=self.service_name, role="server",
                   listen=f"{self.listen.host}:{self.port}", mode=cfg.mode.value, backend=cfg.backend and str(cfg.backend),
                   untrusted_backend=cfg.untrusted_backend and str(cfg.untrusted_backend),
                   client_cert=cfg.client_cert, xclient="yes" if cfg.xclient else None,
                   proxy_protocol=cfg.proxy_protocol)


# endregion
# region Tools: certificates ----------------------------------------------------------------------


def make_certificate(name: str, *, usage: str = "both", sans: tuple[str, ...] = (), days: int = 825,
                     rsa: bool = False, issuer: tuple | None = None, ca: bool = False,
                     key=None) -> tuple[bytes, bytes]:
    """A certificate every peer accepts; returns (cert PEM, key PEM).

    Leaf (default): CA:FALSE, EKU serverAuth and/or clientAuth (``usage`` server, client or both),
    SANs (``name`` when it looks like a host name, plus ``sans``). Self-signed, or signed by
    ``issuer`` = (CA certificate, CA key). ``ca=True`` makes a private CA (CA:TRUE, pathlen 0).
    ``key``: an existing private key (a renewal that keeps SPKI pins valid), else a new one.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric import rsa as rsa_mod
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if key is None:
        key = rsa_mod.generate_private_key(65537, 3072) if rsa else ec.generate_private_key(ec.SECP256R1())
    rsa = isinstance(key, rsa_mod.RSAPrivateKey)
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


def _paste_lines(name: str, cert_path: str, der: bytes, *, role: str, ca_path: str | None = None) -> str:
    """What the other side needs, for the role this certificate plays: a server's certificate is
    pinned on each laptop; a laptop's is allowed on the mail server (certproxy, Postfix, Exim)."""
    fp = format_fingerprint(cert_fingerprint(der))
    spki = format_fingerprint(spki_fingerprint(der))
    head = f"  certificate  {cert_path}\n  sha256       {fp}\n  spki sha256  {spki}\n\n"
    if role == "server":
        return head + f"""\
  This is a mail server's certificate. On each laptop:
    certproxy client ... --pin {fp}
      (or --pin {spki} to keep the pin across renewals with the same key)
  (For a laptop's certificate say --role client, or give a name without a dot.)
"""
    allow = f"--client-ca {ca_path} --allow-fingerprint '{fp} {name}'" if ca_path else f"--allow {cert_path}"
    return head + f"""\
  This is a laptop's (client) certificate. On the mail server, one of:
    certproxy server ... {allow}
    Postfix relay_clientcerts (smtpd_tls_fingerprint_digest = sha256):
      {fp} {name}
    Exim, in a list matched against ${{sha256:$tls_in_peercert}}:
      {fp.replace(":", "")}
  (For a server's certificate say --role server, or give its host name with a dot.)
"""


def _renewal(args: argparse.Namespace, issuer: tuple | None) -> tuple[object, tuple[str, ...], str, object]:
    """``--renew``: the certificate in --dir to renew, its SANs and usage, and its key (None with
    --new-key). Renewing keeps the name, SANs and usage; only the dates (and with --new-key the key)
    change."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    cert_path = os.path.join(args.dir, f"{args.name}.pem")
    key_path = os.path.join(args.dir, f"{args.name}.key")
    try:
        old = x509.load_der_x509_certificate(_pem_to_der(cert_path)[0])
    except (OSError, ValueError, IndexError):
        raise ConfigError("--renew", f"{cert_path} is not there (or holds no certificate): nothing to renew; "
                                     "leave out --renew to make a new certificate") from None
    if issuer is None and old.issuer != old.subject:
        raise ConfigError("--renew", f"{cert_path} was issued by {old.issuer.rfc4514_string()}: renew it from that "
                                     f"CA (certproxy ca issue {args.name} --renew --dir CA_DIR)")
    if issuer is not None and old.issuer != issuer[0].subject:
        raise ConfigError("--renew", f"{cert_path} was issued by {old.issuer.rfc4514_string()}, not by this CA "
                                     f"({issuer[0].subject.rfc4514_string()})")
    key = None
    if not args.new_key:
        try:
            with open(key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError("--renew", f"cannot load the key {key_path} ({getattr(e, 'strerror', None) or e}); "
                                         "add --new-key to renew with a new key") from None
        if issuer is not None:  # never certify again a key this CA has revoked a certificate of
            ca_dir, spki = _ca_dir(args.ca), spki_fingerprint(old.public_bytes(serialization.Encoding.DER))
            for row in _read_index(ca_dir):
                if row[0] == "R" and _row_spki(ca_dir, row) == spki:
                    raise ConfigError("--renew", f"a certificate of this key was revoked (serial {row[3]}, {row[2]}): "
                                                 "renew with --new-key")
    try:
        sans = tuple(str(n.value) for n in old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        sans = ()
    try:
        ekus = set(old.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        ekus = set()
    usage = {frozenset({ExtendedKeyUsageOID.SERVER_AUTH}): "server",
             frozenset({ExtendedKeyUsageOID.CLIENT_AUTH}): "client"}.get(frozenset(ekus), "both")
    return old, sans, usage, key


def _cmd_gencert(args: argparse.Namespace) -> int:
    issuer = _load_ca(args.ca) if args.ca else None
    if args.days < 1:
        raise ConfigError("--days", "must be at least 1")
    renew, new_key = getattr(args, "renew", False), getattr(args, "new_key", False)
    if new_key and not renew:
        raise ConfigError("--new-key", "only with --renew (a new certificate always has a new key)")
    old, sans, usage, key = _renewal(args, issuer) if renew else (None, (), "both", None)
    if old is not None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        args.rsa = args.rsa or isinstance(old.public_key(), rsa.RSAPublicKey)
    cert_pem, key_pem = make_certificate(args.name, usage=usage, sans=tuple(dict.fromkeys(sans + tuple(args.san))),
                                         days=args.days, rsa=args.rsa, issuer=issuer, key=key)
    cert_path, key_path = _write_pair(args.dir, args.name, cert_pem, key_pem, args.force or renew)
    der = _pem_to_der(cert_path)[0]
    kind = "issued by " + issuer[0].subject.rfc4514_string() if issuer else "self-signed"
    if issuer:
        _record_issued(_ca_dir(args.ca), der)
    done = "renewed" if renew else "wrote"
    print(f"{done} {cert_path} and {key_path} (mode 0600), {kind}, valid {args.days} days\n")
    ca_path = (os.path.join(args.ca, "ca.pem") if os.path.isdir(args.ca) else args.ca) if args.ca else None
    role = getattr(args, "role", "auto")
    if role == "auto":  # a host name with a dot, or SANs: a server; a bare name (laptop, alice): a client
        role = "server" if args.san or ("." in args.name and not issuer) else "client"
    print(_paste_lines(args.name, cert_path, der, role=role, ca_path=ca_path))
    if old is not None:
        print(_renewal_note(old, der, role, issuer is not None))
    return 0


def _renewal_note(old, der: bytes, role: str, from_ca: bool) -> str:
    """What a renewal changes for the other side: with the same key, SPKI pins and --allow-fingerprint
    SPKI entries still match; the certificate's own fingerprint always changes."""
    from cryptography.hazmat.primitives import serialization

    old_der = old.public_bytes(serialization.Encoding.DER)
    until = f"{_validity(old)[1]:%Y-%m-%d}"
    where = "its --pin on each laptop" if role == "server" else \
        "the file in --allow, a certificate --allow-fingerprint, Postfix relay_clientcerts"
    if spki_fingerprint(old_der) == spki_fingerprint(der):
        return (f"  Same key as before: SPKI pins ({format_fingerprint(spki_fingerprint(der))}) keep matching.\n"
                f"  The certificate SHA-256 changed: update {where} if they name the old one\n"
                f"  ({format_fingerprint(cert_fingerprint(old_der))}).")
    revoke = " (certproxy ca revoke FILE to end it now)" if from_ca else ""
    return (f"  New key: every pin and allow entry of the old certificate must be replaced ({where}).\n"
            f"  The old certificate stays valid until {until}{revoke}.")


# The CA's index of what it issued: OpenSSL's 'ca' format (index.txt: status, notAfter, revocation
# date[,reason], serial, file, subject), so 'openssl ca' reads it too; a copy of each certificate in
# issued/SERIAL.pem; crlnumber and crl.pem beside them.
_INDEX = "index.txt"


def _ca_dir(spec: str) -> str:
    return spec if os.path.isdir(spec) else os.path.dirname(os.path.abspath(spec))


def _asn1_time(when: datetime.datetime) -> str:
    return when.strftime("%y%m%d%H%M%SZ" if when.year < 2050 else "%Y%m%d%H%M%SZ")  # RFC 5280 4.1.2.5


def _from_asn1_time(text: str) -> datetime.datetime:
    fmt = "%y%m%d%H%M%SZ" if len(text) == 13 else "%Y%m%d%H%M%SZ"
    return datetime.datetime.strptime(text, fmt).replace(tzinfo=_UTC)


def _read_index(ca_dir: str) -> list[list[str]]:
    path = os.path.join(ca_dir, _INDEX)
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(_INDEX, f"cannot read {path}: {e.strerror}") from None
    rows = [line.split("\t") for line in lines]
    for n, row in enumerate(rows, 1):
        try:
            if len(row) != 6 or row[0] not in ("V", "R", "E"):
                raise ValueError("not 6 tab-separated fields starting with V, R or E")
            _from_asn1_time(row[1])
            int(row[3], 16)
            if row[0] == "R":
                _from_asn1_time(row[2].split(",")[0])
        except ValueError as e:
            raise ConfigError(_INDEX, f"{path} line {n} is not an OpenSSL CA index line ({e})") from None
    return rows


def _write_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError("--dir", f"cannot write {path}: {e.strerror}") from None


def _write_index(ca_dir: str, rows: list[list[str]]) -> None:
    _write_atomically(os.path.join(ca_dir, _INDEX), "".join("\t".join(r) + "\n" for r in rows).encode())
    attr = os.path.join(ca_dir, _INDEX + ".attr")
    if not os.path.exists(attr):  # a renewal keeps the subject: tell 'openssl ca' two valid rows may share it
        _write_atomically(attr, b"unique_subject = no\n")


def _index_row(der: bytes) -> list[str]:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    serial = f"{cert.serial_number:X}"
    serial = serial.zfill(len(serial) + len(serial) % 2)
    dn = "".join(f"/{a.rfc4514_string()}" for a in cert.subject)
    return ["V", _asn1_time(_validity(cert)[1]), "", serial, f"issued/{serial}.pem", dn]


def _record_issued(ca_dir: str, der: bytes) -> list[str]:
    """Add a certificate the CA issued to its index (and keep a copy): 'ca list' and 'ca revoke' work
    from there."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    row = _index_row(der)
    rows = _read_index(ca_dir)
    os.makedirs(os.path.join(ca_dir, "issued"), exist_ok=True)
    with open(os.path.join(ca_dir, row[4]), "wb") as f:
        f.write(x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM))
    if not any(r[3] == row[3] for r in rows):
        rows.append(row)
        _write_index(ca_dir, rows)
    return row


def _row_spki(ca_dir: str, row: list[str]) -> bytes | None:
    """The SPKI SHA-256 of an index row's certificate (from its copy in issued/), or None."""
    try:
        return spki_fingerprint(_pem_to_der(os.path.join(ca_dir, row[4]))[0])
    except (OSError, ValueError, IndexError):
        return None


def _row_name(row: list[str]) -> str:
    m = re.search(r"/CN=((?:[^/\\]|\\.)*)", row[5])
    return m.group(1).replace("\\", "") if m else row[5]


# The reasons 'ca revoke' takes: RFC 5280's permanent ones that OpenSSL's 'ca' also knows (a hold or
# removeFromCRL would let OpenSSL-based readers of the CRL take the certificate back).
_REVOKE_REASONS = ("unspecified", "keyCompromise", "cACompromise", "affiliationChanged", "superseded",
                   "cessationOfOperation")


def _reason(text: str):
    """A revocation reason in OpenSSL's or RFC 5280's spelling, any case (key-compromise, keyCompromise)."""
    from cryptography import x509

    want = re.sub(r"[-_ ]", "", text).lower()
    for name in _REVOKE_REASONS:
        if name.lower() == want:
            return x509.ReasonFlags(name)
    raise ConfigError("--reason", f"{text!r}: expected one of {', '.join(_REVOKE_REASONS)}")


def _index_reason(text: str):
    """The reason of an index row (ours or one 'openssl ca -revoke' wrote, holds included), for the CRL."""
    from cryptography import x509

    want = text.split(",")[0].lower()
    for flag in x509.ReasonFlags:
        if flag.value.lower() == want:
            return flag
    return x509.ReasonFlags.certificate_hold if want.startswith("hold") else x509.ReasonFlags.unspecified


def _write_crl(ca_dir: str, ca: tuple, rows: list[list[str]], days: int,
               before=lambda: None) -> tuple[str, int, datetime.datetime]:
    """Sign crl.pem from the index's revoked rows (a standard X.509 v2 CRL with CRL number and
    authority key identifier, which Exim, stunnel and OpenSSL read too); ``before`` runs once it is
    signed and before it is written (the index update of a revocation: a CRL that cannot be signed
    leaves the index as it was). Returns (path, count, nextUpdate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca_cert, ca_key = ca
    number_path = os.path.join(ca_dir, "crlnumber")
    try:
        with open(number_path) as f:
            number = int(f.read().strip(), 16)
    except (OSError, ValueError):
        number = 1
    now = datetime.datetime.now(_UTC)
    next_update = now + datetime.timedelta(days=days)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now - datetime.timedelta(minutes=5)).next_update(next_update)
               .add_extension(x509.CRLNumber(number), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False))
    count = 0
    for row in rows:
        if row[0] != "R":
            continue
        date, _, reason = row[2].partition(",")
        entry = x509.RevokedCertificateBuilder().serial_number(int(row[3], 16)).revocation_date(_from_asn1_time(date))
        flag = _index_reason(reason)
        if flag is not x509.ReasonFlags.unspecified:  # RFC 5280 5.3.1: then absent
            entry = entry.add_extension(x509.CRLReason(flag), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
        count += 1
    crl = builder.sign(ca_key, hashes.SHA256())
    before()
    path = os.path.join(ca_dir, "crl.pem")
    _write_atomically(path, crl.public_bytes(serialization.Encoding.PEM))
    following = f"{number + 1:X}"
    _write_atomically(number_path, f"{following.zfill(len(following) + len(following) % 2)}\n".encode())  # as openssl
    return path, count, next_update


def _cmd_ca_revoke(args: argparse.Namespace) -> int:
    from cryptography import x509

    if args.crl_days < 1:
        raise ConfigError("--crl-days", "must be at least 1")
    ca = _load_ca(args.dir)
    ca_dir = _ca_dir(args.dir)
    rows = _read_index(ca_dir)
    reason = _reason(args.reason)
    if os.path.isfile(args.target):  # a certificate file: exactly that one
        try:
            der = _pem_to_der(args.target)[0]
        except (OSError, ValueError, IndexError):
            raise ConfigError("NAME|FILE", f"{args.target} holds no PEM certificate") from None
        if not _signed_by(x509.load_der_x509_certificate(der), ca[0]):
            raise ConfigError("NAME|FILE", f"{args.target} was not issued by this CA "
                                           f"({ca[0].subject.rfc4514_string()}): nothing to revoke here; on the "
                                           f"server, --deny-fingerprint {format_fingerprint(cert_fingerprint(der))}")
        serial = _index_row(der)[3]
        if not any(r[3] == serial for r in rows):  # issued before the CA kept an index
            _record_issued(ca_dir, der)
            rows = _read_index(ca_dir)
        targets = [r for r in rows if r[3] == serial]
    else:  # a name: every certificate of that name still valid (a renewed one and its predecessor alike)
        now = datetime.datetime.now(_UTC)
        targets = [r for r in rows if _row_name(r) == args.target and r[0] == "V" and _from_asn1_time(r[1]) > now]
        if not targets:
            raise ConfigError("NAME|FILE", f"no valid certificate named {args.target!r} in "
                                           f"{os.path.join(ca_dir, _INDEX)} (certproxy ca list --dir {args.dir} "
                                           "shows them); or give the certificate file")
    if reason is x509.ReasonFlags.key_compromise:  # the key is out: every certificate of it goes
        keys = {_row_spki(ca_dir, r) for r in targets} - {None}
        targets += [r for r in rows if r[0] == "V" and r not in targets and _row_spki(ca_dir, r) in keys]
    when = _asn1_time(datetime.datetime.now(_UTC))
    for row in targets:
        if row[0] == "R":
            print(f"already revoked: {_row_name(row)} serial {row[3]} ({row[2]})")
            continue
        row[0], row[2] = "R", when + ("" if reason is x509.ReasonFlags.unspecified else f",{reason.value}")
        print(f"revoked {_row_name(row)} serial {row[3]} ({reason.value})")
    path, count, next_update = _write_crl(ca_dir, ca, rows, args.crl_days, before=lambda: _write_index(ca_dir, rows))
    print(f"\nwrote {path}: {count} revoked, next update {next_update:%Y-%m-%d}\n"
          f"  On the mail server: copy it there, give certproxy server --crl /etc/certproxy/crl.pem (once),\n"
          f"  then reload: systemctl reload certproxy (or kill -HUP). Sessions already open finish; the next\n"
          f"  connection with a revoked certificate is refused (554 5.7.1 certificate revoked on DATE).")
    return 0


def _cmd_ca_crl(args: argparse.Namespace) -> int:
    if args.days < 1:
        raise ConfigError("--days", "must be at least 1")
    ca_dir = _ca_dir(args.dir)
    path, count, next_update = _write_crl(ca_dir, _load_ca(args.dir), _read_index(ca_dir), args.days)
    print(f"wrote {path}: {count} revoked, next update {next_update:%Y-%m-%d}; copy it to the mail server and reload")
    return 0


def _cmd_ca_list(args: argparse.Namespace) -> int:
    """Name, serial, SHA-256, not-after and state of every certificate the CA issued, and a warning for
    those that expire within EXPIRY_WARNING_DAYS."""
    ca_dir = _ca_dir(args.dir)
    _load_ca(args.dir)
    rows = _read_index(ca_dir)
    if not rows:
        print(f"{os.path.join(ca_dir, _INDEX)}: no certificates issued yet (certproxy ca issue NAME --dir {args.dir})")
        return 0
    now = datetime.datetime.now(_UTC)
    table = [("NAME", "SERIAL", "SHA-256", "NOT AFTER", "STATE", "WARNING")]
    for row in rows:
        try:
            fp = format_fingerprint(cert_fingerprint(_pem_to_der(os.path.join(ca_dir, row[4]))[0]))
        except (OSError, ValueError, IndexError):
            fp = "? (no copy in " + row[4] + ")"
        not_after = _from_asn1_time(row[1])
        left = not_after - now
        if row[0] == "R":
            date, _, reason = row[2].partition(",")
            state, warning = f"revoked {_from_asn1_time(date):%Y-%m-%d} ({reason or 'unspecified'})", ""
        elif left.total_seconds() <= 0:
            state, warning = "expired", ""
        else:
            state = "valid"
            warning = f"expires in {left.days} days" if left.days < EXPIRY_WARNING_DAYS else ""
        table.append((_row_name(row), row[3], fp, f"{not_after:%Y-%m-%d}", state, warning))
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + ("  " + r[5] if r[5] else ""))
    crl = os.path.join(ca_dir, "crl.pem")
    if os.path.exists(crl):
        revoked = sum(r[0] == "R" for r in rows)
        problem = crl_problem(_crl_next_update(crl))
        print(f"\n{crl}: {revoked} revoked" + (f"; WARNING: {problem}: certproxy ca crl --dir {args.dir}" if problem else ""))
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
    if args.ca_command == "revoke":
        return _cmd_ca_revoke(args)
    if args.ca_command == "list":
        return _cmd_ca_list(args)
    if args.ca_command == "crl":
        return _cmd_ca_crl(args)
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
    not_after = _validity(cert)[1]
    return {"subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(), "sans": sans,
            "not_after": not_after.strftime("%Y-%m-%d %H:%M:%S UTC"),
            "days_left": str((not_after - datetime.datetime.now(datetime.timezone.utc)).days)}


def expiry_problem(der: bytes) -> str | None:
    """A sentence when the certificate has expired or expires within EXPIRY_WARNING_DAYS, else None."""
    from cryptography import x509

    return _due(_validity(x509.load_der_x509_certificate(der))[1], "EXPIRED on {date}", "expires in {days} days ({date})")


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
    mode = upstream_mode(ep, args.starttls, args.tls)
    ctx = _tls_context(server=False)
    ctx.set_verify(SSL.VERIFY_PEER, _on_verify)  # records, never refuses: the probe shows what is there
    if args.cert:
        _load_identity(ctx, args.cert, args.key)
    asked: list[bool] = []

    def on_state(conn, where: int, ret: int) -> None:
        if b"certificate request" in (conn.get_state_string() or b""):
            asked.append(True)

    ctx.set_info_callback(on_state)
    detected = ""
    try:
        try:
            pump, tls = await _probe_connect(ep, mode, ctx, args.server_name or ep.host)
        except WrongMode as e:
            if args.tls or args.starttls:  # the user said which: tell them it is the other one
                raise
            detected = f" -- detected: {e.reason.split(': ')[0]}; so {e.mode.value}, not {mode.value}"
            mode = e.mode
            asked.clear()
            pump, tls = await _probe_connect(ep, mode, ctx, args.server_name or ep.host)
    except SessionError as e:
        print(f"certproxy: probe {ep}: {e.reason}", file=sys.stderr)
        return 1
    except (OSError, TimeoutError, asyncio.TimeoutError) as e:
        print(f"certproxy: probe {ep}: {_describe(e)}", file=sys.stderr)
        return 1
    ders = tls.peer_chain() or [tls.peer_der()]
    facts = tls.facts()
    ca_names = [",".join(f"{k.decode()}={v.decode('utf-8', 'replace')}" for k, v in reversed(n.get_components()))
                for n in tls.conn.get_client_ca_list() or ()]  # RFC 4514 order, as the log lines spell names
    accepted = ""
    if args.cert:  # does the server let us talk once it has seen our certificate?
        exchange = Exchange(b"" if mode is TLSMode.IMPLICIT else b"NOOP\r\n", keep=True)
        try:
            async with asyncio.timeout(10):
                await _drive(pump, exchange)
            said = f"{exchange.reply.code} {exchange.reply.lines[0]}"
            accepted = f"REFUSED, the server says: {said}" if _refuses_certificate(exchange.reply) else \
                f"accepted (the server answered inside TLS: {said})" if exchange.reply.code // 100 == 2 else \
                f"unclear, the server answered inside TLS: {said}"
        except (SessionError, TimeoutError, asyncio.TimeoutError) as e:
            accepted = f"REFUSED: the server ended the session after the handshake ({getattr(e, 'reason', 'timed out')})"
    pump.close()
    _release(pump)
    print(f"{ep} ({mode.value}{detected})\n  TLS        {facts['tls_version']} {facts['cipher']}\n"
          f"  asked for a client certificate: {'yes' if asked else 'no'}"
          + (f" (CA names: {'; '.join(ca_names)})" if ca_names else "")
          + (f"\n  our client certificate: {accepted}" if accepted else "")
          + "\n  chain as sent by the server:")
    for i, cert_der in enumerate(ders):
        info = certificate_summary(cert_der)
        problem = expiry_problem(cert_der)
        print(f"   {i} subject  {info['subject']}\n     issuer   {info['issuer']}\n     SANs     {info['sans']}\n"
              f"     expires  {info['not_after']}" + (f"  WARNING: {problem}" if problem else ""))
    der = ders[0]
    fp, spki = format_fingerprint(cert_fingerprint(der)), format_fingerprint(spki_fingerprint(der))
    print(f"  server certificate\n    sha256  {fp}\n    spki    {spki}\n\n"
          f"  Compare this with the server's own 'certproxy fingerprint' before trusting it, then:\n"
          f"    --pin {fp}\n  or, to survive a renewal that keeps the key:\n    --pin {spki}")
    return 0


async def _probe_connect(ep: Endpoint, mode: TLSMode, ctx: SSL.Context, sni: str) -> tuple[_Pump, _TLS]:
    """probe's connection: [STARTTLS dialogue] and handshake; WrongMode when the port speaks the other mode."""
    tls = _TLS(ctx, server=False, sni=sni)
    pump = None
    try:
        async with asyncio.timeout(15):
            pump = await _dial(ep, tls if mode is TLSMode.IMPLICIT else None, timeout=15)
            if mode is TLSMode.STARTTLS:
                await _greeting_or_tls(pump, ep, 15)
                await _drive(pump, StartTLSClient(DEFAULT_EHLO))
                pump.start_tls(tls)
            try:
                await pump.handshake
            except SessionError:
                if mode is TLSMode.IMPLICIT and (wrong := _greets_in_clear(tls)) is not None:
                    raise wrong from None
                raise
    except BaseException:
        if pump is not None:
            _abort_all(pump)
            _release(pump)
        raise
    return pump, tls


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
    say("""
Do the same for real (these certificates were throwaway: make your own):
  on the mail server:  certproxy gencert mail.example.org            # certs/mail.example.org.pem + .key
  on the laptop:       certproxy gencert laptop                      # certs/laptop.pem + .key
  copy certs/laptop.pem (not the key) to the server, and note the pin gencert printed on the server; then
  on the mail server:  certproxy server --starttls --listen 0.0.0.0:587 --backend 127.0.0.1:10025 \\
                         --cert certs/mail.example.org.pem --key certs/mail.example.org.key --allow certs/laptop.pem
  on the laptop:       certproxy client --upstream mail.example.org:587 \\
                         --cert certs/laptop.pem --key certs/laptop.key --pin <the server's sha256>
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
    _add_log_options(p, None)
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
    _add_metrics_options(c)
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
    sv.add_argument("--crl", action="append", default=[], metavar="FILE",
                    help="refuse certificates this CRL (signed by --client-ca; 'certproxy ca revoke' writes one) "
                         "revokes; repeatable, re-read on SIGHUP")
    sv.add_argument("--soft-refusal", action="store_true",
                    help="refuse a certificate not (yet) allowed, or none, with 454 4.7.x instead of 5xx, like "
                         "Postfix's soft_bounce: sending MTAs keep the mail queued and retry while you allow a new "
                         "laptop (revoked and denied certificates still get 554)")
    sv.add_argument("--deny-fingerprint", action="append", default=[], metavar="'FP [NOTE]'",
                    help="refuse this certificate or public-key SHA-256 whatever allows it (a stolen laptop); repeatable")
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
    sv.add_argument("--ipv6-prefix-length", type=int, default=IPV6_PREFIX_LENGTH, metavar="BITS",
                    help="IPv6 clients count as one per network of this size for --max-per-ip (default %(default)s)")
    _add_service_options(sv)
    _add_workers_option(sv)
    _add_metrics_options(sv)
    sv.set_defaults(func=_cmd_server)

    r = sub.add_parser("run", help="run every service in a TOML config file (SIGHUP reloads it)")
    r.add_argument("config", metavar="CONFIG.toml")
    r.add_argument("--grace", type=float, default=GRACE_S, metavar="SECONDS",
                   help="on SIGTERM, let live sessions finish this long (default %(default)s)")
    _add_workers_option(r)
    _add_metrics_options(r)
    r.set_defaults(func=_cmd_run)
    k = sub.add_parser("check", help="validate a TOML config file without starting anything")
    k.add_argument("config", metavar="CONFIG.toml")
    k.add_argument("--list", action="store_true",
                   help="also print who may pass: every allowed certificate (name, fingerprint, expiry), CA and pin")
    k.set_defaults(func=_cmd_check)

    g = sub.add_parser("gencert", help="make a certificate and key, and print what to paste on the other side")
    g.add_argument("name", metavar="NAME", help="common name; also the file name certs/NAME.pem + .key")
    g.add_argument("--dir", default="certs", help="default %(default)s")
    g.add_argument("--days", type=int, default=825, help="validity (default %(default)s)")
    g.add_argument("--rsa", action="store_true", help="RSA 3072 instead of ECDSA P-256")
    g.add_argument("--san", action="append", default=[], metavar="NAME", help="extra DNS name or IP address")
    g.add_argument("--ca", metavar="DIR_OR_FILE", help="issue from this CA (see 'certproxy ca init') instead of self-signing")
    g.add_argument("--force", action="store_true", help="overwrite existing files")
    g.add_argument("--renew", action="store_true",
                   help="re-issue --dir/NAME.pem with new dates, same name, SANs and key (SPKI pins keep matching)")
    g.add_argument("--new-key", action="store_true", help="with --renew: a new key too")
    g.add_argument("--role", choices=("auto", "server", "client"), default="auto",
                   help="which paste lines to print: a server's (--pin) or a laptop's (--allow); auto: a name "
                        "with a dot or --san is a server")
    g.set_defaults(func=_cmd_gencert)

    ca = sub.add_parser("ca", help="a private CA for many laptops")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="init|issue|revoke|list|crl")
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
    cs.add_argument("--renew", action="store_true",
                    help="re-issue NAME with new dates, same SANs and key (SPKI pins keep matching)")
    cs.add_argument("--new-key", action="store_true", help="with --renew: a new key too")
    cv = ca_sub.add_parser("revoke", help="revoke a certificate and write DIR/crl.pem for certproxy server --crl")
    cv.add_argument("target", metavar="NAME|FILE", help="every valid certificate of that name, or that certificate file")
    cv.add_argument("--dir", default="certs", help="the CA's directory (default %(default)s)")
    cv.add_argument("--reason", default="unspecified",
                    help="RFC 5280 reason: keyCompromise, affiliationChanged, superseded, cessationOfOperation, ...")
    cv.add_argument("--crl-days", type=int, default=CRL_DAYS, metavar="DAYS",
                    help="the CRL's nextUpdate (default %(default)s days)")
    cl = ca_sub.add_parser("list", help="every certificate the CA issued: name, serial, SHA-256, expiry, revoked")
    cl.add_argument("--dir", default="certs", help="the CA's directory (default %(default)s)")
    cc = ca_sub.add_parser("crl", help="sign a fresh DIR/crl.pem (before its nextUpdate)")
    cc.add_argument("--dir", default="certs", help="the CA's directory (default %(default)s)")
    cc.add_argument("--days", type=int, default=CRL_DAYS, help="nextUpdate (default %(default)s days)")
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
    for command in sub.choices.values():  # the log options after the command too
        if not any("--log-level" in a.option_strings for a in command._actions):
            _add_log_options(command, argparse.SUPPRESS)
    return p


LOG_LEVELS, LOG_FORMATS = ("debug", "info", "warning", "error"), ("text", "json")


def _add_log_options(p: argparse.ArgumentParser, default) -> None:
    """--log-level / --log-format, before the command or after it (``default`` SUPPRESS there, so that
    only a value given overrides), or as top-level keys of a config file."""
    p.add_argument("--log-level", default=default, choices=LOG_LEVELS, help="default info")
    p.add_argument("--log-format", default=default, choices=LOG_FORMATS, help="json: one object per line (default text)")


_PROCESS_KEYS = ("log-level", "log-format", "metrics", "metrics-public")  # top-level keys of a config file


def _file_options(path: str) -> dict[str, object]:
    """The process-wide keys at the top of a config file (errors there are load_config's to report)."""
    import tomllib

    if not os.path.isfile(path):  # a pipe (/dev/stdin) is read once, by load_config
        return {}
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    kinds = {"log-level": str, "log-format": str, "metrics": (str, int), "metrics-public": bool}
    return {k: v for k, v in doc.items() if k in kinds and isinstance(v, kinds[k])
            and (k != "metrics" or not isinstance(v, bool))
            and (k != "log-level" or v in LOG_LEVELS) and (k != "log-format" or v in LOG_FORMATS)}


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


def _add_metrics_options(p: argparse.ArgumentParser) -> None:
    """Process-wide, like --workers (in a config file: top-level keys ``metrics``, ``metrics-public``)."""
    p.add_argument("--metrics", metavar="[HOST:]PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST default 127.0.0.1)")
    p.add_argument("--metrics-public", action="store_true", default=None,
                   help="allow --metrics on a non-loopback address")


def _metrics_option(args: argparse.Namespace, in_file: dict | None = None) -> Endpoint | None:
    in_file = in_file or {}
    text = args.metrics or in_file.get("metrics")
    if text is None:
        return None
    return metrics_endpoint(str(text), bool(args.metrics_public or in_file.get("metrics-public")))


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
        crl=tuple(args.crl),
        deny_fingerprints=Pins.parse(args.deny_fingerprint, "--deny-fingerprint", named=True),
        hostname=args.hostname,
        client_cert=args.client_cert,
        starttls_optional=args.starttls_optional,
        untrusted_backend=args.untrusted_backend and Endpoint.parse(args.untrusted_backend, "--untrusted-backend"),
        xclient=args.xclient,
        proxy_protocol=args.proxy_protocol,
        proxy_from=_networks(args.proxy_from, "--proxy-from"),
        max_connections=args.max_connections,
        max_per_ip=args.max_per_ip,
        ipv6_prefix_length=args.ipv6_prefix_length,
        soft_refusal=args.soft_refusal,
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


def _raise_usage(where: str, parser: argparse.ArgumentParser):
    def error(message: str):
        import difflib

        m = re.search(r"argument (--[\w-]+)", message)
        option = m.group(1) if m else "option"
        message = re.sub(r"^argument [^:]+: ", "", message)
        if message.startswith("unrecognized arguments: "):
            known = [o[2:] for a in parser._actions for o in a.option_strings if o.startswith("--")]
            unknown = [w[2:] for w in message.split()[2:] if w.startswith("--")]
            option = f"--{unknown[0]}" if unknown else option
            hints = [f"{u} -> {close[0]}" for u in unknown if (close := difflib.get_close_matches(u, known, 1))]
            message = f"unknown key(s) {', '.join(unknown)}" + (f" (did you mean: {'; '.join(hints)}?)" if hints else "")
        raise _ConfigFileError(f"{where} {option}", message)
    return error


class ConfigErrors(ConfigError):
    """Several configuration errors at once (every service of a file is checked)."""

    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__(errors[0].option, "; ".join(str(e) for e in errors))
        self.errors = errors

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


def load_config(path: str, text: bytes | None = None) -> dict[str, _Listener]:
    """Services from a TOML file (or its ``text``, read before): one table per service, ``[client.NAME]``
    or ``[server.NAME]``, whose keys are the command-line options without dashes (``pin = ["..."]``,
    ``allow-remote-clients = true``). Every error names the file, the service and the option."""
    import tomllib

    try:
        if text is None:
            with open(path, "rb") as f:
                text = f.read()
        doc = tomllib.loads(text.decode("utf-8"))
    except OSError as e:
        raise ConfigError(path, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "not valid TOML: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, f"not valid TOML: {e}") from None
    for key in ("log-level", "log-format"):
        allowed = LOG_LEVELS if key == "log-level" else LOG_FORMATS
        if key in doc and doc[key] not in allowed:
            raise ConfigError(f"{path} {key}", f"{doc[key]!r}: expected one of {', '.join(allowed)}")
    if "metrics" in doc:
        if not isinstance(doc["metrics"], (str, int)) or isinstance(doc["metrics"], bool):
            raise ConfigError(f"{path} metrics", "expected \"HOST:PORT\" or a port number")
        metrics_endpoint(str(doc["metrics"]), doc.get("metrics-public") is True)
    if "metrics-public" in doc and not isinstance(doc["metrics-public"], bool):
        raise ConfigError(f"{path} metrics-public", "expected true or false")
    unknown = set(doc) - {"client", "server", *_PROCESS_KEYS}
    if unknown:
        raise ConfigError(path, f"unknown table(s) {', '.join(sorted(unknown))}: use [client.NAME] or [server.NAME]")
    parser = _build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    services: dict[str, _Listener] = {}
    errors: list[ConfigError] = []  # every service is checked: all the errors at once
    seen: set[str] = set()
    for kind in ("client", "server"):
        for name, table in doc.get(kind, {}).items():
            where = f"{path} [{kind}.{name}]"
            try:
                services[name] = _load_service(kind, name, table, where, path, seen, subparsers[kind])
            except ConfigError as e:
                errors.append(e)
    if errors:
        raise errors[0] if len(errors) == 1 else ConfigErrors(errors)
    if not services:
        raise ConfigError(path, "defines no service: add a [client.NAME] or [server.NAME] table")
    return services


def _load_service(kind: str, name: str, table: object, where: str, path: str, seen: set[str],
                  sub: argparse.ArgumentParser) -> _Listener:
    if not isinstance(table, dict):
        raise ConfigError(where, "must be a table")
    if name in seen:
        raise ConfigError(where, "a service of this name is defined twice")
    seen.add(name)
    for key in ("workers", "grace", *_PROCESS_KEYS):
        if key in table:
            where_instead = f"at the top of {path}, before any table" if key in _PROCESS_KEYS else \
                f"on the command line, certproxy run --{key} ... {path}"
            raise ConfigError(f"{where} --{key}", f"applies to the whole process: give it {where_instead}")
    sub.error = _raise_usage(where, sub)
    try:
        args = sub.parse_args(_table_to_argv(table))
        args.name = name
        cfg = client_config_from_args(args) if kind == "client" else server_config_from_args(args)
        return ClientService(cfg) if kind == "client" else ServerService(cfg)
    except _ConfigFileError:
        raise
    except ConfigError as e:
        raise ConfigError(f"{where} {e.option}", str(e).split(": ", 1)[1]) from None


def check_services(services: dict[str, _Listener]) -> tuple[list[str], list[str]]:
    """What ``check`` adds to loading: (errors, notes). An expired certificate of the service's own is
    an error; an expired client certificate in --allow (or CA) is a note: that one client is refused,
    everyone else served. A listen address in use is a note (it may be this very service, running);
    one that is not this machine's is an error."""
    errors, notes = [], []
    for name, svc in services.items():
        for option, path, subject, problem in svc._expiring():
            if option == "--crl":
                notes.append(f"[{name}] --crl: {path} {problem}: {_EXPIRY_ACTIONS['--crl']}")
            elif not problem.startswith("EXPIRED"):
                continue
            elif option == "--cert":
                errors.append(f"[{name}] --cert: {path} {problem}: renew it (certproxy gencert NAME --renew)")
            else:
                notes.append(f"[{name}] {option}: {path} ({subject}) {problem}: it is refused "
                             f"until its owner sends a renewed one; everyone else is served")
        if isinstance(svc, ClientService):
            for up in svc.cfg.upstreams:  # the usual ports say which TLS mode to expect (RFC 8314)
                port, mode = up.endpoint.port, up.mode
                if port == IMPLICIT_TLS_PORT and mode is TLSMode.STARTTLS:
                    notes.append(f"[{name}] --upstream {up.endpoint}: port 465 is implicit TLS (RFC 8314); with "
                                 "--starttls the connection will wait for a greeting that never comes: drop --starttls")
                elif port in (25, 587) and mode is TLSMode.IMPLICIT:
                    notes.append(f"[{name}] --upstream {up.endpoint}: port {port} normally speaks STARTTLS; with --tls "
                                 "the server's clear greeting breaks the handshake: drop --tls unless this server "
                                 "really speaks TLS at once there (certproxy probe tells)")
        problem, note = _listen_problem(svc.listen)
        if problem:
            errors.append(f"[{name}] --listen: {problem}")
        if note:
            notes.append(f"[{name}] --listen: {note}")
    return errors, notes


def _listen_problem(ep: Endpoint) -> tuple[str, str]:
    """(error, note) about listening on ``ep``, found without binding its port: the address must be
    this machine's (bound on port 0 to see); someone already listening there is a note (it may be this
    very service, running), and so is a privileged port."""
    family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((ep.host, 0))
    except OSError as e:
        return f"cannot listen on {ep}: {e.strerror or e} (not an address of this machine?)", ""
    notes = []
    if 0 < ep.port < 1024 and os.geteuid() != 0:
        notes.append(f"port {ep.port} needs root or CAP_NET_BIND_SERVICE")
    probe_host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(ep.host, ep.host)
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        if ep.port and s.connect_ex((probe_host, ep.port)) == 0:
            notes.append(f"something listens on {ep} already (fine if it is this service, running)")
    return "", "; ".join(notes)


class _Supervisor:
    """Runs services; SIGHUP reloads them from ``loader`` (a broken new configuration is refused and
    the running one kept); SIGTERM/SIGINT stop accepting and let live sessions finish within ``grace``."""

    def __init__(self, loader, grace: float, metrics: Endpoint | None = None) -> None:
        self.loader = loader
        self.grace = grace
        self.metrics = metrics
        self.services: dict[str, _Listener] = {}
        self._reloading: asyncio.Task | None = None
        self._again = False  # a SIGHUP came while reloading: reload once more, with the newest file

    def request_reload(self) -> None:
        """One reload at a time; SIGHUPs during one fold into a single reload after it."""
        if self._reloading is not None and not self._reloading.done():
            self._again = True
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload_until_quiet())

    async def _reload_until_quiet(self) -> None:
        while True:
            self._again = False
            await self.reload()
            if not self._again:
                return

    async def run(self) -> None:
        global _METRICS
        loop = asyncio.get_running_loop()
        self.services = self.loader()
        metrics = None
        if self.metrics is not None:  # before the services: a port it cannot have stops everything
            _METRICS = _METRICS or _Metrics()
            metrics = await _serve_metrics(self.metrics, lambda: self.services)
            _log_event(logging.INFO, "metrics", listen=f"http://{self.metrics}/metrics")
        for svc in self.services.values():
            await svc.start()
        # What start-up made (modules, contexts, certificates) lives for the whole run: keep it out of
        # every garbage collection from now on.
        gc.freeze()
        stop = loop.create_future()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # one that came while starting: now
        await stop
        if self._reloading is not None:
            await asyncio.gather(self._reloading, return_exceptions=True)
        active = sum(len(s.active) for s in self.services.values())
        _log_event(logging.INFO, "stopping", sessions=active, grace=self.grace)
        await asyncio.gather(*(s.stop(self.grace) for s in self.services.values()))
        if metrics is not None:
            metrics.cancel()
            await asyncio.gather(metrics, return_exceptions=True)
        _log_event(logging.INFO, "stopped")

    async def reload(self) -> None:
        try:
            new = self.loader()
        except ConfigError as e:
            _log_event(logging.ERROR, "reload", outcome="refused", reason=str(e),
                       action="fix the configuration and send SIGHUP again; the running one is kept")
            return
        failed = []
        for name, svc in new.items():
            old = self.services.get(name)
            if old is not None and type(old) is type(svc) and old.listen == svc.listen:
                old.replace(svc)
                continue
            try:  # the new listener first: if it cannot start, the old one goes on serving
                await svc.start()
            except ConfigError as e:
                failed.append(name)
                _log_event(logging.ERROR, "reload", service=name, outcome="failed", reason=str(e),
                           action="the running service is kept" if old is not None else "not started")
                continue
            self.services[name] = svc
            if old is not None:
                await old.stop(self.grace)
        for name in set(self.services) - set(new):
            await self.services.pop(name).stop(self.grace)
        if failed:
            _log_event(logging.ERROR, "reload", outcome="partial", failed=",".join(failed),
                       services=",".join(sorted(self.services)),
                       action="fix what the lines above say and send SIGHUP again")
        else:
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


def _supervise(loader, grace: float, workers: int = 1, metrics: Endpoint | None = None) -> int:
    # A reload asked for while we are still starting must neither kill us (SIGHUP's default action) nor
    # be lost: blocked (kept pending) until the supervisor's own handler is in place.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    services = loader()  # configuration errors surface here, before anything listens
    _raise_open_files_limit()
    if workers > 1:
        if metrics is not None:
            raise ConfigError("--metrics", "not with --workers: each worker would count only its own sessions; "
                                           "use one process (it serves thousands of sessions) or leave out --metrics")
        return _run_workers(loader, grace, workers, services)
    first = [services]
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_Supervisor(lambda: first.pop() if first else loader(), grace, metrics).run())
    return 0


def _run_workers(loader, grace: float, n: int, services: dict[str, _Listener]) -> int:
    """--workers N: N forked processes, each running every service on the same ports (SO_REUSEPORT:
    the kernel spreads new connections across them). The parent only forwards SIGHUP / SIGTERM /
    SIGINT and restarts a worker that dies, with backoff; a worker that cannot start (exit 2) stops
    them all. Signals are blocked around each fork, so none is lost or handled by the wrong process,
    and a worker started again loads the configuration the others loaded (``loader.pinned``), not
    whatever the file says now."""
    for name, svc in services.items():
        if svc.listen.port == 0:
            raise ConfigError("--workers", f"[{name}] needs a fixed --listen port (not 0) to share between workers")
        # SO_REUSEPORT would also let us share the port with a forgotten older instance (and its old
        # allowlist): make sure nobody listens there yet.
        problem = _port_problem(svc.listen)
        if problem:
            raise ConfigError("--listen", f"[{name}] {problem}")
    children: dict[int, tuple[int, float]] = {}  # pid -> (worker number, started)
    failures: dict[int, int] = {}  # worker number -> deaths in a row, each soon after its start
    state = {"stopping": False}
    handled = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
    pinned = getattr(loader, "pinned", loader)

    def spawn(number: int) -> int:
        global _WORKER, _REUSE_PORT
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        if pid:
            children[pid] = (number, time.monotonic())
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a SIGTERM that came meanwhile reaches it now
            return pid
        code = 1
        try:  # the worker: a process of its own from here on, with its own handlers before any signal
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask | {signal.SIGHUP})  # SIGHUP: kept for its supervisor
            _WORKER, _REUSE_PORT = number, True
            first = [pinned]
            code = _supervise(lambda: (first.pop() if first else loader)(), grace)
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
        elif sig == signal.SIGHUP:
            getattr(loader, "remember", lambda: None)()  # what the workers are about to load
        for pid in list(children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for sig in handled:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # blocked by _supervise until now
    for number in range(1, n + 1):
        if state["stopping"]:  # a SIGTERM during start-up: start no more
            break
        spawn(number)
    _log_event(logging.INFO, "workers", count=n, pids=",".join(str(p) for p in children))
    status = 0
    while children:
        try:
            pid, raw = os.wait()
        except ChildProcessError:
            break
        number, started = children.pop(pid, (None, 0.0))
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
        failures[number] = failures.get(number, 0) + 1 if time.monotonic() - started < WORKER_STABLE_S else 1
        delay = min(WORKER_BACKOFF_MAX_S, 2.0 ** (failures[number] - 1))
        _log_event(logging.ERROR, "worker", worker=number, pid=pid, outcome="died", code=code,
                   action=f"restarting it in {delay:g} s")
        deadline = time.monotonic() + delay
        while not state["stopping"] and time.monotonic() < deadline:  # a SIGTERM cuts the pause short
            time.sleep(0.1)
        if not state["stopping"]:  # a SIGTERM during the pause: do not start what nobody will stop
            _log_event(logging.INFO, "worker", worker=number, pid=spawn(number), outcome="restarted")
    return status


def _workers(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ConfigError("--workers", "must be at least 1")
    return args.workers


def _cmd_client(args: argparse.Namespace) -> int:
    return _supervise(lambda: {"client": ClientService(client_config_from_args(args))}, args.grace, _workers(args),
                      _metrics_option(args))


def _cmd_server(args: argparse.Namespace) -> int:
    return _supervise(lambda: {"server": ServerService(server_config_from_args(args))}, args.grace, _workers(args),
                      _metrics_option(args))


class _ConfigFile:
    """``run CONFIG.toml``'s loader: the services as the file says now. For --workers it also keeps the
    text the workers loaded (at start, and at each SIGHUP: ``remember``) so that a worker started again
    runs what the others run (``pinned``), even if the file was edited since without a SIGHUP."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.text: bytes | None = None

    def __call__(self) -> dict[str, _Listener]:
        text = self._read()
        services = load_config(self.path, text)
        if self.text is None:
            self.text = text
        return services

    def _read(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except OSError as e:
            raise ConfigError(self.path, f"cannot read: {e.strerror}") from None

    def remember(self) -> None:
        try:
            text = self._read()
            load_config(self.path, text)  # only a file the workers will accept replaces what they run
        except ConfigError:
            return
        self.text = text

    def pinned(self) -> dict[str, _Listener]:
        return load_config(self.path, self.text) if self.text is not None else self()


def _cmd_run(args: argparse.Namespace) -> int:
    return _supervise(_ConfigFile(args.config), args.grace, _workers(args),
                      _metrics_option(args, _file_options(args.config)))


def _cmd_check(args: argparse.Namespace) -> int:
    services = load_config(args.config)
    problems, notes = check_services(services)
    for note in notes:
        print(f"certproxy: note: {args.config} {note}", file=sys.stderr)
    for problem in problems:
        print(f"certproxy: error: {args.config} {problem}", file=sys.stderr)
    if problems:
        return 2
    for name, svc in services.items():
        print(f"ok  [{name}] {type(svc).__name__.replace('Service', '').lower()} listen={svc.listen}")
        if args.list:
            print(_identities(svc))
    return 0


def _identities(svc: _Listener) -> str:
    """``check --list``: who may pass through ``svc`` (a server's allowed certificates and CAs, a
    client's pins), one line each: name, SHA-256, expiry."""
    from cryptography import x509

    def line(what: str, name: str, fp: str, der: bytes | None) -> str:
        until = ""
        if der is not None:
            not_after = _validity(x509.load_der_x509_certificate(der))[1]
            problem = expiry_problem(der)
            until = f"  until {not_after:%Y-%m-%d}" + (f"  {problem}" if problem else "")
        return f"    {what:<18} {name:<24} {fp}{until}"

    cfg, out = svc.cfg, []
    if isinstance(svc, ClientService):
        out += [line("--pin", "(server or its key)", format_fingerprint(d), None) for d in sorted(cfg.pins.digests)]
        if cfg.ca:
            out += [line("--ca", certificate_subject(der), format_fingerprint(cert_fingerprint(der)), der)
                    for der in _pem_to_der(cfg.ca)]
        return "\n".join(out) or "    (nothing: refuses every server)"
    names = dict(cfg.allow_fingerprints.names)
    for path in _allow_files(cfg.allow):
        for der in _pem_to_der(path):
            fp = cert_fingerprint(der)
            name = names.get(fp) or names.get(spki_fingerprint(der)) or svc.policy.name(der)
            out.append(line("--allow", name, format_fingerprint(fp), der))
    if cfg.client_ca:
        for der in _pem_to_der(cfg.client_ca):
            out.append(line("--client-ca", "any it issued: " + certificate_subject(der),
                            format_fingerprint(cert_fingerprint(der)), der))
    if cfg.allow_fingerprints.digests:
        out.append("    narrowed by --allow-fingerprint to:")
        out += [line("", names.get(d, "(no name)"), format_fingerprint(d), None)
                for d in sorted(cfg.allow_fingerprints.digests)]
    denied = dict(cfg.deny_fingerprints.names)
    out += [line("--deny-fingerprint", denied.get(d, "(refused)"), format_fingerprint(d), None)
            for d in sorted(cfg.deny_fingerprints.digests)]
    for path, nxt in svc.policy.crl_updates.items():
        revoked = sum(r.crl == path for r in svc.policy.revoked.values())
        problem = crl_problem(nxt)
        out.append(f"    {'--crl':<18} {path}: {revoked} revoked" + (f", next update {nxt:%Y-%m-%d}" if nxt else "")
                   + (f"  {problem}" if problem else ""))
    if cfg.client_cert != "required":
        out.append(f"    and everyone else to --untrusted-backend {cfg.untrusted_backend}")
    return "\n".join(out) or "    (nobody)"


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    # The command line (before or after the command) wins over the config file's top-level keys.
    in_file = _file_options(args.config) if getattr(args, "config", None) else {}
    log_level = args.log_level or in_file.get("log-level", "info")  # a bad value there: load_config says so
    log_format = args.log_format or in_file.get("log-format", "text")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if log_format == "json" else
                         logging.Formatter("%(asctime)s certproxy %(levelname)s %(message)s"))
    logging.basicConfig(level=log_level.upper(), handlers=[handler])
    # One line per session is the hot path of logging: skip what our lines never show (the caller's
    # file and line, a stack walk; the process id, a system call; thread and task names).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.logAsyncioTasks = False
    try:
        return args.func(args)
    except ConfigError as e:
        for error in getattr(e, "errors", [e]):
            print(f"certproxy: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
