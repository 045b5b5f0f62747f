"""certproxy server mode: refusals, injection, and the happy path, with a recording backend."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import smtplib
import ssl

import pytest

import certproxy
from conftest import CertPair, client_ctx, read_reply, session_line

MESSAGE = b"From: a@laptop.test\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nhello through certproxy server\r\n"
NOT_AUTHORISED = b"554 5.7.1 certificate not authorised\r\n"


def near_miss(fp: str, keep: int) -> str:
    """A digest that agrees with ``fp`` in its first ``keep`` hex digits and differs in every one after."""
    digits = fp.replace(":", "")
    return certproxy.format_fingerprint(bytes.fromhex(
        digits[:keep] + "".join("0" if d != "0" else "1" for d in digits[keep:])))


# Digests one glance would take for the certificate's: (which digest of the pair, hex digits kept).
NEAR_MISSES = {
    "sha256-first-16-digits": ("fp", 16),
    "sha256-all-but-the-last-digit": ("fp", 63),
    "spki-first-16-digits": ("spki", 16),
}


@pytest.fixture
async def backend():
    """certproxy's own sink MTA as a recording backend; it advertises STARTTLS to test the stripping."""
    b = certproxy._SinkMTA("backend.test", ("PIPELINING", "STARTTLS", "8BITMIME"))
    await b.start()
    b.endpoint = f"127.0.0.1:{b.port}"
    yield b
    await b.stop()


def smtplib_send(port: int, mode: str, ctx: ssl.SSLContext) -> dict:
    if mode == "tls":
        s = smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=30)
    else:
        s = smtplib.SMTP("127.0.0.1", port, timeout=30)
        s.ehlo("laptop.test")
        s.starttls(context=ctx)
    with s:
        s.ehlo("laptop.test")
        return s.sendmail("a@laptop.test", ["b@example.net"], MESSAGE)


async def tls_open(port: int, mode: str, ctx: ssl.SSLContext):
    """A raw TLS SMTP connection (after the STARTTLS dance when needed); returns (reader, writer, greeting)."""
    if mode == "tls":
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        return reader, writer, await read_reply(reader)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    greeting = await read_reply(reader)
    writer.write(b"EHLO laptop.test\r\n")
    await read_reply(reader)
    writer.write(b"STARTTLS\r\n")
    assert (await read_reply(reader)).startswith(b"220 ")
    await writer.start_tls(ctx, server_hostname="localhost")
    return reader, writer, greeting


class TestHappyPath:
    @pytest.mark.parametrize("mode", ["tls", "starttls"])
    async def test_allowed_client_reaches_backend(self, certs, backend, server_service, mode, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        svc = await server_service(mode, backend.endpoint)
        assert await asyncio.to_thread(smtplib_send, svc.port, mode, client_ctx(certs, certs.client)) == {}
        assert backend.connections == 1
        assert b"hello through certproxy server" in backend.received
        assert backend.received.lower().startswith(b"ehlo laptop.test\r\nmail from:<a@laptop.test>")
        line = await session_line(caplog)
        for fact in ("outcome=ok", f"cert_fp={certs.client.fp}", 'cert_subject="CN=laptop"', "tls_version=TLSv1.3",
                     f"backend={backend.endpoint}", "bytes_in=", "bytes_out="):
            assert fact in line, line

    async def test_starttls_stripped_from_backend_ehlo(self, certs, backend, server_service):
        svc = await server_service("starttls", backend.endpoint)
        reader, writer, greeting = await tls_open(svc.port, "starttls", client_ctx(certs, certs.client))
        assert greeting.startswith(b"220 mx.certproxy.test ")
        writer.write(b"EHLO laptop.test\r\n")
        ehlo = await read_reply(reader)
        assert ehlo == b"250-backend.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
        writer.write(b"EHLO again.test\r\n")  # only the first reply is filtered; the MTA speaks for itself after
        assert (await read_reply(reader)).startswith(b"250-backend.test")
        writer.close()

    async def test_implicit_greeting_is_the_backends(self, certs, backend, server_service):
        svc = await server_service("tls", backend.endpoint)
        reader, writer, greeting = await tls_open(svc.port, "tls", client_ctx(certs, certs.client))
        assert greeting == b"220 backend.test ESMTP sink\r\n"
        writer.close()

    async def test_allow_directory(self, certs, backend, server_service, tmp_path):
        d = tmp_path / "allowed"
        d.mkdir()
        (d / "laptop.pem").write_bytes(certs.client.cert.read_bytes())
        svc = await server_service("tls", backend.endpoint, allow=[d])
        assert await asyncio.to_thread(smtplib_send, svc.port, "tls", client_ctx(certs, certs.client)) == {}

    async def test_offered_session_is_not_resumed_and_judged_again(self, certs, backend, server_service, caplog):
        """TLS 1.2 session-ID resumption would skip the certificate exchange: certproxy keeps no session
        cache and issues no tickets, so a client offering its last session gets a full handshake, and
        its certificate is judged against the allowlist in force now."""
        caplog.set_level(logging.INFO, "certproxy")
        svc = await server_service("tls", backend.endpoint)
        ctx = client_ctx(certs, certs.client)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2

        def connect(session=None):
            import socket
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", svc.port), timeout=20),
                                 server_hostname="localhost", session=session) as s:
                greeting = s.recv(1024)
                s.sendall(b"MAIL FROM:<a@laptop.test>\r\n")
                reply = s.recv(1024)
                session, reused = s.session, s.session_reused
                try:
                    s.unwrap()  # close_notify: OpenSSL keeps only cleanly closed sessions resumable
                except (ssl.SSLError, OSError):
                    pass
                return session, reused, greeting, reply

        sess, _, greeting, reply = await asyncio.to_thread(connect)
        assert greeting.startswith(b"220 backend.test") and reply.startswith(b"250")
        assert sess is not None  # the client did keep a session to offer
        # The certificate leaves the allowlist (what a reload does: new settings, swapped whole).
        svc.settings = dataclasses.replace(svc.settings, policy=certproxy.ClientPolicy(
            frozenset(), frozenset(), certproxy.Pins(frozenset())))
        _, reused, greeting, reply = await asyncio.to_thread(connect, sess)
        assert reused is False  # a full handshake
        assert greeting == reply == b"554 5.7.1 certificate not authorised\r\n"
        assert backend.connections == 1
        line = await session_line(caplog, count=2)
        assert "cert=refused" in line and "resumed" not in line, line


class TestRefusals:
    @pytest.mark.parametrize("mode", ["tls", "starttls"])
    async def test_no_certificate_gets_530(self, certs, backend, server_service, mode, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        svc = await server_service(mode, backend.endpoint)
        reader, writer, greeting = await tls_open(svc.port, mode, client_ctx(certs))
        if mode == "tls":  # the refusal is the greeting (RFC 5321 4.3.1), and the answer to all but QUIT
            assert greeting == b"530 5.7.0 client certificate required\r\n"
        writer.write(b"EHLO laptop.test\r\n")
        assert await read_reply(reader) == b"530 5.7.0 client certificate required\r\n"
        writer.write(b"MAIL FROM:<a@laptop.test>\r\n")
        assert await read_reply(reader) == b"530 5.7.0 client certificate required\r\n"
        writer.write(b"QUIT\r\n")
        assert (await read_reply(reader)).startswith(b"221 ")
        writer.close()
        line = await session_line(caplog)
        assert backend.connections == 0
        assert "outcome=refused" in line and "no client certificate" in line

    async def test_client_ca_and_fingerprint_narrowing(self, certs, backend, server_service, tmp_path, caplog):
        import trustme

        caplog.set_level(logging.INFO, "certproxy")
        ca = trustme.CA()
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(ca_file)
        alice, bob = ca.issue_cert("alice@laptop.test"), ca.issue_cert("bob@laptop.test")
        pairs = []
        for name, leaf in (("alice", alice), ("bob", bob)):
            c, k = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
            leaf.cert_chain_pems[0].write_to_path(c)
            leaf.private_key_pem.write_to_path(k)
            pairs.append(type(certs.client)(c, k))
        alice_pair, bob_pair = pairs
        svc = await server_service("tls", backend.endpoint, allow=[], client_ca=str(ca_file),
                                   allow_fingerprints=certproxy.Pins.parse([alice_pair.fp], "--allow-fingerprint"))
        assert await asyncio.to_thread(smtplib_send, svc.port, "tls", client_ctx(certs, alice_pair)) == {}
        assert backend.connections == 1
        reader, writer, greeting = await tls_open(svc.port, "tls", client_ctx(certs, bob_pair))
        writer.write(b"MAIL FROM:<b@laptop.test>\r\n")
        assert await read_reply(reader) == b"554 5.7.1 certificate not authorised\r\n"
        writer.close()
        await session_line(caplog, count=2)  # alice's session and bob's are both over
        assert backend.connections == 1

    @pytest.mark.parametrize("mode", ["tls", "starttls"])
    async def test_backend_down_gives_421_inside_tls(self, certs, server_service, mode, caplog):
        from conftest import free_port
        caplog.set_level(logging.INFO, "certproxy")
        svc = await server_service(mode, f"127.0.0.1:{free_port()}")
        reader, writer, greeting = await tls_open(svc.port, mode, client_ctx(certs, certs.client))
        reply = greeting if mode == "tls" else await read_reply(reader)
        assert reply.startswith(b"421 4.3.0 ")
        writer.close()
        assert "connection refused" in (await session_line(caplog))


@pytest.fixture(scope="module")
def ca_issued(tmp_path_factory) -> tuple[str, CertPair]:
    """A private CA (its certificate file, for --client-ca) and a client certificate it issued."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    d = tmp_path_factory.mktemp("near-miss")
    ca_pem, ca_key = certproxy.make_certificate("Team CA", ca=True)
    (d / "ca.pem").write_bytes(ca_pem)
    cert, key = certproxy.make_certificate(
        "alice", usage="client", issuer=(x509.load_pem_x509_certificate(ca_pem), load_pem_private_key(ca_key, None)))
    (d / "alice.pem").write_bytes(cert)
    (d / "alice.key").write_bytes(key)
    (d / "alice.key").chmod(0o600)
    return str(d / "ca.pem"), CertPair(d / "alice.pem", d / "alice.key")


# How the handshake comes to accept a certificate before --allow-fingerprint judges it:
# (the certificate presented, server_service keywords).
ACCEPTED_BY = {
    "client-ca": lambda certs, ca: (ca[1], {"allow": [], "client_ca": ca[0]}),
    "allow-file": lambda certs, ca: (certs.client, {}),
}


class TestAllowFingerprintNearMiss:
    """--allow-fingerprint narrows who may pass to exact digests: one that shares the presented
    certificate's first 16 hex digits (what a person compares by eye) is another certificate's."""

    @pytest.mark.parametrize("mode", ["tls", "starttls"])
    @pytest.mark.parametrize("setup", list(ACCEPTED_BY))
    @pytest.mark.parametrize("miss", list(NEAR_MISSES))
    async def test_refused_inside_tls_and_the_backend_never_hears(self, certs, ca_issued, backend, server_service,
                                                                  caplog, mode, setup, miss):
        caplog.set_level(logging.INFO, "certproxy")
        pair, kw = ACCEPTED_BY[setup](certs, ca_issued)
        which, keep = NEAR_MISSES[miss]
        digest = near_miss(getattr(pair, which), keep)
        assert digest[:23] == getattr(pair, which)[:23] and digest != getattr(pair, which)
        svc = await server_service(mode, backend.endpoint, **kw,
                                   allow_fingerprints=certproxy.Pins.parse([digest], "--allow-fingerprint"))
        reader, writer, greeting = await tls_open(svc.port, mode, client_ctx(certs, pair))
        if mode == "tls":
            assert greeting == NOT_AUTHORISED
        writer.write(b"MAIL FROM:<a@laptop.test>\r\n")
        assert await read_reply(reader) == NOT_AUTHORISED
        writer.write(b"QUIT\r\n")
        assert (await read_reply(reader)).startswith(b"221 ")
        writer.close()
        line = await session_line(caplog)
        assert backend.connections == 0
        assert "outcome=refused" in line and "cert=refused" in line and f"cert_fp={pair.fp}" in line, line
        assert "not in --allow-fingerprint" in line, line

    @pytest.mark.parametrize("setup", list(ACCEPTED_BY))
    @pytest.mark.parametrize("which", ["fp", "spki"])
    async def test_control_the_exact_digest_passes(self, certs, ca_issued, backend, server_service, setup, which):
        pair, kw = ACCEPTED_BY[setup](certs, ca_issued)
        svc = await server_service("tls", backend.endpoint, **kw,
                                   allow_fingerprints=certproxy.Pins.parse([getattr(pair, which)], "--allow-fingerprint"))
        assert await asyncio.to_thread(smtplib_send, svc.port, "tls", client_ctx(certs, pair)) == {}
        assert backend.connections == 1


class TestOptionalStartTLSSpelling:
    """--starttls-optional: a client asking for STARTTLS in any case gets the 220 and a handshake; it is
    never taken for a client staying in clear and handed over to the untrusted backend."""

    @pytest.mark.parametrize("client_cert", ["none", "optional"])
    @pytest.mark.parametrize("verb", [b"starttls", b"StartTLS", b"STARTTLS"])
    async def test_any_case_of_starttls_starts_tls(self, certs, server_service, sink, caplog, client_cert, verb):
        caplog.set_level(logging.INFO, "certproxy")
        trusted, untrusted = await sink("trusted.test", proxy=True), await sink("untrusted.test", proxy=True)
        kw = {"allow": []} if client_cert == "none" else {}
        svc = await server_service("starttls", trusted.endpoint if client_cert == "optional" else None,
                                   client_cert=client_cert, starttls_optional=True, proxy_protocol="v1",
                                   untrusted_backend=certproxy.Endpoint.parse(untrusted.endpoint, "--untrusted-backend"),
                                   **kw)
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        assert (await read_reply(reader)).startswith(b"220 mx.certproxy.test ")
        writer.write(b"EHLO laptop.test\r\n")
        assert b"STARTTLS" in await read_reply(reader)
        writer.write(verb + b"\r\n")
        assert (await read_reply(reader)).startswith(b"220 ")
        await writer.start_tls(client_ctx(certs), server_hostname="localhost")
        writer.write(b"EHLO laptop.test\r\n")
        assert (await read_reply(reader)).startswith(b"250-untrusted.test\r\n")
        writer.write(b"QUIT\r\n")
        assert (await read_reply(reader)).startswith(b"221 ")
        writer.close()
        line = await session_line(caplog)
        assert "tls=starttls " in line and "outcome=ok" in line and f"backend={untrusted.endpoint}" in line, line
        assert trusted.connections == 0 and untrusted.connections == 1
        assert b"starttls" not in bytes(untrusted.received).lower()
        assert bytes(untrusted.received) == b"EHLO laptop.test\r\nQUIT\r\n"  # only what was said inside TLS


class TestStartTLSInjection:
    @pytest.mark.parametrize("payload", [
        b"STARTTLS\r\nMAIL FROM:<x@y>\r\n",
        b"STARTTLS\r\nEHLO x\r\n",
        b"STARTTLS\r\nMAIL FR",
        b"EHLO a\r\nSTARTTLS\r\nRSET\r\n",
    ])
    async def test_pipelined_bytes_after_starttls_close_the_connection(self, certs, backend, server_service,
                                                                        payload, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        svc = await server_service("starttls", backend.endpoint)
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        await read_reply(reader)
        writer.write(payload)  # one write, one segment
        rest = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        assert rest.endswith(b"421 4.7.0 pipelined data after STARTTLS; closing\r\n")
        assert b"220 2.0.0" not in rest
        line = await session_line(caplog)
        assert backend.connections == 0
        assert "CVE-2011-0411" in line


class TestPreTLSDialogue:
    async def _talk(self, port, *lines: bytes) -> list[bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        replies = [await read_reply(reader)]
        for line in lines:
            writer.write(line)
            replies.append(await read_reply(reader))
        writer.close()
        return replies

    async def test_dialogue(self, certs, backend, server_service, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        svc = await server_service("starttls", backend.endpoint)
        greeting, ehlo, mail, arg, noop, rset, helo, quit_ = await self._talk(
            svc.port, b"EHLO laptop.test\r\n", b"MAIL FROM:<a@b>\r\n", b"STARTTLS now\r\n", b"NOOP\r\n",
            b"RSET\r\n", b"HELO x\r\n", b"QUIT\r\n")
        assert greeting == b"220 mx.certproxy.test ESMTP certproxy\r\n"
        assert ehlo == b"250-mx.certproxy.test\r\n250 STARTTLS\r\n"
        assert mail == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
        assert arg.startswith(b"501 5.5.4 ")
        assert noop.startswith(b"250 ") and rset.startswith(b"250 ") and helo == b"250 mx.certproxy.test\r\n"
        assert quit_.startswith(b"221 ")
        await session_line(caplog)
        assert backend.connections == 0

    async def test_long_line(self, certs, backend, server_service):
        svc = await server_service("starttls", backend.endpoint)
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        await read_reply(reader)
        writer.write(b"EHLO " + b"x" * 1_000_000 + b"\r\n")
        rest = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        assert rest == b"500 5.5.2 line too long\r\n"

    async def test_too_many_errors(self, certs, backend, server_service):
        svc = await server_service("starttls", backend.endpoint)
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        await read_reply(reader)
        writer.write(b"MAIL FROM:<a@b>\r\n" * 20)
        rest = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        assert rest.count(b"530 ") == certproxy.MAX_DIALOGUE_ERRORS
        assert rest.endswith(b"421 4.7.0 too many errors\r\n")

    async def test_slowloris_cut_at_total_deadline(self, certs, backend, server_service, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        svc = await server_service("starttls", backend.endpoint, timeouts=certproxy.Timeouts(dialogue=1.0))
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        await read_reply(reader)
        closed = False
        for ch in b"EHLO slow.client.example.test\r\n" * 3:
            try:
                writer.write(bytes([ch]))
                await writer.drain()
            except ConnectionError:
                closed = True
                break
            if reader.at_eof():
                closed = True
                break
            await asyncio.sleep(0.1)  # the scenario: a slowloris client trickles one byte at a time
        try:
            data = await asyncio.wait_for(reader.read(), 5)
        except ConnectionError:  # our trickle after the server's close: a reset is fair
            data = b""
        writer.close()
        assert closed or data.count(b"250") < 3
        line = await session_line(caplog)
        assert "outcome=timeout" in line and "starttls: timed out after 1 s" in line, line


class TestFullTunnel:
    @pytest.mark.parametrize("mode", ["tls", "starttls"])
    async def test_client_to_server_to_mta(self, certs, backend, server_service, client_service, mode, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        srv = await server_service(mode, backend.endpoint)
        cli = await client_service(f"127.0.0.1:{srv.port}", mode=mode)

        def send():
            with smtplib.SMTP("127.0.0.1", cli.port, timeout=30) as s:
                s.ehlo("laptop.test")
                assert "starttls" not in s.esmtp_features
                return s.sendmail("a@laptop.test", ["b@example.net"], MESSAGE)
        assert await asyncio.to_thread(send) == {}
        assert b"hello through certproxy server" in backend.received
        # Both ends close as soon as the MTA says goodbye (no half-open TLS lingering), each with one ok line.
        await session_line(caplog, count=2, timeout=5)
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("session ")]
        assert len(lines) == 2 and all("outcome=ok" in ln for ln in lines), lines


class TestNoLeftovers:
    @pytest.mark.parametrize("mode", ["tls", "starttls"])
    async def test_finished_sessions_leave_nothing_for_the_gc(self, certs, backend, server_service, client_service,
                                                             mode, caplog):
        """A session's objects are freed by reference counting when it ends: with uvloop, a reference
        cycle through a transport is never collected (RSS grew ~1.5 MB per 1000 sessions), and on
        asyncio each cycle kept a 256 KiB TLS buffer until a full collection."""
        import gc

        caplog.set_level(logging.INFO, "certproxy")
        srv = await server_service(mode, backend.endpoint)
        cli = await client_service(f"127.0.0.1:{srv.port}", mode=mode)

        def send():
            with smtplib.SMTP("127.0.0.1", cli.port, timeout=30) as s:
                return s.sendmail("a@laptop.test", ["b@example.net"], MESSAGE)

        def leftovers() -> int:  # a count: a list of them would itself keep them alive
            return sum(isinstance(o, (certproxy._Pump, certproxy._Splice)) for o in gc.get_objects())

        gc.collect()
        gc.disable()
        try:
            for i in range(5):
                assert await asyncio.to_thread(send) == {}
            await session_line(caplog, count=10)
            # The last session line is logged a moment before its task unwinds: wait (with a deadline)
            # until nothing of the sessions is left, then assert. The collector stays off throughout.
            deadline = asyncio.get_running_loop().time() + 5
            while (left := leftovers()) and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
        finally:
            gc.enable()
        assert left == 0, f"{left} pumps/splices kept alive after their sessions ended"


def test_demo_exits_zero():
    import subprocess
    import sys
    from pathlib import Path
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "certproxy.py"), "demo"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "delivered intact" in r.stdout and "outcome=ok" in r.stderr


def test_copied_file_runs_on_debian_12_packages(tmp_path):
    """The single file, copied alone, runs the whole chain on Debian 12's own python3, python3-openssl
    (pyOpenSSL 23.0) and python3-cryptography (38): no venv, no uvloop, warnings as errors."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    system = "/usr/bin/python3"
    probe = subprocess.run([system, "-I", "-c", "import OpenSSL, cryptography; print(OpenSSL.__version__)"],
                           capture_output=True, text=True) if os.path.exists(system) else None
    if probe is None or probe.returncode != 0:
        msg = "Debian's python3-openssl is not installed (apt-get install python3-openssl python3-cryptography)"
        if os.environ.get("CERTPROXY_REQUIRE_PEERS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    copy = tmp_path / "certproxy.py"
    shutil.copy(Path(__file__).resolve().parent.parent / "certproxy.py", copy)
    r = subprocess.run([system, "-I", "-W", "error", str(copy), "demo"], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "delivered intact" in r.stdout and "outcome=ok" in r.stderr and "Traceback" not in r.stderr
    # cryptography 38 has no verify_directly_issued_by: the signature check of --client-ca falls back
    # to the issuer's public key, and must still tell the CA from a look-alike with its name.
    check = """
import sys
sys.path.insert(0, ".")  # -I leaves the working directory out
import certproxy
from cryptography import x509
from cryptography.hazmat.primitives import serialization
def load(pem_pair):
    cert, key = pem_pair
    return x509.load_pem_x509_certificate(cert), serialization.load_pem_private_key(key, None)
for rsa in (False, True):
    ca, evil = load(certproxy.make_certificate("Team CA", ca=True, rsa=rsa)), load(certproxy.make_certificate("Team CA", ca=True))
    leaf = x509.load_pem_x509_certificate(certproxy.make_certificate("alice", usage="client", issuer=ca)[0])
    fake = x509.load_pem_x509_certificate(certproxy.make_certificate("alice", usage="client", issuer=evil)[0])
    assert certproxy._signed_by(leaf, ca[0]) and not certproxy._signed_by(fake, ca[0]), rsa
    assert certproxy._validity(leaf)[0] < certproxy._validity(leaf)[1]
print("ok")
"""
    r = subprocess.run([system, "-I", "-W", "error", "-c", check], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.stdout.strip() == "ok", r.stdout + r.stderr
    # The CA's life on cryptography 38 too: issue, renew, revoke (CRL builder), list, and a server
    # configuration that loads the CRL (its signature checked, its entries read).
    for argv in (["gencert", "mx.test", "--dir", "srv"], ["ca", "init", "--dir", "ca"],
                 ["ca", "issue", "alice", "--dir", "ca"], ["ca", "issue", "alice", "--renew", "--dir", "ca"], ["ca", "revoke", "alice", "--dir", "ca"],
                 ["ca", "list", "--dir", "ca"]):
        r = subprocess.run([system, "-I", "-W", "error", str(copy), *argv], capture_output=True, text=True,
                           timeout=60, cwd=tmp_path)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (argv, r.stdout + r.stderr)
    assert "ca/crl.pem: 2 revoked" in r.stdout, r.stdout
    (tmp_path / "c.toml").write_text('[server.mx]\ntls = true\nlisten = "127.0.0.1:0"\nbackend = "127.0.0.1:25"\n'
                                     'cert = "srv/mx.test.pem"\nkey = "srv/mx.test.key"\n'
                                     'client-ca = "ca/ca.pem"\ncrl = ["ca/crl.pem"]\n')
    r = subprocess.run([system, "-I", "-W", "error", str(copy), "check", "c.toml"], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("ok  [mx] server"), r.stdout + r.stderr


class TestBackpressure:
    async def test_backend_that_stops_reading_stalls_the_client(self, certs, server_service):
        """A slow side never makes memory grow without bound: with a backend that reads nothing, the
        client can push only what the kernel buffers and the proxy's bounded write buffers hold."""
        import socket

        release = asyncio.Event()

        async def stuck(reader, writer):
            writer.write(b"220 stuck.test ESMTP\r\n")
            await release.wait()
            writer.close()

        backend = await asyncio.start_server(stuck, "127.0.0.1", 0)
        svc = await server_service("tls", f"127.0.0.1:{backend.sockets[0].getsockname()[1]}")
        attempt = 96 * 2**20

        def push() -> int:
            ctx = client_ctx(certs, certs.client)
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", svc.port), timeout=20),
                                 server_hostname="localhost") as s:
                assert s.recv(100).startswith(b"220 stuck.test")
                s.settimeout(3)
                sent, chunk = 0, b"x" * 65536
                try:
                    while sent < attempt:
                        sent += s.send(chunk)
                except (TimeoutError, OSError):
                    pass
                return sent

        sent = await asyncio.to_thread(push)
        release.set()
        backend.close()
        await backend.wait_closed()
        print(f"client pushed {sent / 2**20:.1f} MiB before stalling")
        # Kernel socket buffers on the path hold about 20 MB here; the proxy adds ~64 KiB per side.
        assert sent < 40 * 2**20, f"proxy swallowed {sent / 2**20:.1f} MiB for a backend that reads nothing"
