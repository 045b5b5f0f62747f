"""The attack and fault suite: what people on the open internet (and broken peers) do to certproxy.

STARTTLS negotiation tricks on both sides live in test_client.py (TestMaliciousUpstream) and
test_server.py (TestStartTLSInjection, TestPreTLSDialogue); this file adds TLS-level attacks, resource
abuse with the memory measured, peers dying mid-DATA, and property-based fuzzing of every parser
that sees bytes before the splice."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import smtplib
import socket
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import certproxy
from conftest import client_ctx, read_reply, server_context, session_line
from realpeers import Process, free_port, require_tool
from test_server import MESSAGE, tls_open

ROOT = Path(__file__).resolve().parent.parent


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# ---------------------------------------------------------------------------------------------------
# TLS-level attacks on certproxy server


class TestTLSAttacks:
    async def run_openssl(self, *args: str, stdin_script=()) -> str:
        """``stdin_script``: (marker, line) pairs: ``line`` is typed once ``marker`` shows in the output
        (or openssl has ended, or 10 s have passed: then the assertions on the output say what went wrong)."""
        require_tool("openssl")
        proc = await asyncio.create_subprocess_exec("openssl", "s_client", *args, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out = bytearray()

        async def seen(marker: bytes) -> None:
            try:
                async with asyncio.timeout(10):
                    while marker not in out and (chunk := await proc.stdout.read(4096)):
                        out.extend(chunk)
            except TimeoutError:
                pass

        for marker, line in stdin_script:
            await seen(marker)
            if proc.returncode is None:
                try:
                    proc.stdin.write(line)
                    await proc.stdin.drain()
                except (BrokenPipeError, ConnectionResetError):
                    break
        try:
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass
        rest, _ = await asyncio.wait_for(proc.communicate(), 30)
        return (bytes(out) + rest).decode(errors="replace")

    async def test_client_initiated_renegotiation_is_refused(self, certs, server_service, sink):
        backend = await sink("b")
        svc = await server_service("tls", backend.endpoint)
        out = await self.run_openssl("-connect", f"127.0.0.1:{svc.port}", "-tls1_2", "-cert", str(certs.client.cert),
                                     "-key", str(certs.client.key),
                                     stdin_script=[(b"220 b ESMTP sink", b"R\n"), (b"no renegotiation", b"NOOP\n")])
        assert "220 b ESMTP sink" in out and "RENEGOTIATING" in out, out
        assert "no renegotiation" in out, out
        assert b"NOOP" not in backend.received  # the connection did not survive the attempt

    @pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
    async def test_old_tls_versions_are_refused(self, certs, server_service, sink, version, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        backend = await sink("b")
        svc = await server_service("tls", backend.endpoint)
        out = await self.run_openssl("-connect", f"127.0.0.1:{svc.port}", version, "-cipher", "DEFAULT@SECLEVEL=0",
                                     "-cert", str(certs.client.cert), "-key", str(certs.client.key))
        assert "220 " not in out
        line = await session_line(caplog)
        assert "unsupported protocol" in line.lower() and "outcome=refused" in line, line
        assert backend.connections == 0

    async def test_starttls_inside_tls_is_the_mtas_business(self, certs, server_service, sink):
        # certproxy does not start a second handshake; the command goes to the MTA like any other.
        backend = await sink("b")
        svc = await server_service("starttls", backend.endpoint)
        reader, writer, _ = await tls_open(svc.port, "starttls", client_ctx(certs, certs.client))
        writer.write(b"EHLO laptop.test\r\n")
        assert b"STARTTLS" not in await read_reply(reader)  # hidden: it would be a lie inside TLS
        writer.write(b"STARTTLS\r\n")
        await read_reply(reader)
        writer.write(b"NOOP\r\n")
        assert (await read_reply(reader)).startswith(b"250")  # still the same TLS session
        writer.close()
        assert backend.received == b"EHLO laptop.test\r\nSTARTTLS\r\nNOOP\r\n"

    async def test_nothing_said_before_tls_reaches_the_mta(self, certs, server_service, sink):
        # EHLO argument tampering: the pre-TLS EHLO (whatever it claims) never leaves certproxy.
        backend = await sink("b")
        svc = await server_service("starttls", backend.endpoint)
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        await read_reply(reader)
        writer.write(b"EHLO evil.example XCLIENT=ADDR\r\n")
        await read_reply(reader)
        writer.write(b"NOOP pre-tls\r\n")
        await read_reply(reader)
        writer.write(b"STARTTLS\r\n")
        assert (await read_reply(reader)).startswith(b"220 ")
        await writer.start_tls(client_ctx(certs, certs.client), server_hostname="localhost")
        writer.write(b"EHLO good.example\r\nQUIT\r\n")
        await read_reply(reader)
        await read_reply(reader)
        writer.close()
        assert backend.received == b"EHLO good.example\r\nQUIT\r\n"


# ---------------------------------------------------------------------------------------------------
# Resource abuse, measured on a real process


class TestResourceAbuse:
    def start_server(self, tmp_path, certs, backend_port: int, port: int, *extra: str) -> Process:
        return Process([sys.executable, str(ROOT / "certproxy.py"), "server", "--starttls", "--listen",
                        f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{backend_port}", "--cert", str(certs.server.cert),
                        "--key", str(certs.server.key), "--allow", str(certs.client.cert), "--hostname",
                        "mx.certproxy.test", *extra], port, tmp_path / "server.log")

    def legit_send(self, port: int, certs, source: str) -> dict:
        with smtplib.SMTP("127.0.0.1", port, timeout=20, source_address=(source, 0)) as s:
            s.ehlo("laptop.test")
            s.starttls(context=client_ctx(certs, certs.client))
            s.ehlo("laptop.test")
            return s.sendmail("a@laptop.test", ["b@example.net"], MESSAGE)

    def test_silent_sockets_slow_lines_and_a_flood(self, tmp_path, certs, sink_mta):
        """200 sockets that say nothing, 20 that send a 1 MB line, and a flood past the per-address limit,
        all from 127.0.0.3: a legitimate client from 127.0.0.2 is served throughout, and memory stays
        bounded."""
        port = free_port()
        proc = self.start_server(tmp_path, certs, sink_mta.port, port, "--max-per-ip", "250")
        held: list[socket.socket] = []
        try:
            self.legit_send(port, certs, "127.0.0.2")
            before = rss_kb(proc.proc.pid)
            for _ in range(200):
                s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.3", 0))
                held.append(s)
            assert self.legit_send(port, certs, "127.0.0.2") == {}
            # a 1 MB line before STARTTLS: answered and closed, never buffered
            for _ in range(20):
                with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.3", 0)) as s:
                    s.recv(1024)
                    try:
                        s.sendall(b"EHLO " + b"A" * 1_000_000 + b"\r\n")
                    except (ConnectionResetError, BrokenPipeError):
                        pass  # closed while we were still sending: fine
                    reply = b""
                    try:
                        while chunk := s.recv(4096):
                            reply += chunk
                    except ConnectionResetError:
                        pass
                    assert reply == b"" or b"500 5.5.2 line too long" in reply, reply
            # a flood past --max-per-ip: told they are too many, not left hanging
            flood = []
            for _ in range(80):
                s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.3", 0))
                flood.append(s)
            answers = [s.recv(1024) for s in flood]  # all answered before any is closed (closing frees slots)
            for s in flood:
                s.close()
            busy = sum(b"421 4.7.0" in a and b"too busy" in a for a in answers)
            assert busy == 30 and answers.count(answers[0]) == 50, answers  # 200 silent + 80 flood, limit 250
            assert self.legit_send(port, certs, "127.0.0.2") == {}
            after = rss_kb(proc.proc.pid)
        finally:
            for s in held:
                s.close()
            proc.stop()
        growth = after - before
        print(f"RSS {before} KB -> {after} KB with 200 idle pre-TLS sockets (+{growth / 200:.1f} KB each)")
        assert growth < 32 * 1024, growth  # bounded: far below anything a 1 MB line or a flood could cost

    async def test_client_that_stops_reading_stalls_the_mta_not_our_memory(self, certs, server_service, scripted_upstream):
        """The MTA keeps talking, the client reads nothing: certproxy stops reading the MTA once its
        buffers towards the client are full."""
        written = 0
        stalled = asyncio.Event()

        async def chatty(reader, writer, received):
            nonlocal written
            writer.write(b"220 chatty ESMTP\r\n")
            await reader.readline()  # the client's first command: then the MTA answers, and answers...
            line = b"250-" + b"x" * 1000 + b"\r\n"
            while written < 64 * 1024 * 1024:
                writer.write(line * 64)
                written += len(line) * 64
                try:
                    await asyncio.wait_for(writer.drain(), 2)
                except (TimeoutError, asyncio.TimeoutError):
                    stalled.set()
                    try:  # until certproxy hangs up (the client leaves)
                        await asyncio.wait_for(reader.read(), 20)
                    except (TimeoutError, asyncio.TimeoutError, ConnectionError):
                        pass
                    return

        mta = await scripted_upstream(chatty)
        svc = await server_service("tls", mta.endpoint)
        reader, writer, greeting = await tls_open(svc.port, "tls", client_ctx(certs, certs.client))
        assert greeting.startswith(b"220 chatty")
        writer.write(b"NOOP\r\n")  # and never reads again
        await asyncio.wait_for(stalled.wait(), 30)
        assert written < 32 * 1024 * 1024, written  # kernel and TLS buffers, not the whole 64 MB
        writer.close()


# ---------------------------------------------------------------------------------------------------
# Peers dying in the middle of a transaction: the client hears 4xx, nothing is reported delivered


async def dies_in_data(reader, writer, received):
    writer.write(b"220 fragile ESMTP\r\n")
    while line := await reader.readline():
        received += line
        verb = line[:4].upper()
        if verb == b"DATA":
            writer.write(b"354 go ahead\r\n")
            await writer.drain()
            received += await reader.read(10)  # a little of the body, then the MTA process dies
            writer.transport.abort()
            return
        writer.write(b"250-fragile\r\n250 8BITMIME\r\n" if verb == b"EHLO" else b"250 ok\r\n")
        await writer.drain()


class TestDyingPeers:
    @pytest.mark.parametrize("mode", ["tls", "starttls"])
    async def test_mta_dies_mid_data(self, certs, server_service, scripted_upstream, mode, caplog):
        mta = await scripted_upstream(dies_in_data)
        svc = await server_service(mode, mta.endpoint)

        def send():
            s = smtplib.SMTP_SSL("127.0.0.1", svc.port, context=client_ctx(certs, certs.client), timeout=20) \
                if mode == "tls" else smtplib.SMTP("127.0.0.1", svc.port, timeout=20)
            if mode == "starttls":
                s.ehlo("laptop.test")
                s.starttls(context=client_ctx(certs, certs.client))
            s.ehlo("laptop.test")
            return s.sendmail("a@laptop.test", ["b@example.net"], MESSAGE)

        with pytest.raises(smtplib.SMTPResponseException) as e:
            await asyncio.to_thread(send)
        assert e.value.smtp_code == 421 and b"not accepted" in e.value.smtp_error, e.value

    async def test_upstream_dies_mid_data(self, certs, client_service, scripted_upstream):
        """certproxy client: the pinned upstream dies during DATA; the MUA gets 421, not silence."""
        up = await scripted_upstream(dies_in_data, ssl=server_context(certs.server, [certs.client]))
        svc = await client_service(up.endpoint, mode="tls")

        def send():
            with smtplib.SMTP("127.0.0.1", svc.port, timeout=20) as s:
                return s.sendmail("a@laptop.test", ["b@example.net"], MESSAGE)

        with pytest.raises(smtplib.SMTPResponseException) as e:
            await asyncio.to_thread(send)
        assert e.value.smtp_code == 421, e.value

    async def test_normal_quit_gets_no_extra_reply(self, certs, server_service, sink):
        backend = await sink("b")
        svc = await server_service("tls", backend.endpoint)
        reader, writer, _ = await tls_open(svc.port, "tls", client_ctx(certs, certs.client))
        writer.write(b"QUIT\r\n")
        rest = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert rest == b"221 2.0.0 Bye\r\n"


# ---------------------------------------------------------------------------------------------------
# Fuzzing: arbitrary bytes never crash, never hang, never reach the backend

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
chunks = st.lists(st.binary(max_size=700), max_size=12)
replyish = st.sampled_from([b"220 hi\r\n", b"220-hi\r\n", b"250-x\r\n", b"250 STARTTLS\r\n", b"250 x\r\n",
                            b"220 go\r\n", b"454 no\r\n", b"\r\n", b"\n", b"\r", b"250", b"2", b"-", b" "])



def _cut(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """``data`` in pieces, cut at up to three places."""
    return st.lists(st.integers(0, len(data)), max_size=3).map(
        lambda cuts: [data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)])])


# A server's side of the pre-TLS dialogue, mostly right, each reply in its own pieces (or glued to the next).
server_dialogue = st.tuples(
    st.sampled_from([b"220 mx ESMTP\r\n", b"220-mx\r\n220 more\r\n", b"220 mx\n", b"554 go away\r\n", b""]),
    st.sampled_from([b"250-mx\r\n250 STARTTLS\r\n", b"250 STARTTLS\r\n", b"250-mx\r\n250-starttls\r\n250 SIZE 9\r\n",
                     b"250-mx\r\n250 SIZE 9\r\n", b"250-mx\r\n251 STARTTLS\r\n", b"502 no\r\n", b""]),
    st.sampled_from([b"220 go ahead\r\n", b"220-go\r\n220 ahead\r\n", b"220 go ahead", b"454 no\r\n", b""]),
    st.sampled_from([b"", b"", b"", b"250 injected\r\n", b"\x16\x03\x01", b"\r\n"]) | st.binary(max_size=20),
    st.sampled_from([False, False, False, True]),  # greeting and EHLO reply in one segment: never asked for
).flatmap(lambda r: st.tuples(*(_cut(x) for x in ((r[0] + r[1],) if r[4] else r[:2]) + r[2:4]))).map(
    lambda pieces: [p for reply in pieces for p in reply])

addresses = st.sampled_from([4, 6]).flatmap(lambda v: st.tuples(
    st.ip_addresses(v=v), st.integers(0, 65535), st.ip_addresses(v=v), st.integers(0, 65535))).map(
    lambda t: ((str(t[0]), t[1]), (str(t[2]), t[3])))
proxy_headers = st.builds(lambda version, a: certproxy.proxy_header(version, *a), st.sampled_from(["v1", "v2"]), addresses)
# PROXY headers: real ones with bytes behind them, cut short, or with one byte changed; and bare starts.
proxyish = st.one_of(
    st.builds(lambda h, tail: h + tail, proxy_headers, st.binary(max_size=20)),
    st.builds(lambda h, i: h[:i], proxy_headers, st.integers(0, 60)),
    st.builds(lambda h, i, b: h[:i] + bytes([b]) + h[i + 1:], proxy_headers, st.integers(0, 60), st.integers(0, 255)),
    st.builds(lambda head, body: head + body,
              st.sampled_from([b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", b"PROXY ",
                               certproxy.PROXY_V2_SIGNATURE + b"\x21\x11\x00\x0c",
                               certproxy.PROXY_V2_SIGNATURE + b"\x21\x21\x00\x24",
                               certproxy.PROXY_V2_SIGNATURE + b"\x20", certproxy.PROXY_V2_SIGNATURE]),
              st.binary(max_size=60) | st.from_regex(rb"\A[0-9a-f.: ]{0,60}(\r\n)?[A-Z]{0,4}\Z")))
smtpish = st.lists(st.sampled_from([b"EHLO x\r\n", b"HELO y\r\n", b"STARTTLS\r\n", b"NOOP\r\n", b"RSET\r\n",
                                    b"MAIL FROM:<a@b>\r\n", b"QUIT\r\n", b"\r\n", b"\n", b"STARTTLS x\r\n",
                                    b"EHLO\r\n", b"A" * 600, b"\x16\x03\x01"]) | st.binary(max_size=40), max_size=30)


class TestFuzzing:
    @FUZZ
    @given(chunks)
    def test_gate_on_arbitrary_bytes(self, parts):
        self._drive_gate(parts)

    @FUZZ
    @given(smtpish)
    def test_gate_on_smtp_like_bytes(self, parts):
        self._drive_gate(parts)

    @staticmethod
    def _drive_gate(parts):
        gate = certproxy.SMTPGate("mx")
        for part in parts:
            if gate.state is not certproxy._GateState.OPEN:
                break
            try:
                out = gate.receive_data(part)
            except certproxy.ProtocolError:
                assert gate.state is certproxy._GateState.STARTTLS
                return
            assert len(out) <= 64 * (len(part) + 1) + 200  # replies bounded by what came in
            assert len(gate._buf) <= certproxy.MAX_COMMAND_LINE
        assert gate.pending == b""  # without --starttls-optional nothing is ever handed on
        assert gate.state in (certproxy._GateState.OPEN, certproxy._GateState.STARTTLS,
                              certproxy._GateState.CLOSED)

    @FUZZ
    @given(smtpish)
    @example([b"\x0b", b"EHLO x\r\n"])  # \x0b is not a blank to the gate: "\x0bEHLO" is no EHLO
    def test_optional_gate_hands_over_only_what_followed_a_mail_command(self, parts):
        gate = certproxy.SMTPGate("mx", optional=True)
        data = b""
        for part in parts:
            if gate.state is not certproxy._GateState.OPEN:
                break
            data += part
            try:
                gate.receive_data(part)
            except certproxy.ProtocolError:
                return
        if gate.state is certproxy._GateState.HANDOVER:
            assert gate.pending and data.endswith(gate.pending)  # exactly what the client sent, from the command on
            # Only SP and TAB are blanks, as in the gate (bytes.strip() would also eat \x0b and \x0c).
            verb = gate.pending.split(b"\n", 1)[0].rstrip(b"\r").strip(b" \t").split(b" ", 1)[0].upper()
            assert verb not in (
                b"EHLO", b"HELO", b"NOOP", b"RSET", b"QUIT", b"STARTTLS")

    @staticmethod
    def _parse_replies(parts) -> tuple[list, bytes] | None:
        """Every reply ``parts`` complete and what is left over, checking each reply on the way; None
        if the parser refused the bytes (ProtocolError)."""
        parser, replies = certproxy.ReplyParser(), []
        try:
            for part in parts:
                replies += parser.feed(part)
        except certproxy.ProtocolError:
            return None
        for reply in replies:
            assert 200 <= reply.code <= 599, reply
            assert 1 <= len(reply.lines) <= certproxy.MAX_REPLY_LINES, reply
            assert not any("\n" in line for line in reply.lines), reply
        return replies, parser.trailing_data

    @FUZZ
    @given(st.lists(st.binary(max_size=700) | replyish, max_size=12), st.randoms(use_true_random=False))
    @example([b"250-a\r\n250-STARTTLS\r", b"\n250 SIZE 10\r\n220 next"], random.Random(0))
    def test_reply_parser(self, parts, rnd):
        """Chunking never changes the outcome: the bytes fed whole, as drawn, or cut at random places give
        the same replies and the same leftover, or are refused every way."""
        data = b"".join(parts)
        cuts = sorted(rnd.sample(range(1, len(data)), min(len(data) - 1, 8))) if len(data) > 1 else []
        recut = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        whole = self._parse_replies([data])
        assert self._parse_replies(parts) == whole
        assert self._parse_replies(recut) == whole

    @pytest.mark.parametrize("ending", [b"\r", b"\r\r"])
    def test_reply_line_limit_does_not_depend_on_chunking(self, ending):
        """Found by the fuzzer: a line at the limit whose CR came before its LF was refused only when
        the LF arrived in a later read."""
        line = b"250 " + b"x" * (certproxy.MAX_REPLY_LINE - 4) + ending
        assert self._parse_replies([line, b"\n"]) == self._parse_replies([line + b"\n"])
        assert self._parse_replies([line + b"x", b"\n"]) == self._parse_replies([line + b"x\n"])

    @FUZZ
    @given(server_dialogue | st.lists(st.binary(max_size=300) | replyish, max_size=12))
    @example([b"220 hi\r\n", b"250-hi\r\n250 STARTTLS\r\n", b"220 go\r\n"])
    @example([b"220 hi\r\n250-hi\r\n250 STARTTLS\r\n"])  # a reply nobody asked for yet
    def test_starttls_client_dialogue(self, parts):
        """Only EHLO and then STARTTLS ever go out in clear, and ``ready`` (TLS may start) means nothing
        the server sent is left over: any byte after the 220, now or later, is refused."""
        dialogue = certproxy.StartTLSClient()
        sent = []
        try:
            for part in parts:
                was_ready = dialogue.ready
                out = dialogue.receive_data(part)
                assert not (was_ready and part), "bytes after the 220 to STARTTLS were taken"
                if out:
                    sent.append(out)
                assert sent == [b"EHLO localhost\r\n", b"STARTTLS\r\n"][: len(sent)], sent
                if dialogue.ready:
                    assert sent == [b"EHLO localhost\r\n", b"STARTTLS\r\n"]
                    assert dialogue._parser.trailing_data == b""
        except certproxy.SessionError:
            pass  # refused: fine, and what went out before was checked above

    @FUZZ
    @given(st.binary(max_size=300) | proxyish)
    @example(b"PROXY UNKNOWN\r\n")
    @example(certproxy.PROXY_V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes(12) + b"EHLO x\r\n")
    def test_proxy_header_parser(self, data):
        """A parsed header lies within the bytes, is the same parsed alone, needs all its bytes (every
        shorter prefix asks for more), and carries real addresses of one family and real ports."""
        try:
            parsed = certproxy.parse_proxy_header(data)
        except ValueError:
            return
        if parsed is None:
            return
        n, src, dst = parsed
        assert 0 < n <= len(data)
        assert certproxy.parse_proxy_header(data[:n]) == parsed
        for cut in range(n):
            assert certproxy.parse_proxy_header(data[:cut]) is None, cut
        assert (src is None) == (dst is None)
        if src is not None:
            a, b = (ipaddress.ip_address(addr[0]) for addr in (src, dst))
            assert str(a) == src[0] and str(b) == dst[0] and a.version == b.version
            assert 0 <= src[1] < 65536 and 0 <= dst[1] < 65536

    @FUZZ
    @given(st.sampled_from(["v1", "v2"]), addresses, st.binary(max_size=40))
    def test_proxy_header_round_trip(self, version, pair, tail):
        header = certproxy.proxy_header(version, *pair)
        assert certproxy.parse_proxy_header(header + tail) == (len(header), *pair)

    async def test_random_bytes_at_the_listener_never_reach_the_backend(self, certs, server_service, sink, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        backend = await sink("b")
        svc = await server_service("both", backend.endpoint)
        rng = random.Random(20261123)
        for _ in range(60):
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 3000)))
            if rng.random() < 0.5:
                blob = rng.choice([b"EHLO x\r\n", b"\x16\x03\x01\x02\x00", b"STARTTLS\r\n"]) + blob
            try:
                writer.write(blob)
                await asyncio.wait_for(reader.read(65536), 5)
            except (ConnectionError, TimeoutError, asyncio.TimeoutError):
                pass
            writer.close()
        await session_line(caplog, count=60, timeout=30)  # every one of those sessions is over
        assert backend.connections == 0
        # and it still serves
        reader, writer, greeting = await tls_open(svc.port, "tls", client_ctx(certs, certs.client))
        assert greeting.startswith(b"220 b ")
        writer.close()


# ---------------------------------------------------------------------------------------------------
# sslyze: what a scanner sees


class TestSslyze:
    @pytest.mark.parametrize("mode", ["tls", "starttls"])
    def test_only_tls12_and_13_no_compression_no_client_renegotiation(self, tmp_path, certs, sink_mta, mode):
        import importlib.util
        import json
        import subprocess

        if importlib.util.find_spec("sslyze") is None:
            if os.environ.get("CERTPROXY_REQUIRE_PEERS") == "1":
                pytest.fail("sslyze is not installed (pip install -e '.[test]')")
            pytest.skip("sslyze is not installed")
        port = free_port()
        proc = Process([sys.executable, str(ROOT / "certproxy.py"), "server", f"--{mode}", "--listen",
                        f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{sink_mta.port}", "--cert", str(certs.server.cert),
                        "--key", str(certs.server.key), "--allow", str(certs.client.cert), "--max-per-ip", "0"],
                       port, tmp_path / "server.log")
        out = tmp_path / "sslyze.json"
        try:
            args = [sys.executable, "-m", "sslyze", "--sslv2", "--sslv3", "--tlsv1", "--tlsv1_1", "--tlsv1_2",
                    "--tlsv1_3", "--compression", "--reneg", "--cert", str(certs.client.cert), "--key",
                    str(certs.client.key), "--json_out", str(out), f"127.0.0.1:{port}"]
            if mode == "starttls":
                args[3:3] = ["--starttls", "smtp"]
            r = subprocess.run(args, capture_output=True, text=True, timeout=300)
        finally:
            proc.stop()
        assert r.returncode == 0, r.stdout + r.stderr
        scan = json.loads(out.read_text())["server_scan_results"][0]["scan_result"]
        accepted = {v: len(scan[f"{v}_cipher_suites"]["result"]["accepted_cipher_suites"])
                    for v in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1", "tls_1_2", "tls_1_3")}
        print(mode, accepted)
        assert accepted["ssl_2_0"] == accepted["ssl_3_0"] == accepted["tls_1_0"] == accepted["tls_1_1"] == 0, accepted
        assert accepted["tls_1_2"] > 0 and accepted["tls_1_3"] > 0, accepted
        assert scan["tls_compression"]["result"]["supports_compression"] is False
        reneg = scan["session_renegotiation"]["result"]
        assert reneg["client_renegotiations_success_count"] == 0 and not reneg["is_vulnerable_to_client_renegotiation_dos"]
