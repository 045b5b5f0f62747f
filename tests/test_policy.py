"""The policy matrix: every way an operator can combine TLS (implicit, mandatory STARTTLS, optional
STARTTLS) with client certificates (required, optional, none), driven by a real client (swaks) against
two recording backends. Each session lands on the right backend or is refused, and what the backend
receives is byte for byte what the client sent in its session (no EHLO lost or doubled)."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess

import pytest

import certproxy
from conftest import session_line
from realpeers import require_tool

# cell: (listener, --client-cert, --starttls-optional) → {client: where it lands}
CELLS = {
    "implicit/none": ("tls", "none", False, {"tls": "untrusted", "tls+cert": "untrusted"}),
    "implicit/optional": ("tls", "optional", False, {"tls": "untrusted", "tls+cert": "trusted"}),
    "implicit/required": ("tls", "required", False, {"tls": "refused", "tls+cert": "trusted"}),
    "starttls-optional/none": ("starttls", "none", True,
                               {"plain": "untrusted", "tls": "untrusted", "tls+cert": "untrusted"}),
    "starttls-optional/optional": ("starttls", "optional", True,
                                   {"plain": "untrusted", "tls": "untrusted", "tls+cert": "trusted"}),
    "starttls/none": ("starttls", "none", False, {"plain": "refused", "tls": "untrusted", "tls+cert": "untrusted"}),
    "starttls/optional": ("starttls", "optional", False,
                          {"plain": "refused", "tls": "untrusted", "tls+cert": "trusted"}),
    "starttls/required": ("starttls", "required", False, {"plain": "refused", "tls": "refused", "tls+cert": "trusted"}),
}


def swaks(port: int, listener: str, client: str, certs) -> subprocess.CompletedProcess:
    args = ["swaks", "--server", f"127.0.0.1:{port}", "--ehlo", "laptop.test", "--from", "a@laptop.test",
            "--to", "b@example.net", "--body", f"policy test, {client} client", "--timeout", "30"]
    if client != "plain":
        args.append("-tlsc" if listener == "tls" else "-tls")
    if client == "tls+cert":
        args += ["--tls-cert", str(certs.client.cert), "--tls-key", str(certs.client.key)]
    return subprocess.run(args, capture_output=True, text=True, timeout=90)


def sent_in_session(transcript: str, tls: bool) -> bytes:
    """What swaks sent on the connection the backend should see: its lines inside TLS (`~>`), or all of
    them for a client that stayed in clear (`->`)."""
    mark = "~>" if tls else "->"
    return b"".join(m.group(1).encode() + b"\r\n"
                    for m in re.finditer(rf"^ {mark} (.*)$", transcript, re.MULTILINE))


@pytest.fixture
async def backends():
    sinks = [certproxy._SinkMTA("trusted.test", proxy=True), certproxy._SinkMTA("untrusted.test", proxy=True)]
    for s in sinks:
        await s.start()
    yield {"trusted": sinks[0], "untrusted": sinks[1]}
    for s in sinks:
        await s.stop()


@pytest.mark.parametrize("cell", list(CELLS))
async def test_policy_cell(cell, certs, backends, caplog):
    require_tool("swaks")
    caplog.set_level(logging.INFO, "certproxy")
    listener, client_cert, optional, expect = CELLS[cell]
    trusted, untrusted = backends["trusted"], backends["untrusted"]
    kw = {} if client_cert == "none" else {"backend": certproxy.Endpoint(host="127.0.0.1", port=trusted.port),
                                           "allow": (str(certs.client.cert),)}
    if client_cert != "required":
        kw["untrusted_backend"] = certproxy.Endpoint(host="127.0.0.1", port=untrusted.port)
    cfg = certproxy.ServerConfig(
        listen=certproxy.Endpoint(host="127.0.0.1", port=0), backend=kw.pop("backend", None),
        mode=certproxy.TLSMode.IMPLICIT if listener == "tls" else certproxy.TLSMode.STARTTLS,
        cert=str(certs.server.cert), key=str(certs.server.key), hostname="mx.certproxy.test",
        client_cert=client_cert, starttls_optional=optional, proxy_protocol="v1", **kw)
    svc = certproxy.ServerService(cfg)
    await svc.start()
    try:
        for n, (client, lands) in enumerate(expect.items()):
            for b in (trusted, untrusted):
                b.received, b.connections, b.proxied = bytearray(), 0, []
            r = await asyncio.to_thread(swaks, svc.port, listener, client, certs)
            line = await session_line(caplog, count=n + 1)
            if lands == "refused":
                assert r.returncode != 0, r.stdout
                assert trusted.connections == untrusted.connections == 0
                assert "outcome=refused" in line, line
                continue
            assert r.returncode == 0, f"{client}: {r.stdout}{r.stderr}"
            got, other = (trusted, untrusted) if lands == "trusted" else (untrusted, trusted)
            assert got.connections == 1 and other.connections == 0, (client, lands)
            assert got.proxied[0].startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
            assert bytes(got.received) == sent_in_session(r.stdout, tls=client != "plain"), (client, r.stdout)
            tls = "none" if client == "plain" else ("implicit" if listener == "tls" else "starttls")
            cert = "allowed" if lands == "trusted" else "none"
            assert f"tls={tls} " in line and f"cert={cert} " in line and f"backend=127.0.0.1:{got.port}" in line, line
    finally:
        await svc.stop()


class TestPolicyConfig:
    def base(self, **kw):
        d = dict(listen=certproxy.Endpoint(host="127.0.0.1", port=0), mode=certproxy.TLSMode.STARTTLS, cert="x",
                 backend=certproxy.Endpoint(host="127.0.0.1", port=25), allow=("x",))
        d.update(kw)
        return certproxy.ServerConfig(**d)

    @pytest.mark.parametrize("kw, option", [
        (dict(starttls_optional=True), "--starttls-optional"),  # required certs, yet clients in clear
        (dict(starttls_optional=True, mode=certproxy.TLSMode.IMPLICIT, client_cert="optional"), "--starttls-optional"),
        (dict(client_cert="none"), "--untrusted-backend"),
        (dict(client_cert="none", untrusted_backend=certproxy.Endpoint(host="127.0.0.1", port=26), xclient=True),
         "--backend"),  # nobody proves anything: nobody may reach the trusted port
        (dict(client_cert="none", backend=None, untrusted_backend=certproxy.Endpoint(host="127.0.0.1", port=26),
              xclient=True), "--allow"),
        (dict(backend=None), "--backend"),
    ])
    def test_unsafe_combinations_are_refused(self, kw, option):
        with pytest.raises(certproxy.ConfigError) as e:
            self.base(**kw)
        assert e.value.option == option, e.value


class TestHandoverDialogue:
    """The gate's side of --starttls-optional, without sockets."""

    def test_mail_command_hands_over_with_last_ehlo(self):
        gate = certproxy.SMTPGate("mx", optional=True)
        out = gate.receive_data(b"EHLO one\r\nEHLO two\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
        assert out == b"250-mx\r\n250 STARTTLS\r\n" * 2
        assert gate.state.value == "handover"
        assert gate.helo == b"EHLO two\r\n" and gate.pending == b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"

    def test_starttls_still_refuses_pipelined_bytes(self):
        gate = certproxy.SMTPGate("mx", optional=True)
        gate.receive_data(b"EHLO x\r\n")
        with pytest.raises(certproxy.ProtocolError):
            gate.receive_data(b"STARTTLS\r\nMAIL FROM:<a@b>\r\n")

    def test_without_optional_mail_needs_starttls(self):
        gate = certproxy.SMTPGate("mx")
        assert gate.receive_data(b"MAIL FROM:<a@b>\r\n").startswith(b"530 5.7.0")
        assert gate.state.value == "open"
