"""certproxy server's front door and back door: who the MTA is told the client is (XCLIENT, PROXY
protocol), PROXY headers from a load balancer, clients without an allowed certificate routed to an
untrusted backend, and implicit TLS plus STARTTLS on one port."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

import pytest

import certproxy
from certproxy import parse_proxy_header, proxy_header, xclient_command, xtext
from conftest import client_ctx, read_reply, session_line
from test_server import smtplib_send, tls_open

async def xclient_mta(reader, writer, received, *, offer="XCLIENT NAME ADDR PORT LOGIN", answer=b"220 after.xclient ESMTP\r\n"):
    """A backend that speaks XCLIENT the way Postfix does: a new greeting after it."""
    writer.write(b"220 before.xclient ESMTP\r\n")
    while line := await reader.readline():
        received += line
        verb = line.split(b" ", 1)[0].strip().upper()
        if verb == b"EHLO":
            writer.write(b"250-before.xclient\r\n" + (f"250-{offer}\r\n".encode() if offer else b"") + b"250 8BITMIME\r\n")
        elif verb == b"XCLIENT":
            writer.write(answer)
        elif verb == b"QUIT":
            writer.write(b"221 bye\r\n")
            break
        else:
            writer.write(b"250 ok\r\n")
        await writer.drain()


class TestWireFormats:
    def test_proxy_v1(self):
        assert proxy_header("v1", ("203.0.113.7", 40000), ("192.0.2.1", 465)) == \
            b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 465\r\n"
        assert proxy_header("v1", ("2001:db8::7", 40000), ("2001:db8::1", 465)) == \
            b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 465\r\n"
        # an IPv4 client on a dual-stack socket is said as IPv4
        assert proxy_header("v1", ("::ffff:203.0.113.7", 1), ("192.0.2.1", 2)) == b"PROXY TCP4 203.0.113.7 192.0.2.1 1 2\r\n"

    def test_proxy_v2_layout(self):
        h = proxy_header("v2", ("203.0.113.7", 40000), ("192.0.2.1", 465))
        assert h[:12] == b"\r\n\r\n\x00\r\nQUIT\n" and h[12] == 0x21 and h[13] == 0x11
        assert int.from_bytes(h[14:16], "big") == 12 == len(h) - 16
        assert h[16:20] == ipaddress.ip_address("203.0.113.7").packed and h[24:26] == (40000).to_bytes(2, "big")

    @pytest.mark.parametrize("version", ["v1", "v2"])
    @pytest.mark.parametrize("src,dst", [(("203.0.113.7", 40000), ("192.0.2.1", 465)),
                                         (("2001:db8::7", 1), ("2001:db8::1", 65535))])
    def test_round_trip_and_partial(self, version, src, dst):
        h = proxy_header(version, src, dst)
        assert parse_proxy_header(h + b"EHLO x\r\n") == (len(h), src, dst)
        for cut in range(len(h)):
            assert parse_proxy_header(h[:cut]) is None, cut  # more bytes needed, never a wrong answer

    @pytest.mark.parametrize("data", [b"EHLO x\r\n", b"\x16\x03\x01\x00", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
                                      b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
                                      b"PROXY " + b"x" * 200, b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + bytes(12)])
    def test_garbage_is_refused(self, data):
        with pytest.raises(ValueError):
            parse_proxy_header(data)

    def test_local_and_unknown_carry_no_address(self):
        assert parse_proxy_header(b"PROXY UNKNOWN\r\n") == (15, None, None)
        assert parse_proxy_header(b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00") == (16, None, None)

    def test_xtext_encodes_plus_and_equals_in_a_name(self):
        # RFC 3461 xtext: '+' and '=' are hex-encoded, so a name such as alice+laptop reaches the MTA intact.
        assert xtext("alice+laptop=1") == "alice+2Blaptop+3D1"

    def test_xclient(self):
        assert xtext("al ice+=x") == "al+20ice+2B+3Dx"
        assert xclient_command({"ADDR", "PORT", "NAME", "LOGIN"}, ("203.0.113.7", 4000), "alice") == \
            b"XCLIENT ADDR=203.0.113.7 PORT=4000 NAME=[UNAVAILABLE] LOGIN=alice\r\n"
        assert xclient_command({"ADDR"}, ("2001:db8::7", 4000), "alice") == b"XCLIENT ADDR=IPV6:2001:db8::7\r\n"

    def test_named_fingerprints(self, certs):
        pins = certproxy.Pins.parse([f"{certs.client.fp} alice", certs.other_client.fp], "--allow-fingerprint", named=True)
        assert pins.name_of(certs.client.der) == "alice"
        assert pins.name_of(certs.other_client.der) is None
        with pytest.raises(certproxy.ConfigError, match="--allow-fingerprint.*usable name"):
            certproxy.Pins.parse([f"{certs.client.fp} al/ice"], "--allow-fingerprint", named=True)
        with pytest.raises(certproxy.ConfigError, match="--allow-fingerprint.*not a SHA-256"):
            certproxy.Pins.parse(["abcd alice"], "--allow-fingerprint", named=True)
        assert certproxy.Pins.parse([f"{certs.client.fp}\talice"], "x", named=True).name_of(certs.client.der) == "alice"
        with pytest.raises(certproxy.ConfigError, match="--pin.*only meaningful in --allow-fingerprint"):
            certproxy.Pins.parse([f"{certs.client.fp} alice"], "--pin")

    @pytest.mark.parametrize("line", [
        b"PROXY TCP6 fe80::1%a\nQUIT 2001:db8::1 10 25\r\n",  # a scope id carrying a line feed
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 25\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 25\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 010 25\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + b" " * 200 + b"\r\n",  # over the 107-byte maximum
    ])
    def test_proxy_v1_is_strict(self, line):
        with pytest.raises(ValueError):
            parse_proxy_header(line)

    def test_hide_extensions(self):
        f = certproxy.HideExtensions()
        out = f.feed(b"250-mx\r\n250-XCLIENT NAME ADDR\r\n250-STARTTLS\r\n250-XFORWARD NAME\r\n250 8BITMIME\r\n")
        assert out == b"250-mx\r\n250 8BITMIME\r\n"


class TestXClient:
    @pytest.mark.parametrize("mode", ["tls", "starttls"])
    async def test_backend_is_told_address_and_name(self, certs, server_service, scripted_upstream, mode, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        mta = await scripted_upstream(xclient_mta)
        svc = await server_service(mode, mta.endpoint, xclient=True,
                            allow_fingerprints=certproxy.Pins.parse([f"{certs.client.fp} alice"], "x", named=True))
        reader, writer, greeting = await tls_open(svc.port, mode, client_ctx(certs, certs.client))
        if mode == "tls":
            assert greeting == b"220 after.xclient ESMTP\r\n"  # the greeting after XCLIENT is the client's
        writer.write(b"EHLO laptop.test\r\n")
        ehlo = await read_reply(reader)
        assert b"XCLIENT" not in ehlo and b"8BITMIME" in ehlo  # XCLIENT is for certproxy, not for clients
        writer.close()
        line = await session_line(caplog)
        port = int(line.split("peer=127.0.0.1:")[1].split()[0])
        sent = bytes(mta.received).split(b"\r\n")
        assert sent[0] == b"EHLO mx.certproxy.test"
        assert sent[1] == f"XCLIENT ADDR=127.0.0.1 PORT={port} NAME=[UNAVAILABLE] LOGIN=alice".encode()
        assert sent[2] == b"EHLO laptop.test"
        assert "cert_name=alice" in line and "outcome=ok" in line

    async def test_name_defaults_to_common_name(self, certs, server_service, scripted_upstream, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        mta = await scripted_upstream(xclient_mta)
        svc = await server_service("tls", mta.endpoint, xclient=True)
        reader, writer, greeting = await tls_open(svc.port, "tls", client_ctx(certs, certs.client))
        assert greeting == b"220 after.xclient ESMTP\r\n"
        writer.close()
        line = await session_line(caplog)
        assert "cert_name=laptop" in line, line
        assert b" LOGIN=laptop\r\n" in mta.received

    @pytest.mark.parametrize("offer,answer,expect", [
        ("", b"", "does not offer XCLIENT"),
        ("XCLIENT NAME ADDR", b"550 5.7.0 Error: insufficient authorization\r\n", "refused XCLIENT: 550"),
    ])
    async def test_backend_without_xclient_fails_closed(self, certs, server_service, scripted_upstream, offer, answer,
                                                        expect, caplog):
        async def mta(r, w, rec):
            await xclient_mta(r, w, rec, offer=offer, answer=answer)

        backend = await scripted_upstream(mta)
        svc = await server_service("tls", backend.endpoint, xclient=True)
        reader, writer, greeting = await tls_open(svc.port, "tls", client_ctx(certs, certs.client))
        assert greeting.startswith(b"421 4.3.0 ")
        line = await session_line(caplog)
        assert expect in line and "outcome=failed" in line, line
        writer.close()


class TestProxyProtocolOut:
    @pytest.mark.parametrize("version", ["v1", "v2"])
    async def test_header_precedes_everything(self, certs, server_service, scripted_upstream, version, caplog):
        caplog.set_level(logging.INFO, "certproxy")

        async def mta(reader, writer, received):
            if version == "v1":
                received += await reader.readline()
            else:
                head = await reader.readexactly(16)
                received += head + await reader.readexactly(int.from_bytes(head[14:], "big"))
            writer.write(b"220 mta ESMTP\r\n")
            while line := await reader.readline():
                received += line
                writer.write(b"221 bye\r\n" if line.startswith(b"QUIT") else b"250 ok\r\n")

        backend = await scripted_upstream(mta)
        svc = await server_service("starttls", backend.endpoint, proxy_protocol=version)
        reader, writer, _ = await tls_open(svc.port, "starttls", client_ctx(certs, certs.client))
        local_port = writer.get_extra_info("sockname")[1]
        writer.write(b"QUIT\r\n")
        assert (await read_reply(reader)).startswith(b"221")
        writer.close()
        await session_line(caplog)
        n, src, dst = parse_proxy_header(bytes(backend.received))
        assert src == ("127.0.0.1", local_port) and dst == ("127.0.0.1", svc.port)
        assert bytes(backend.received)[n:] == b"QUIT\r\n"


class TestProxyProtocolIn:
    async def open_via_lb(self, port: int, header: bytes, mode: str, ctx):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(header)
        if mode == "tls":
            await writer.start_tls(ctx, server_hostname="localhost")
            return reader, writer, await read_reply(reader)
        greeting = await read_reply(reader)
        writer.write(b"EHLO laptop.test\r\n")
        await read_reply(reader)
        writer.write(b"STARTTLS\r\n")
        await read_reply(reader)
        await writer.start_tls(ctx, server_hostname="localhost")
        return reader, writer, greeting

    @pytest.mark.parametrize("mode", ["tls", "starttls"])
    @pytest.mark.parametrize("version", ["v1", "v2"])
    async def test_real_client_address_is_used(self, certs, server_service, scripted_upstream, mode, version, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        mta = await scripted_upstream(xclient_mta)
        svc = await server_service(mode, mta.endpoint, xclient=True, proxy_from=(ipaddress.ip_network("127.0.0.0/8"),))
        header = proxy_header(version, ("198.51.100.9", 51515), ("192.0.2.25", 465))
        reader, writer, _ = await self.open_via_lb(svc.port, header, mode, client_ctx(certs, certs.client))
        writer.write(b"NOOP\r\n")
        assert (await read_reply(reader)).startswith(b"250")
        writer.close()
        line = await session_line(caplog)
        assert "peer=198.51.100.9:51515" in line and "via=127.0.0.1:" in line and "outcome=ok" in line, line
        assert b"XCLIENT ADDR=198.51.100.9 PORT=51515 " in mta.received

    async def test_lb_connection_without_header_is_closed(self, certs, server_service, sink, caplog):
        backend = await sink("b")
        svc = await server_service("starttls", backend.endpoint, proxy_from=(ipaddress.ip_network("127.0.0.1/32"),))
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(b"EHLO sneaky.test\r\n")
        try:  # no greeting, nothing: the bytes were not a PROXY header (unread input: a reset is fine)
            assert await reader.read() == b""
        except ConnectionResetError:
            pass
        writer.close()
        line = await session_line(caplog)
        assert "without a valid PROXY header" in line and "outcome=refused" in line, line
        assert backend.connections == 0

    async def test_other_addresses_need_no_header(self, certs, server_service, sink):
        backend = await sink("b")
        svc = await server_service("starttls", backend.endpoint, proxy_from=(ipaddress.ip_network("192.0.2.0/24"),))
        assert await asyncio.to_thread(smtplib_send, svc.port, "starttls", client_ctx(certs, certs.client)) == {}
        assert backend.messages


class TestUntrustedBackend:
    @pytest.fixture
    async def pair(self, sink):
        return await sink("trusted.test", proxy=True), await sink("untrusted.test", proxy=True)

    @pytest.mark.parametrize("mode", ["tls", "starttls"])
    @pytest.mark.parametrize("who,lands,cert", [("client", "trusted", "allowed"), (None, "untrusted", "none")])
    async def test_routing(self, certs, server_service, pair, mode, who, lands, cert, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        trusted, untrusted = pair
        svc = await server_service(mode, trusted.endpoint, client_cert="optional", proxy_protocol="v1",
                            untrusted_backend=certproxy.Endpoint.parse(untrusted.endpoint, "x"))
        ctx = client_ctx(certs, getattr(certs, who) if who else None)
        assert await asyncio.to_thread(smtplib_send, svc.port, mode, ctx) == {}
        got = trusted if lands == "trusted" else untrusted
        other = untrusted if lands == "trusted" else trusted
        assert len(got.messages) == 1 and other.connections == 0
        assert got.proxied[0].startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
        line = await session_line(caplog)
        assert f"cert={cert}" in line and f"backend={got.endpoint}" in line, line

    async def test_ca_certificate_outside_fingerprints_goes_untrusted(self, certs, server_service, pair, tmp_path):
        # A certificate the handshake accepts (an --allow file) but the fingerprint list does not:
        # refused under `required`, routed to the untrusted backend under `optional`.
        trusted, untrusted = pair
        svc = await server_service("tls", trusted.endpoint, client_cert="optional", proxy_protocol="v1",
                            allow=(str(certs.client.cert), str(certs.other_client.cert)),
                            allow_fingerprints=certproxy.Pins.parse([certs.client.fp], "x"),
                            untrusted_backend=certproxy.Endpoint.parse(untrusted.endpoint, "x"))
        assert await asyncio.to_thread(smtplib_send, svc.port, "tls", client_ctx(certs, certs.other_client)) == {}
        assert untrusted.messages and not trusted.connections

    def test_optional_needs_an_untrusted_backend(self, certs):
        with pytest.raises(certproxy.ConfigError, match="--untrusted-backend"):
            certproxy.ServerConfig(listen=certproxy.Endpoint(host="127.0.0.1", port=0),
                                   backend=certproxy.Endpoint(host="127.0.0.1", port=25),
                                   mode=certproxy.TLSMode.IMPLICIT, cert="x", allow=("x",), client_cert="optional")
        with pytest.raises(certproxy.ConfigError, match="--untrusted-backend.*must differ"):
            certproxy.ServerConfig(listen=certproxy.Endpoint(host="127.0.0.1", port=0),
                                   backend=certproxy.Endpoint(host="127.0.0.1", port=25),
                                   untrusted_backend=certproxy.Endpoint(host="127.0.0.1", port=25), xclient=True,
                                   mode=certproxy.TLSMode.IMPLICIT, cert="x", allow=("x",), client_cert="optional")
        with pytest.raises(certproxy.ConfigError, match="--untrusted-backend.*needs --xclient or --proxy-protocol"):
            certproxy.ServerConfig(listen=certproxy.Endpoint(host="127.0.0.1", port=0),
                                   backend=certproxy.Endpoint(host="127.0.0.1", port=25),
                                   untrusted_backend=certproxy.Endpoint(host="127.0.0.1", port=26),
                                   mode=certproxy.TLSMode.IMPLICIT, cert="x", allow=("x",), client_cert="optional")


class TestOnePortBothModes:
    @pytest.mark.parametrize("mode", ["tls", "starttls"])
    async def test_each_client_gets_its_mode(self, certs, server_service, sink, mode, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        backend = await sink("b")
        svc = await server_service("both", backend.endpoint)
        assert await asyncio.to_thread(smtplib_send, svc.port, mode, client_ctx(certs, certs.client)) == {}
        line = await session_line(caplog)
        assert f"tls={'implicit' if mode == 'tls' else mode} " in line and "outcome=ok" in line, line

    async def test_tls_client_is_not_kept_waiting(self, certs, server_service, sink, monkeypatch):
        # With the fallback wait set far beyond read_reply's timeout, a TLS client only gets its
        # greeting if the sniff decides on the ClientHello itself.
        monkeypatch.setattr(certproxy, "DUAL_SNIFF_S", 300.0)
        backend = await sink("b")
        svc = await server_service("both", backend.endpoint)
        reader, writer, greeting = await tls_open(svc.port, "tls", client_ctx(certs, certs.client))
        assert greeting.startswith(b"220 b ")
        writer.close()

    async def test_plaintext_is_never_spliced(self, certs, server_service, sink, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        backend = await sink("b")
        svc = await server_service("both", backend.endpoint)
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        assert (await read_reply(reader)).startswith(b"220 mx.certproxy.test")
        writer.write(b"MAIL FROM:<a@b>\r\n")
        assert (await read_reply(reader)).startswith(b"530 5.7.0")
        writer.close()
        await session_line(caplog)
        assert backend.connections == 0


class TestResetInsideTheProxyHeader:
    """A client on a --proxy-from address that resets the connection half-way through its PROXY header."""

    async def test_reset_before_anything_is_a_closed_session_not_an_error(self, certs, server_service, sink, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        backend = await sink("b")
        svc = await server_service("both", backend.endpoint, proxy_from=(ipaddress.ip_network("127.0.0.1/32"),))
        s = socket.socket()
        s.connect(("127.0.0.1", svc.port))
        s.send(b"PROX")  # half a header, then a reset
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
        line = await session_line(caplog)
        assert "outcome=error" not in line and "internal error" not in caplog.text, line


class TestOptionalStartTLSHandover:
    """--starttls-optional: a client that stays in clear is handed to the untrusted backend exactly as it spoke."""

    async def test_odd_blank_before_ehlo_is_not_taken_for_ehlo(self, certs, server_service, scripted_upstream, caplog):
        """\xa0EHLO is not EHLO: under --starttls-optional it is the client's first unknown command, handed
        to the untrusted backend byte for byte (no replayed greeting, no internal error)."""
        caplog.set_level(logging.INFO, "certproxy")
        mta = await scripted_upstream(xclient_mta)
        svc = await server_service("starttls", None, client_cert="none", starttls_optional=True, xclient=True, allow=(),
                            untrusted_backend=certproxy.Endpoint.parse(mta.endpoint, "x"))
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        await read_reply(reader)
        writer.write(b"\xa0EHLO client.example\r\n")
        await read_reply(reader)
        writer.write(b"QUIT\r\n")
        assert (await read_reply(reader)).startswith(b"221")
        writer.close()
        line = await session_line(caplog)
        assert "internal error" not in line and "backend=" in line, line
        assert bytes(mta.received).endswith(b"\r\n\xa0EHLO client.example\r\nQUIT\r\n")
        assert bytes(mta.received).count(b"EHLO") == 2  # ours before XCLIENT, and the client's own


class TestHandshakeFailureLines:
    async def test_stranger_and_probe_are_told_apart(self, certs, server_service, sink, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        backend = await sink("b")
        svc = await server_service("tls", backend.endpoint)
        # An unknown certificate completes the handshake and is told why in SMTP, its fingerprint logged.
        r, w, greeting = await tls_open(svc.port, "tls", client_ctx(certs, certs.other_client))
        assert greeting == b"554 5.7.1 certificate not authorised\r\n"
        w.close()
        line = await session_line(caplog)
        assert "outcome=refused" in line and f"cert_spki={certs.other_client.spki}" in line, line
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)  # a port probe
        writer.close()
        line = await session_line(caplog, count=2)
        assert "client closed the connection during the TLS handshake" in line and "outcome=failed" in line, line
        assert backend.connections == 0
