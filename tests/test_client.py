"""certproxy client mode against aiosmtpd upstreams and hand-written (malicious) upstreams."""

from __future__ import annotations

import asyncio
import logging
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

import certproxy
from conftest import free_port, read_reply, session_line
from test_server import NEAR_MISSES, near_miss

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = b"From: a@laptop.test\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nhello through certproxy\r\n"


def send(port: int, body: bytes = MESSAGE) -> dict:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("laptop.test")
        return s.sendmail("a@laptop.test", ["b@example.net"], body)


async def local_reply(port: int) -> bytes:
    """Connect as a local client and return the first reply certproxy gives (and that it then closes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        reply = await read_reply(reader)
        rest = await asyncio.wait_for(reader.read(), 20)
        assert rest == b"", f"certproxy kept talking after {reply!r}: {rest!r}"
        return reply
    finally:
        writer.close()


class TestHappyPath:
    @pytest.mark.parametrize("mode", ["starttls", "tls"])
    async def test_message_arrives_with_client_certificate(self, aiosmtpd_upstream, client_service, mode, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        up = aiosmtpd_upstream(mode)
        svc = await client_service(up.endpoint, mode=mode)
        assert await asyncio.to_thread(send, svc.port) == {}
        [msg] = up.recorder.messages
        assert msg.content.replace(b"\r\n", b"\n").endswith(b"hello through certproxy\n")
        assert msg.rcpt_tos == ["b@example.net"]
        subject = dict(x[0] for x in msg.peercert["subject"])
        assert subject["commonName"] == "laptop"
        line = await session_line(caplog)
        for fact in ("outcome=ok", f"upstream={up.endpoint}", f"tls={'implicit' if mode == 'tls' else mode}", "tls_version=TLSv1.3", "cipher=",
                     "server_fp=", "bytes_in=", "bytes_out=", "duration=", "peer=127.0.0.1:"):
            assert fact in line, line

    async def test_starttls_greeting_comes_from_certproxy_and_ehlo_goes_through_tls(self, aiosmtpd_upstream, client_service):
        up = aiosmtpd_upstream("starttls")
        svc = await client_service(up.endpoint)
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        greeting = await read_reply(reader)
        assert greeting.startswith(b"220 ") and b"verified" in greeting
        writer.write(b"EHLO laptop.test\r\n")
        ehlo = await read_reply(reader)
        # The post-TLS capabilities: aiosmtpd no longer offers STARTTLS once inside TLS.
        assert ehlo.startswith(b"250-") and b"STARTTLS" not in ehlo
        writer.write(b"QUIT\r\n")
        assert (await read_reply(reader)).startswith(b"221")
        writer.close()

    @pytest.mark.parametrize("spelling", ["spki", "exim-hex", "sha256-prefix", "openssl-output"])
    async def test_pin_spellings(self, aiosmtpd_upstream, client_service, certs, spelling):
        fp, spki = certs.server.fp, certs.server.spki
        pin = {
            "spki": spki,
            "exim-hex": fp.replace(":", "").lower(),
            "sha256-prefix": "sha256:" + fp,
            "openssl-output": "sha256 Fingerprint=" + fp,
        }[spelling]
        up = aiosmtpd_upstream("starttls")
        svc = await client_service(up.endpoint, pins=[pin])
        assert await asyncio.to_thread(send, svc.port) == {}
        assert len(up.recorder.messages) == 1

    async def test_several_pins_for_rollover(self, aiosmtpd_upstream, client_service, certs):
        up = aiosmtpd_upstream("tls")
        svc = await client_service(up.endpoint, pins=[certs.other_server.fp, certs.server.spki], mode="tls")
        assert await asyncio.to_thread(send, svc.port) == {}

    async def test_ca_and_server_name(self, aiosmtpd_upstream, client_service, certs):
        up = aiosmtpd_upstream("starttls")
        svc = await client_service(up.endpoint, pins=[], ca=str(certs.server.cert), server_name="localhost")
        assert await asyncio.to_thread(send, svc.port) == {}

    async def test_failover_to_second_upstream(self, aiosmtpd_upstream, client_service, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        up = aiosmtpd_upstream("starttls")
        dead = f"127.0.0.1:{free_port()}"
        svc = await client_service(dead, up.endpoint)
        assert await asyncio.to_thread(send, svc.port) == {}
        assert len(up.recorder.messages) == 1
        line = await session_line(caplog)
        assert f"upstream={up.endpoint}" in line and "connection refused" in line

    async def test_large_message_intact(self, aiosmtpd_upstream, client_service):
        up = aiosmtpd_upstream("tls")
        svc = await client_service(up.endpoint, mode="tls")
        body = MESSAGE + b"".join(b"%07d " % i + b"x" * 70 + b"\r\n" for i in range(60_000))  # ~4.6 MB
        assert await asyncio.to_thread(send, svc.port, body) == {}
        [msg] = up.recorder.messages
        assert msg.content.replace(b"\r\n", b"\n").rstrip(b"\n") == body.replace(b"\r\n", b"\n").rstrip(b"\n")


class TestFailuresGive421:
    async def test_pin_mismatch_shows_seen_fingerprint(self, aiosmtpd_upstream, client_service, certs, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        up = aiosmtpd_upstream("starttls", server=certs.other_server)
        svc = await client_service(up.endpoint)
        reply = await local_reply(svc.port)
        assert reply.startswith(b"421 4.7.0 ") and reply.endswith(b"\r\n")
        assert up.recorder.messages == []
        line = await session_line(caplog)
        assert "outcome=refused" in line and f"--pin {certs.other_server.fp}" in line

    @pytest.mark.parametrize("mode", ["starttls", "tls"])
    @pytest.mark.parametrize("miss", list(NEAR_MISSES))
    async def test_near_miss_pin_gives_421_and_the_real_fingerprint(self, aiosmtpd_upstream, client_service, certs,
                                                                      caplog, mode, miss):
        """A --pin sharing the server's first 16 hex digits (or all but the last) is another server's pin."""
        caplog.set_level(logging.INFO, "certproxy")
        which, keep = NEAR_MISSES[miss]
        pin = near_miss(getattr(certs.server, which), keep)
        assert pin[:23] == getattr(certs.server, which)[:23] and pin != getattr(certs.server, which)
        up = aiosmtpd_upstream(mode)
        svc = await client_service(up.endpoint, pins=[pin], mode=mode)
        reply = await local_reply(svc.port)
        assert reply.startswith(b"421 4.7.0 ") and reply.endswith(b"\r\n")
        line = await session_line(caplog)
        assert up.recorder.messages == []
        assert "outcome=refused" in line and f"--pin {certs.server.fp}" in line, line

    @pytest.mark.parametrize("mode", ["starttls", "tls"])
    async def test_unreachable(self, client_service, mode, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        svc = await client_service(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", mode=mode)
        reply = await local_reply(svc.port)
        assert reply.startswith(b"421 4.4.1 ")
        line = await session_line(caplog)
        assert line.count("connection refused") == 2

    async def test_upstream_rejects_our_certificate(self, aiosmtpd_upstream, client_service, certs):
        up = aiosmtpd_upstream("tls", clients=[certs.other_client])
        svc = await client_service(up.endpoint, mode="tls")
        assert (await local_reply(svc.port)).startswith(b"421 4.")

    async def test_ca_with_wrong_name(self, aiosmtpd_upstream, client_service, certs):
        up = aiosmtpd_upstream("starttls")
        svc = await client_service(up.endpoint, pins=[], ca=str(certs.server.cert), server_name="wrong.example")
        assert (await local_reply(svc.port)).startswith(b"421 4.7.0 ")

    async def test_connection_limit(self, aiosmtpd_upstream, client_service):
        up = aiosmtpd_upstream("starttls")
        svc = await client_service(up.endpoint, max_connections=1)
        r1, w1 = await asyncio.open_connection("127.0.0.1", svc.port)
        assert (await read_reply(r1)).startswith(b"220 ")
        assert (await local_reply(svc.port)).startswith(b"421 4.7.0 ")
        w1.write(b"QUIT\r\n")
        assert (await read_reply(r1)).startswith(b"221")
        w1.close()


async def _greet_ehlo(reader, writer, received, ehlo_reply: bytes):
    writer.write(b"220 mx.evil.test ESMTP\r\n")
    line = await reader.readline()
    received += line
    writer.write(ehlo_reply)
    await writer.drain()


async def _drain_rest(reader, received):
    while data := await asyncio.wait_for(reader.read(4096), 20):
        received += data


class TestMaliciousUpstream:
    """Nothing but EHLO, STARTTLS and QUIT may ever cross in clear; the local client always gets a 421."""

    async def _run(self, client_service, scripted_upstream, script, caplog, **kw):
        caplog.set_level(logging.INFO, "certproxy")
        over = asyncio.Event()

        async def upstream(reader, writer, received):
            try:
                await script(reader, writer, received)
            finally:
                over.set()  # the upstream has all it will ever receive (certproxy hung up, or the script ended)

        up = await scripted_upstream(upstream)
        svc = await client_service(up.endpoint, mode="starttls", **kw)
        reply = await local_reply(svc.port)
        line = await session_line(caplog)
        await asyncio.wait_for(over.wait(), 20)
        return reply, bytes(up.received), line

    async def test_no_starttls_advertised(self, client_service, scripted_upstream, caplog):
        async def script(reader, writer, received):
            await _greet_ehlo(reader, writer, received, b"250-mx.evil.test\r\n250-PIPELINING\r\n250 AUTH PLAIN\r\n")
            await _drain_rest(reader, received)

        reply, received, line = await self._run(client_service, scripted_upstream, script, caplog)
        assert reply.startswith(b"421 4.7.0 ")
        assert received == b"EHLO localhost\r\nQUIT\r\n"
        assert "did not advertise STARTTLS" in line

    @pytest.mark.parametrize("answer", [b"454 4.7.0 TLS not available", b"502 5.5.1 no", b"530 5.7.0 nope",
                                        b"421 4.3.2 bye", b"354 go ahead"])
    async def test_starttls_refused(self, client_service, scripted_upstream, caplog, answer):
        async def script(reader, writer, received):
            await _greet_ehlo(reader, writer, received, b"250-mx.evil.test\r\n250 STARTTLS\r\n")
            received += await reader.readline()
            writer.write(answer + b"\r\n")
            await _drain_rest(reader, received)

        reply, received, line = await self._run(client_service, scripted_upstream, script, caplog)
        assert reply.startswith(b"421 4.7.0 ")
        assert received == b"EHLO localhost\r\nSTARTTLS\r\nQUIT\r\n"
        assert f"answered STARTTLS with {answer[:3].decode()}" in line

    @pytest.mark.parametrize("tail", [b"250 fake reply\r\n", b"250 no final crlf", b"\r\n"])
    async def test_response_injection_after_220(self, client_service, scripted_upstream, caplog, tail):
        async def script(reader, writer, received):
            await _greet_ehlo(reader, writer, received, b"250-mx.evil.test\r\n250 STARTTLS\r\n")
            received += await reader.readline()
            writer.write(b"220 2.0.0 go ahead\r\n" + tail)  # one segment
            await _drain_rest(reader, received)

        reply, received, line = await self._run(client_service, scripted_upstream, script, caplog)
        assert reply.startswith(b"421 4.7.0 ")
        assert received == b"EHLO localhost\r\nSTARTTLS\r\nQUIT\r\n"
        assert "injection" in line

    async def test_fake_220_then_plaintext(self, client_service, scripted_upstream, caplog):
        async def script(reader, writer, received):
            await _greet_ehlo(reader, writer, received, b"250-mx.evil.test\r\n250 STARTTLS\r\n")
            received += await reader.readline()
            writer.write(b"220 2.0.0 go ahead\r\n")
            await writer.drain()
            await asyncio.sleep(0.2)  # the scenario: a second segment, once certproxy has acted on the 220
            writer.write(b"250-mx.evil.test\r\n250 AUTH PLAIN\r\n")  # plaintext where a TLS record belongs
            await _drain_rest(reader, received)

        reply, received, line = await self._run(client_service, scripted_upstream, script, caplog)
        assert reply.startswith(b"421 4.7.0 ")
        # After the 220 only a TLS ClientHello may follow (record type 0x16), never SMTP in clear.
        assert received.startswith(b"EHLO localhost\r\nSTARTTLS\r\n")
        rest = received[len(b"EHLO localhost\r\nSTARTTLS\r\n"):]
        assert rest[:1] == b"\x16" and b"MAIL" not in rest and b"EHLO" not in rest

    async def test_greeting_not_220(self, client_service, scripted_upstream, caplog):
        async def script(reader, writer, received):
            writer.write(b"554 5.3.2 go away\r\n")
            await _drain_rest(reader, received)

        reply, received, line = await self._run(client_service, scripted_upstream, script, caplog)
        assert reply.startswith(b"421 4.3.0 ")
        assert received == b"QUIT\r\n"

    async def test_helo_only_server(self, client_service, scripted_upstream, caplog):
        async def script(reader, writer, received):
            await _greet_ehlo(reader, writer, received, b"502 5.5.1 EHLO not implemented\r\n")
            await _drain_rest(reader, received)

        reply, received, _ = await self._run(client_service, scripted_upstream, script, caplog)
        assert reply.startswith(b"421 4.7.0 ")
        assert received == b"EHLO localhost\r\nQUIT\r\n"

    async def test_silent_upstream_times_out(self, client_service, scripted_upstream, caplog):
        async def script(reader, writer, received):
            await _drain_rest(reader, received)

        reply, received, line = await self._run(client_service, scripted_upstream, script, caplog,
                                                 timeouts=certproxy.Timeouts(dialogue=0.5))
        assert reply.startswith(b"421 4.4.2 ")
        assert "timed out" in line

    async def test_endless_reply_line(self, client_service, scripted_upstream, caplog):
        async def script(reader, writer, received):
            writer.write(b"220-" + b"x" * 100_000)
            await _drain_rest(reader, received)

        reply, received, line = await self._run(client_service, scripted_upstream, script, caplog)
        assert reply.startswith(b"421 4.5.0 ")
        assert received == b"QUIT\r\n"

    async def test_closes_mid_dialogue(self, client_service, scripted_upstream, caplog):
        async def script(reader, writer, received):
            await _greet_ehlo(reader, writer, received, b"250-mx.evil.test\r\n250 STARTTLS\r\n")

        reply, received, line = await self._run(client_service, scripted_upstream, script, caplog)
        assert reply.startswith(b"421 4.4.2 ")


class TestReplyParser:
    def test_multiline_and_split_feeds(self):
        p = certproxy.ReplyParser()
        assert p.feed(b"250-a\r\n250-STARTTLS\r") == []
        [r] = p.feed(b"\n250 SIZE 10\r\n")
        assert r.code == 250 and r.keywords() == {"STARTTLS", "SIZE"}
        assert p.trailing_data == b""

    @pytest.mark.parametrize("data", [b"hello\r\n", b"250-a\r\n251 b\r\n", b"2500 x\r\n", b"x" * 5000])
    def test_garbage_is_a_protocol_error(self, data):
        with pytest.raises(certproxy.ProtocolError) as e:
            certproxy.ReplyParser().feed(data)
        assert e.value.reply.startswith("421 4.")

    def test_too_many_lines(self):
        with pytest.raises(certproxy.ProtocolError):
            certproxy.ReplyParser().feed(b"250-x\r\n" * 1000)

    def test_dialogue_bytes(self):
        d = certproxy.StartTLSClient("me.test")
        assert d.receive_data(b"220 hi\r\n") == b"EHLO me.test\r\n"
        assert d.receive_data(b"250-hi\r\n250 STARTTLS\r\n") == b"STARTTLS\r\n"
        assert d.receive_data(b"220 go\r\n") == b"" and d.ready


class TestFingerprints:
    FP = "AB" * 32

    @pytest.mark.parametrize("text", [
        ":".join(["AB"] * 32), "ab" * 32, "sha256:" + ":".join(["ab"] * 32), "SHA256=" + "AB" * 32,
        "sha256 Fingerprint=" + ":".join(["AB"] * 32), "SHA256 Fingerprint=" + "ab" * 32, "  " + "AB" * 32 + "\n",
    ])
    def test_spellings(self, text):
        assert certproxy.parse_fingerprint(text) == bytes.fromhex(self.FP)

    @pytest.mark.parametrize("text", ["", "AB" * 31, "AB" * 33, "GG" * 32, "A:B" * 10, ":".join(["AB"] * 31) + ":ABC",
                                      "md5:" + "AB" * 32])
    def test_malformed(self, text):
        with pytest.raises(ValueError):
            certproxy.parse_fingerprint(text)


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "certproxy.py"), *args], capture_output=True, text=True,
                          timeout=timeout)


class TestConfigErrors:
    @pytest.mark.parametrize("extra, option, words", [
        ([], "--pin", "refusing"),
        (["--pin", "nothex"], "--pin", "nothex"),
        (["--pin", "AB" * 32, "--listen", "0.0.0.0:2525"], "--listen", "--allow-remote-clients"),
        (["--pin", "AB" * 32, "--listen", "nonsense"], "--listen", "HOST:PORT"),
        (["--pin", "AB" * 32, "--ca", "/nonexistent/ca.pem"], "--ca", "/nonexistent/ca.pem"),
    ])
    def test_named_option(self, certs, extra, option, words):
        r = run_cli("client", "--upstream", "127.0.0.1:25", "--cert", str(certs.client.cert),
                    "--key", str(certs.client.key), *extra)
        assert r.returncode == 2, r
        assert f"error: {option}:" in r.stderr and words in r.stderr
        assert "Traceback" not in r.stderr

    def test_unreadable_cert(self, tmp_path):
        r = run_cli("client", "--upstream", "127.0.0.1:25", "--cert", str(tmp_path / "missing.pem"), "--pin", "AB" * 32)
        assert r.returncode == 2 and "error: --cert:" in r.stderr and "Traceback" not in r.stderr

    def test_key_does_not_match(self, certs):
        r = run_cli("client", "--upstream", "127.0.0.1:25", "--cert", str(certs.client.cert),
                    "--key", str(certs.other_client.key), "--pin", "AB" * 32)
        assert r.returncode == 2 and "error: --key:" in r.stderr and "Traceback" not in r.stderr

    def test_bad_upstream(self, certs):
        r = run_cli("client", "--upstream", "mail.example.org", "--cert", str(certs.client.cert), "--pin", "AB" * 32)
        assert r.returncode == 2 and "error: --upstream:" in r.stderr


async def test_suite_runs_on_the_requested_loop():
    """CI runs the suite twice: plain asyncio and uvloop (CERTPROXY_LOOP=uvloop); prove which one this is."""
    loop = asyncio.get_running_loop()
    expect_uvloop = __import__("os").environ.get("CERTPROXY_LOOP") == "uvloop"
    assert type(loop).__module__.startswith("uvloop") == expect_uvloop
