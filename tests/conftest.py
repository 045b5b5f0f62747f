"""Shared fixtures: certificates from certproxy's own generator, aiosmtpd upstreams, scripted peers."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import certproxy  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class CertPair:
    cert: Path
    key: Path

    @property
    def der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.cert.read_text())

    @property
    def fp(self) -> str:
        return certproxy.format_fingerprint(certproxy.cert_fingerprint(self.der))

    @property
    def spki(self) -> str:
        return certproxy.format_fingerprint(certproxy.spki_fingerprint(self.der))


@dataclass
class Certs:
    dir: Path
    server: CertPair
    client: CertPair
    other_server: CertPair
    other_client: CertPair


def _write(dir: Path, name: str, usage: str, sans=()) -> CertPair:
    cert, key = certproxy.make_certificate(name, usage=usage, sans=sans)
    c, k = dir / f"{name}.pem", dir / f"{name}.key"
    c.write_bytes(cert)
    k.write_bytes(key)
    k.chmod(0o600)
    return CertPair(c, k)


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    d = tmp_path_factory.mktemp("certs")
    return Certs(
        dir=d,
        server=_write(d, "mx.certproxy.test", "server", ("localhost", "127.0.0.1")),
        client=_write(d, "laptop", "client"),
        other_server=_write(d, "evil.certproxy.test", "server", ("localhost", "127.0.0.1")),
        other_client=_write(d, "stranger", "client"),
    )


def server_context(server: CertPair, trusted_clients: list[CertPair] | None) -> ssl.SSLContext:
    """A TLS server context for test upstreams: requires one of ``trusted_clients`` when given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(server.cert, server.key)
    if trusted_clients:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        for c in trusted_clients:
            ctx.load_verify_locations(c.cert)
    return ctx


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    peercert: dict | None


@dataclass
class Recorder:
    messages: list[Received] = field(default_factory=list)

    async def handle_DATA(self, server, session, envelope):
        peercert = server.transport.get_extra_info("peercert")
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content, peercert))
        return "250 2.0.0 Ok: queued as TEST"


@pytest.fixture
def aiosmtpd_upstream(certs):
    """Factory: an aiosmtpd server (STARTTLS required, or implicit TLS) that demands our client cert."""
    from aiosmtpd.controller import Controller

    started = []

    def start(mode: str = "starttls", server: CertPair | None = None, clients=None):
        handler = Recorder()
        ctx = server_context(server or certs.server, clients if clients is not None else [certs.client])
        port = free_port()
        if mode == "starttls":
            ctl = Controller(handler, hostname="127.0.0.1", port=port, tls_context=ctx, require_starttls=True,
                             server_hostname="mx.certproxy.test")
        else:
            ctl = Controller(handler, hostname="127.0.0.1", port=port, ssl_context=ctx,
                             server_hostname="mx.certproxy.test")
        ctl.start()
        started.append(ctl)
        ctl.recorder = handler
        ctl.endpoint = f"127.0.0.1:{port}"
        return ctl

    yield start
    for ctl in started:
        ctl.stop()


@dataclass
class Scripted:
    """A hand-written upstream: ``script(reader, writer, log)`` plays the server; ``log`` records every byte received."""

    port: int
    received: bytearray
    server: asyncio.base_events.Server

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
async def scripted_upstream():
    servers = []

    async def start(script, ssl: ssl.SSLContext | None = None) -> Scripted:
        """``ssl``: an implicit-TLS upstream with this server context."""
        received = bytearray()

        async def handle(reader, writer):
            try:
                await script(reader, writer, received)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ssl)
        s = Scripted(server.sockets[0].getsockname()[1], received, server)
        servers.append(server)
        return s

    yield start
    for s in servers:
        s.close()
        await s.wait_closed()


SERVER_MODES = {"tls": certproxy.TLSMode.IMPLICIT, "starttls": certproxy.TLSMode.STARTTLS,
                "both": certproxy.TLSMode.EITHER}


@pytest.fixture
async def server_service(certs):
    """Factory: an in-process certproxy server service on a free port (``mode``: tls, starttls or
    both); ``allow`` defaults to the laptop's certificate. Stopped after the test."""
    services = []

    async def start(mode: str, backend: str | None, *, allow=None, **kw) -> certproxy.ServerService:
        cfg = certproxy.ServerConfig(
            listen=certproxy.Endpoint(host="127.0.0.1", port=0),
            backend=backend and certproxy.Endpoint.parse(backend, "--backend"), mode=SERVER_MODES[mode],
            cert=str(certs.server.cert), key=str(certs.server.key),
            allow=tuple(str(a) for a in (allow if allow is not None else [certs.client.cert])),
            hostname="mx.certproxy.test", **kw)
        svc = certproxy.ServerService(cfg)
        await svc.start()
        services.append(svc)
        return svc

    yield start
    for s in services:
        await s.stop()


@pytest.fixture
async def sink():
    """Factory: certproxy's sink MTA as a recording backend (``proxy``: it expects a PROXY v1 header)."""
    sinks = []

    async def start(name: str, keywords=("8BITMIME",), proxy=False) -> certproxy._SinkMTA:
        s = certproxy._SinkMTA(name, keywords, proxy)
        await s.start()
        s.endpoint = f"127.0.0.1:{s.port}"
        sinks.append(s)
        return s

    yield start
    for s in sinks:
        await s.stop()


@pytest.fixture
def sink_mta():
    """certproxy's sink MTA for tests whose certproxy runs as a process: an asyncio server in a thread of its own."""
    import threading

    loop = asyncio.new_event_loop()
    sink = certproxy._SinkMTA("backend.test")
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    asyncio.run_coroutine_threadsafe(sink.start(), loop).result(10)
    yield sink
    asyncio.run_coroutine_threadsafe(sink.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)
    loop.close()


def client_ctx(certs, pair=None) -> ssl.SSLContext:
    """A client context that accepts any server and presents ``pair`` when given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if pair is not None:
        ctx.load_cert_chain(pair.cert, pair.key)
    return ctx


@pytest.fixture
async def client_service(certs):
    """Factory: an in-process certproxy client service on a free port; stopped after the test."""
    services = []

    async def start(*upstreams: str, pins=None, mode=None, **kw) -> certproxy.ClientService:
        ups = []
        for u in upstreams:
            ep = certproxy.Endpoint.parse(u, "--upstream")
            ups.append(certproxy.Upstream(endpoint=ep, mode=certproxy.upstream_mode(ep, mode == "starttls", mode == "tls")))
        cfg = certproxy.ClientConfig(
            listen=certproxy.Endpoint(host="127.0.0.1", port=0),
            upstreams=tuple(ups),
            cert=str(certs.client.cert),
            key=str(certs.client.key),
            pins=certproxy.Pins.parse(pins if pins is not None else [certs.server.fp], "--pin"),
            **kw,
        )
        svc = certproxy.ClientService(cfg)
        await svc.start()
        services.append(svc)
        return svc

    yield start
    for svc in services:
        await svc.stop()


async def read_reply(reader: asyncio.StreamReader, timeout: float = 20) -> bytes:
    """One complete SMTP reply (all lines), as bytes."""
    out = b""
    async with asyncio.timeout(timeout):
        while True:
            line = await reader.readline()
            out += line
            if not line or line[3:4] != b"-":
                return out


def require_peers() -> bool:
    return os.environ.get("CERTPROXY_REQUIRE_PEERS") == "1"



if os.environ.get("CERTPROXY_LOOP") == "uvloop":

    def pytest_asyncio_loop_factories(config, item):
        """CERTPROXY_LOOP=uvloop runs the suite on uvloop (what production uses when installed); CI runs both."""
        import uvloop

        return {"uvloop": uvloop.new_event_loop}


async def session_line(caplog, index: int = -1, count: int = 1, timeout: float = 10) -> str:
    """The session log line at ``index`` once at least ``count`` have been logged (they come at session end)."""
    async with asyncio.timeout(timeout):
        while True:
            lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("session ")]
            if len(lines) >= count:
                return lines[index]
            await asyncio.sleep(0.02)


@pytest.fixture(autouse=True)
def no_asyncio_errors(caplog):
    """A task that died with an unretrieved exception, or a transport error asyncio had to log, is a
    bug even when the test's own assertions pass."""
    import gc

    yield
    gc.collect()
    errors = [r.getMessage() for r in caplog.get_records("call") + caplog.get_records("teardown")
              if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert not errors, errors
