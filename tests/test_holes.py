"""Holes the outside audits found (issue 13), each with the scenario that shows it closed: log lines a
peer cannot forge, replies that survive a half-close, PROXY headers from outside --proxy-from treated
as a stranger's bytes, IPv6 clients counted per network, and refused clients that do not hold a slot."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

import pytest

import certproxy
from conftest import client_ctx, read_reply, session_line
from test_server import tls_open


def one_line(line: str) -> None:
    """Nothing a peer sent can end a log line or hide in one."""
    assert not any(c in line for c in "\r\n\x1b\x85\u2028\u2029"), repr(line)


class TestLogLinesCannotBeForged:
    async def test_command_with_control_characters(self, server_service, sink, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        backend = await sink("b")
        svc = await server_service("starttls", backend.endpoint)
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        await read_reply(reader)
        writer.write("MA\x1b[31mIL\x85\u2028FAKE session id=1 outcome=ok\r\n".encode("utf-8"))
        assert (await read_reply(reader)).startswith(b"530 ")
        writer.write(b"QUIT\r\n")
        await read_reply(reader)
        writer.close()
        line = await session_line(caplog)
        one_line(line)
        # The gate reads commands as latin-1: ESC, the NEL's and U+2028's UTF-8 bytes come out escaped.
        assert "\\x1b[31M" in line and "\\x85" in line and "\\x80" in line, line

    async def test_certificate_subject_with_a_line_break(self, certs, server_service, sink, caplog, tmp_path):
        caplog.set_level(logging.INFO, "certproxy")
        cert, key = certproxy.make_certificate("evil\nsession id=99 outcome=ok\x1b", usage="client")
        (tmp_path / "evil.pem").write_bytes(cert)
        (tmp_path / "evil.key").write_bytes(key)
        backend = await sink("b")
        svc = await server_service("tls", backend.endpoint)
        pair = type(certs.client)(tmp_path / "evil.pem", tmp_path / "evil.key")
        reader, writer, greeting = await tls_open(svc.port, "tls", client_ctx(certs, pair))
        assert greeting.startswith(b"554 5.7.1 ")
        writer.close()
        line = await session_line(caplog)
        one_line(line)
        assert "cert=refused" in line and "\\x0a" in line and "\\x1b" in line, line

    def test_json_lines_escape_too(self):
        import json

        record = logging.LogRecord("certproxy", logging.INFO, __file__, 1, "x", (), None)
        record.event, record.facts = "session", {"reason": "a\nb\x1b\u2028"}
        out = certproxy._JsonFormatter().format(record)
        one_line(out)
        assert json.loads(out)["reason"] == "a\nb\x1b\u2028"


class TestHalfClose:
    """A client that sends its whole transaction and QUIT, then half-closes, receives every reply: were
    the `250 queued` lost, it would send the message again."""

    TRANSACTION = b"EHLO laptop.test\r\nMAIL FROM:<a@laptop.test>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
    BODY = b"Subject: half-close\r\n\r\nsent, then half-closed\r\n.\r\nQUIT\r\n"

    async def test_through_the_client_end(self, certs, client_service, server_service, sink):
        backend = await sink("backend.test")
        srv = await server_service("tls", backend.endpoint)
        cli = await client_service(f"127.0.0.1:{srv.port}", mode="tls", server_name="localhost")

        def mua() -> bytes:
            with socket.create_connection(("127.0.0.1", cli.port), timeout=20) as s:
                got = s.recv(4096)
                s.sendall(self.TRANSACTION)
                while b"354" not in got:
                    got += s.recv(4096)
                s.sendall(self.BODY)
                s.shutdown(socket.SHUT_WR)
                while chunk := s.recv(4096):
                    got += chunk
                return got

        got = await asyncio.to_thread(mua)
        assert b"250 2.0.0 Ok: queued" in got and got.rstrip().endswith(b"221 2.0.0 Bye"), got
        assert len(backend.messages) == 1

    @pytest.mark.parametrize("mode", ["tls", "starttls"])
    async def test_at_the_server_end(self, certs, server_service, sink, mode):
        backend = await sink("backend.test")
        srv = await server_service(mode, backend.endpoint)
        ctx = client_ctx(certs, certs.client)

        def laptop() -> bytes:
            raw = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
            if mode == "starttls":
                f = raw.makefile("rb")
                f.readline()
                raw.sendall(b"EHLO l\r\n")
                while f.readline()[3:4] == b"-":
                    pass
                raw.sendall(b"STARTTLS\r\n")
                f.readline()
                f.close()
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                got = s.recv(4096) if mode == "tls" else b""
                s.sendall(self.TRANSACTION)
                while b"354" not in got:
                    got += s.recv(4096)
                s.sendall(self.BODY)
                socket.socket.shutdown(s, socket.SHUT_WR)  # TCP half-close under TLS (SSLSocket's would unwrap)
                try:
                    while chunk := s.recv(4096):
                        got += chunk
                except (ssl.SSLEOFError, ConnectionResetError):
                    pass
                return got

        got = await asyncio.to_thread(laptop)
        assert b"250 2.0.0 Ok: queued" in got and b"221 2.0.0 Bye" in got, got
        assert len(backend.messages) == 1


class TestProxyHeaderFromOutside:
    """A PROXY header from an address outside --proxy-from is a stranger's bytes: never believed, and
    the MTA is told the real address."""

    @staticmethod
    async def start(mode, server_service, sink, caplog):
        """A server that takes PROXY headers from 10.0.0.0/8 only, and a client on 127.0.0.1 sending one."""
        caplog.set_level(logging.INFO, "certproxy")
        backend = await sink("backend.test", proxy=True)
        svc = await server_service(mode, backend.endpoint, proxy_protocol="v1",
                                   proxy_from=(certproxy.ipaddress.ip_network("10.0.0.0/8"),))
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(b"PROXY TCP4 203.0.113.9 127.0.0.1 4444 25\r\n")
        return backend, reader, writer

    async def test_starttls_port(self, certs, server_service, sink, caplog):
        backend, reader, writer = await self.start("starttls", server_service, sink, caplog)
        assert (await read_reply(reader)).startswith(b"220 ")
        assert (await read_reply(reader)).startswith(b"530 5.7.0")  # a command in clear, refused
        writer.write(b"EHLO laptop.test\r\n")
        await read_reply(reader)
        writer.write(b"STARTTLS\r\n")
        assert (await read_reply(reader)).startswith(b"220 ")
        await writer.start_tls(client_ctx(certs, certs.client), server_hostname="localhost")
        writer.write(b"EHLO laptop.test\r\n")
        assert (await read_reply(reader)).startswith(b"250")
        writer.write(b"QUIT\r\n")
        await read_reply(reader)
        writer.close()
        line = await session_line(caplog)
        assert backend.proxied and backend.proxied[0].startswith(b"PROXY TCP4 127.0.0.1 "), backend.proxied
        assert b"203.0.113.9" not in b"".join(backend.proxied) + bytes(backend.received)
        assert "via=" not in line and "peer=127.0.0.1:" in line, line

    async def test_implicit_tls_port(self, certs, server_service, sink, caplog):
        backend, reader, writer = await self.start("tls", server_service, sink, caplog)
        answer = await reader.read()  # a TLS alert at most, then the end
        writer.close()
        assert b"220" not in answer and not answer.startswith(b"PROXY"), answer
        line = await session_line(caplog)
        assert "TLS handshake failed" in line and "outcome=failed" in line, line
        assert backend.connections == 0


class TestPerAddressLimits:
    @pytest.mark.parametrize("ip, key", [
        ("192.0.2.1", "192.0.2.1"), ("::ffff:192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"), ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64")])
    def test_ipv6_clients_count_per_64(self, ip, key):
        assert certproxy._client_network(ip, 64) == key

    def test_prefix_length_is_checked(self):
        with pytest.raises(certproxy.ConfigError, match="--ipv6-prefix-length"):
            certproxy.server_config_from_args(certproxy._build_parser().parse_args(
                ["server", "--tls", "--cert", "c", "--backend", "127.0.0.1:25", "--allow", "a",
                 "--ipv6-prefix-length", "129"]))

    async def test_a_refused_client_does_not_hold_a_slot(self, certs, server_service, sink, caplog, monkeypatch):
        """Told 554, a client that neither quits nor asks again is closed within seconds, not minutes."""
        caplog.set_level(logging.INFO, "certproxy")
        monkeypatch.setattr(certproxy, "REFUSAL_LINGER_S", 0.5)
        backend = await sink("b")
        svc = await server_service("tls", backend.endpoint)
        reader, writer, greeting = await tls_open(svc.port, "tls", client_ctx(certs, certs.other_client))
        assert greeting == b"554 5.7.1 certificate not authorised\r\n"
        async with asyncio.timeout(6):  # 0.5 s, then the 2 s goodbye linger
            assert await reader.read() == b""
        writer.close()
        line = await session_line(caplog)
        assert "outcome=refused" in line, line


class TestHappyEyeballs:
    """An upstream name with several addresses is tried address by address (RFC 8305): a dead first
    address costs 250 ms, not the whole connect timeout."""

    async def test_a_dead_first_address_does_not_cost_the_connect_timeout(self, certs, client_service,
                                                                          aiosmtpd_upstream, monkeypatch, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        up = aiosmtpd_upstream("tls")
        port = int(up.endpoint.rsplit(":", 1)[1])
        # A listener whose accept queue is full: a connect to it hangs (its SYN is dropped), as to a
        # dead IPv6 route.
        full = socket.create_server(("127.0.0.2", 0), backlog=0)
        fillers = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(full.getsockname())
            fillers.append(s)

        async def resolve(host, p):
            assert host == "mx.dual.test"
            return [(socket.AF_INET, full.getsockname()), (socket.AF_INET, ("127.0.0.1", port))]

        monkeypatch.setattr(certproxy, "_resolve", resolve)
        cli = await client_service(f"mx.dual.test:{port}", mode="tls", server_name="localhost",
                                   timeouts=certproxy.Timeouts(connect=30))
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
            async with asyncio.timeout(10):  # far less than the 30 s connect timeout of the dead address
                assert (await read_reply(reader)).startswith(b"220 ")
            writer.write(b"QUIT\r\n")
            assert (await read_reply(reader)).startswith(b"221")
            writer.close()
            assert "outcome=ok" in await session_line(caplog)
        finally:
            for s in fillers:
                s.close()
            full.close()

    async def test_addresses_alternate_between_families(self, monkeypatch):
        infos = [(socket.AF_INET6, 1, 6, "", ("2001:db8::1", 25, 0, 0)), (socket.AF_INET6, 1, 6, "", ("2001:db8::2", 25, 0, 0)),
                 (socket.AF_INET, 1, 6, "", ("192.0.2.1", 25)), (socket.AF_INET, 1, 6, "", ("192.0.2.2", 25))]

        class Loop:
            async def getaddrinfo(self, host, port, type):
                return infos

        monkeypatch.setattr(certproxy.asyncio, "get_running_loop", lambda: Loop())
        got = await certproxy._resolve("mx.example.org", 25)
        assert [a[1][0] for a in got] == ["2001:db8::1", "192.0.2.1", "2001:db8::2", "192.0.2.2"]
