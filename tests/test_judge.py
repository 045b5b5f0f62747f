"""certproxy server judges client certificates in Python, after a handshake that accepts any of them.

The TLS layer takes every client certificate; ClientPolicy decides afterwards, inside TLS, so a refused
client hears why in SMTP (554 5.7.1 ...) and the session line says which certificate it was and what
to do about it. Covered: an unknown self-signed certificate, a look-alike CA (same subject name,
another key), an expired --allow certificate, a near-miss --allow-fingerprint, the same strangers
routed to --untrusted-backend under --client-cert optional, no TLS resumption, alerts on handshake
failures, and certproxy client never showing its certificate to a server whose pin does not match."""

from __future__ import annotations

import asyncio
import datetime
import logging
import queue
import re
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

import certproxy
from conftest import CertPair, client_ctx, read_reply, session_line
from realpeers import require_tool
from test_server import smtplib_send, tls_open

NOT_AUTHORISED = b"554 5.7.1 certificate not authorised\r\n"
MODES = pytest.mark.parametrize("mode", ["tls", "starttls"])


def facts_of(line: str) -> dict[str, str]:
    """The key=value pairs of a log line, unquoted (the inverse of certproxy._kv)."""
    return {k: re.sub(r"\\(.)", r"\1", v[1:-1]) if v.startswith('"') else v
            for k, v in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)', line)}


def near_miss(fp: str) -> str:
    """``fp`` with its last hex digit changed: equal in all but one digit."""
    return fp[:-1] + ("0" if fp[-1] != "0" else "1")


def _save(d: Path, name: str, cert_pem: bytes, key_pem: bytes) -> CertPair:
    c, k = d / f"{name}.pem", d / f"{name}.key"
    c.write_bytes(cert_pem)
    k.write_bytes(key_pem)
    k.chmod(0o600)
    return CertPair(c, k)


def _expired_certificate(name: str) -> tuple[bytes, bytes]:
    """Self-signed EC P-256 client certificate that expired two days ago."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=10)).not_valid_after(now - datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


class ChainPair(CertPair):
    """A certificate file that holds the leaf and, behind it, the chain the client sends."""

    @property
    def der(self) -> bytes:
        return certproxy._pem_to_der(str(self.cert))[0]


def _leaf_without_key_ids(name: str, issuer) -> tuple[bytes, bytes]:
    """A client certificate signed by ``issuer`` = (cert, key) with no authority key identifier: OpenSSL
    then finds its issuer by name alone, takes the configured CA of that name, and its signature check
    fails inside the handshake (leaving an error on OpenSSL's queue). With the identifier (what
    make_certificate writes) the look-alike is simply an unknown issuer."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer[0].subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(issuer[1], hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


@dataclass
class JudgeCerts:
    good_ca: Path  # "CN=Team CA", the --client-ca
    mallory_evil: CertPair  # CN=mallory, issued by another "CN=Team CA" with another key
    mallory_evil_chain: CertPair  # the same, sending the look-alike CA certificate along
    mallory_evil_by_name: CertPair  # issued by the look-alike, no key identifier: OpenSSL's signature check fails
    mallory_good: CertPair  # CN=mallory, really issued by the --client-ca
    expired: CertPair  # CN=expired-laptop, self-signed, expired two days ago
    expired_on: str  # its notAfter date, YYYY-MM-DD


@pytest.fixture(scope="module")
def jc(tmp_path_factory) -> JudgeCerts:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    d = tmp_path_factory.mktemp("judge")
    cas = []
    for which in ("good", "evil"):
        pem, key = certproxy.make_certificate("Team CA", ca=True)
        (d / f"{which}-ca.pem").write_bytes(pem)
        cas.append((x509.load_pem_x509_certificate(pem), load_pem_private_key(key, None)))
    good, evil = cas
    assert good[0].subject == evil[0].subject and good[0].public_key() != evil[0].public_key()
    expired = _save(d, "expired-laptop", *_expired_certificate("expired-laptop"))
    evil_leaf, evil_key = certproxy.make_certificate("mallory", usage="client", issuer=evil)
    chain = _save(d, "mallory-evil-chain", evil_leaf + (d / "evil-ca.pem").read_bytes(), evil_key)
    return JudgeCerts(
        good_ca=d / "good-ca.pem",
        mallory_evil=_save(d, "mallory-evil", evil_leaf, evil_key),
        mallory_evil_chain=ChainPair(chain.cert, chain.key),
        mallory_evil_by_name=_save(d, "mallory-evil-by-name", *_leaf_without_key_ids("mallory", evil)),
        mallory_good=_save(d, "mallory-good", *certproxy.make_certificate("mallory", usage="client", issuer=good)),
        expired=expired,
        expired_on=f"{x509.load_pem_x509_certificate(expired.cert.read_bytes()).not_valid_after_utc:%Y-%m-%d}",
    )


@dataclass
class Case:
    """A client certificate the server must not let through to --backend, and the server set-up."""

    presented: CertPair
    config: dict  # server_service keyword arguments
    reply: bytes  # the answer to MAIL FROM under --client-cert required
    subject: str
    issuer: str
    reason: str = ""  # a piece of the session line's reason


def case(name: str, certs, jc: JudgeCerts) -> Case:
    if name == "unknown":
        return Case(certs.other_client, {}, NOT_AUTHORISED, "CN=stranger", "CN=stranger")
    lookalikes = {"lookalike": jc.mallory_evil, "lookalike-chain": jc.mallory_evil_chain,
                  "lookalike-by-name": jc.mallory_evil_by_name}
    if name in lookalikes:
        return Case(lookalikes[name], {"allow": [], "client_ca": str(jc.good_ca)}, NOT_AUTHORISED,
                    "CN=mallory", "CN=Team CA")
    if name == "expired":
        return Case(jc.expired, {"allow": [jc.expired.cert]},
                    f"554 5.7.1 certificate expired on {jc.expired_on}\r\n".encode(),
                    "CN=expired-laptop", "CN=expired-laptop", reason=f"expired on {jc.expired_on}")
    if name == "near-miss":
        return Case(jc.mallory_good, {"allow": [], "client_ca": str(jc.good_ca), "allow_fingerprints":
                                      certproxy.Pins.parse([near_miss(jc.mallory_good.fp)], "--allow-fingerprint")},
                    NOT_AUTHORISED, "CN=mallory", "CN=Team CA")
    raise ValueError(name)


async def assert_refused(certs, server_service, sink, caplog, mode: str, c: Case) -> dict[str, str]:
    """The client finishes the handshake and hears ``c.reply`` inside TLS: as the greeting in implicit
    TLS (RFC 5321 4.3.1), and to every command but QUIT (RFC 3207 4.1: EHLO, MAIL); the backend never
    hears of it and the session line names the certificate. Returns the line's facts."""
    caplog.set_level(logging.INFO, "certproxy")
    backend = await sink("backend.test")
    svc = await server_service(mode, backend.endpoint, **c.config)
    reader, writer, greeting = await tls_open(svc.port, mode, client_ctx(certs, c.presented))
    assert greeting == (c.reply if mode == "tls" else b"220 mx.certproxy.test ESMTP certproxy\r\n"), greeting
    writer.write(b"EHLO laptop.test\r\n")
    assert await read_reply(reader) == c.reply, "EHLO inside TLS"
    writer.write(b"MAIL FROM:<a@laptop.test>\r\n")
    assert await read_reply(reader) == c.reply
    writer.write(b"QUIT\r\n")
    assert (await read_reply(reader)).startswith(b"221 ")
    writer.close()
    line = await session_line(caplog)
    assert backend.connections == 0
    facts = facts_of(line)
    assert facts.get("outcome") == "refused" and facts.get("cert") == "refused", line
    assert facts.get("cert_fp") == c.presented.fp, line
    assert facts.get("cert_spki") == c.presented.spki, line
    assert facts.get("cert_subject") == c.subject and facts.get("cert_issuer") == c.issuer, line
    assert "--allow" in facts.get("action", ""), line  # --allow or --allow-fingerprint
    assert c.reason in facts.get("reason", ""), line
    return facts


class TestUnknownCertificates:
    @MODES
    async def test_self_signed_stranger_hears_554_inside_tls(self, certs, jc, server_service, sink, caplog, mode):
        await assert_refused(certs, server_service, sink, caplog, mode, case("unknown", certs, jc))

    @MODES
    async def test_near_miss_fingerprint_is_refused(self, certs, jc, server_service, sink, caplog, mode):
        """--client-ca issued it, --allow-fingerprint names a digest one hex digit away: refused."""
        await assert_refused(certs, server_service, sink, caplog, mode, case("near-miss", certs, jc))


class TestLookAlikeCA:
    @MODES
    @pytest.mark.parametrize("name", ["lookalike", "lookalike-chain", "lookalike-by-name"])
    async def test_same_ca_name_other_key_is_refused(self, certs, jc, server_service, sink, caplog, mode, name):
        """With the look-alike CA sent along, OpenSSL's signature check fails inside the handshake (and
        leaves an error behind on its queue): still a completed handshake and a 554 with the facts."""
        await assert_refused(certs, server_service, sink, caplog, mode, case(name, certs, jc))

    @MODES
    async def test_leaf_of_the_real_ca_is_allowed(self, certs, jc, server_service, sink, mode):
        """Control: the same CN, issued by the configured CA (the client presents only its leaf)."""
        backend = await sink("backend.test")
        svc = await server_service(mode, backend.endpoint, allow=[], client_ca=str(jc.good_ca))
        assert await asyncio.to_thread(smtplib_send, svc.port, mode, client_ctx(certs, jc.mallory_good)) == {}
        assert backend.connections == 1 and len(backend.messages) == 1


class TestExpired:
    @MODES
    async def test_expired_allow_certificate_is_told_its_date(self, certs, jc, server_service, sink, caplog, mode):
        await assert_refused(certs, server_service, sink, caplog, mode, case("expired", certs, jc))


class TestOptionalRouting:
    @MODES
    @pytest.mark.parametrize("name", ["unknown", "lookalike", "lookalike-chain", "lookalike-by-name", "expired"])
    async def test_stranger_lands_on_untrusted_backend(self, certs, jc, server_service, sink, caplog, mode, name):
        # _SinkMTA answers XCLIENT with 250, not the 220 certproxy waits for: tell it by PROXY v1 instead.
        caplog.set_level(logging.INFO, "certproxy")
        c = case(name, certs, jc)
        trusted, untrusted = await sink("trusted.test", proxy=True), await sink("untrusted.test", proxy=True)
        svc = await server_service(mode, trusted.endpoint, client_cert="optional", proxy_protocol="v1",
                                   untrusted_backend=certproxy.Endpoint.parse(untrusted.endpoint, "x"), **c.config)
        assert await asyncio.to_thread(smtplib_send, svc.port, mode, client_ctx(certs, c.presented)) == {}
        line = await session_line(caplog)
        assert len(untrusted.messages) == 1 and trusted.connections == 0
        facts = facts_of(line)
        assert facts.get("backend") == untrusted.endpoint and facts.get("outcome") == "ok", line


class TestResumption:
    @pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
    async def test_offered_session_gets_a_full_handshake(self, certs, server_service, sink, version):
        backend = await sink("backend.test")
        svc = await server_service("tls", backend.endpoint)
        ctx = client_ctx(certs, certs.client)
        ctx.minimum_version = ctx.maximum_version = version

        def connect(session=None):
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", svc.port), timeout=20),
                                 server_hostname="localhost", session=session) as s:
                greeting = s.recv(1024)  # read inside TLS: a TLS 1.3 ticket would have arrived by now
                s.sendall(b"QUIT\r\n")
                s.recv(1024)
                session, reused = s.session, s.session_reused
                try:
                    s.unwrap()  # close_notify: OpenSSL keeps only cleanly closed sessions resumable
                except (ssl.SSLError, OSError):
                    pass
                return session, reused, greeting

        session, reused, greeting = await asyncio.to_thread(connect)
        assert greeting.startswith(b"220 backend.test") and reused is False
        _, reused, greeting = await asyncio.to_thread(connect, session)
        assert greeting.startswith(b"220 backend.test")
        assert reused is False


class TestAlerts:
    @pytest.mark.parametrize("args", [
        ["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"],  # a protocol version the server refuses
        ["-tls1_2", "-cipher", "AES128-SHA256"],  # RSA key exchange only: no cipher in common with an EC key
    ], ids=["protocol-version", "no-shared-cipher"])
    async def test_openssl_s_client_sees_an_alert(self, certs, server_service, sink, caplog, args):
        require_tool("openssl")
        caplog.set_level(logging.INFO, "certproxy")
        backend = await sink("backend.test")
        svc = await server_service("tls", backend.endpoint)
        r = await asyncio.to_thread(subprocess.run, ["openssl", "s_client", "-connect", f"127.0.0.1:{svc.port}", *args,
                                                     "-cert", str(certs.client.cert), "-key", str(certs.client.key)],
                                    input=b"", capture_output=True, timeout=20)
        out = (r.stdout + r.stderr).decode(errors="replace")
        assert "alert" in out, out
        assert "220 " not in out, out
        line = await session_line(caplog)
        assert "outcome=refused" in line and backend.connections == 0, line


class _RecordingUpstream:
    """An implicit-TLS SMTP server in pyOpenSSL that records every client certificate it is shown
    (each call of its verify callback) and, per connection, how the handshake ended."""

    def __init__(self, certs, version: int) -> None:
        from OpenSSL import SSL

        self.seen: list[str] = []
        self.handshakes: queue.Queue[str] = queue.Queue()
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.use_certificate_chain_file(str(certs.server.cert))
        ctx.use_privatekey_file(str(certs.server.key))
        ctx.set_min_proto_version(version)
        ctx.set_max_proto_version(version)
        ctx.set_verify(SSL.VERIFY_PEER, self._verify)
        self.ctx = ctx
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _verify(self, conn, x509, errno, depth, ok) -> bool:
        from cryptography.hazmat.primitives import hashes

        self.seen.append(certproxy.format_fingerprint(x509.to_cryptography().fingerprint(hashes.SHA256())))
        return True  # any certificate: we only want to know whether one arrived

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.settimeout(None)
            self.socks.append(sock)
            t = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket) -> None:
        from OpenSSL import SSL

        conn = SSL.Connection(self.ctx, sock)
        conn.set_accept_state()
        try:
            conn.do_handshake()
        except (SSL.Error, OSError) as e:
            self.handshakes.put(f"failed: {e!r}")
            return
        self.handshakes.put("ok")
        try:
            conn.sendall(b"220 test ESMTP\r\n")
            buf = b""
            while True:
                while b"\r\n" not in buf:
                    buf += conn.recv(4096)
                line, buf = buf.split(b"\r\n", 1)
                verb = line[:4].upper()
                if verb == b"QUIT":
                    conn.sendall(b"221 2.0.0 Bye\r\n")
                    conn.shutdown()
                    return
                conn.sendall({b"EHLO": b"250-test\r\n250 8BITMIME\r\n", b"HELO": b"250 test\r\n",
                              b"NOOP": b"250 2.0.0 Ok\r\n"}.get(verb, b"502 5.5.2 not implemented\r\n"))
        except (SSL.Error, OSError):
            return

    async def handshake(self) -> str:
        """How the next connection's handshake ended, once it has."""
        return await asyncio.to_thread(self.handshakes.get, timeout=10)

    def stop(self) -> None:
        for s in [self.listener, *self.socks]:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the threads blocked in accept/recv
            except OSError:
                pass
            s.close()
        for t in self.threads:
            t.join(5)


class TestClientNeverShowsCertificate:
    @pytest.fixture(params=["tls1.2", "tls1.3"])
    def upstream(self, request, certs):
        from OpenSSL import SSL

        up = _RecordingUpstream(certs, {"tls1.2": SSL.TLS1_2_VERSION, "tls1.3": SSL.TLS1_3_VERSION}[request.param])
        yield up
        up.stop()

    async def test_pin_mismatch_keeps_the_certificate(self, certs, client_service, upstream, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        cli = await client_service(f"127.0.0.1:{upstream.port}", mode="tls", pins=[certs.other_server.fp])
        reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
        assert (await read_reply(reader)).startswith(b"421 4.7.0 ")
        writer.close()
        await upstream.handshake()
        assert upstream.seen == [], "certproxy client showed its certificate to a server that failed the pin"
        line = await session_line(caplog)
        assert certs.server.fp in line and "--pin" in line, line

    async def test_right_pin_shows_the_certificate(self, certs, client_service, upstream):
        """Control: the recording server does see a client certificate when the pin matches."""
        cli = await client_service(f"127.0.0.1:{upstream.port}", mode="tls", pins=[certs.server.fp])
        reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
        assert await read_reply(reader) == b"220 test ESMTP\r\n"
        writer.write(b"QUIT\r\n")
        assert (await read_reply(reader)).startswith(b"221 ")
        writer.close()
        assert await upstream.handshake() == "ok"
        assert certs.client.fp in upstream.seen


class TestPolicyItself:
    def test_signature_is_checked_again_in_python(self, jc):
        """Even if OpenSSL had found nothing wrong (error None), a chain whose leaf the CA did not sign
        is refused by ClientPolicy's own check: OpenSSL's verdict is one input, never the only gate."""
        from cryptography import x509

        good_ca_der = certproxy._pem_to_der(str(jc.good_ca))[0]
        policy = certproxy.ClientPolicy(frozenset(), frozenset({certproxy.cert_fingerprint(good_ca_der)}),
                                        certproxy.Pins(frozenset()))
        evil_leaf = certproxy._pem_to_der(str(jc.mallory_evil_by_name.cert))[0]
        good_leaf = certproxy._pem_to_der(str(jc.mallory_good.cert))[0]
        verdict = policy._judge(evil_leaf, [evil_leaf, good_ca_der], None)
        assert not verdict.allowed and "does not verify" in verdict.why, verdict
        assert policy._judge(good_leaf, [good_leaf, good_ca_der], None).allowed
        # A chain that ends anywhere but at a --client-ca certificate, or is the CA itself, is no CA path.
        assert not policy._judge(good_leaf, [good_leaf], None).allowed
        assert not policy._judge(good_ca_der, [good_ca_der], None).allowed
        assert x509.load_der_x509_certificate(evil_leaf).issuer == x509.load_der_x509_certificate(good_ca_der).subject


def _ca_chain(d: Path, *, permitted: str, intermediate_san: str) -> tuple[Path, Path, Path]:
    """A root constrained to ``permitted`` (name constraints), an intermediate whose own name is
    ``intermediate_san``, and a server leaf mail.example.com. Returns (root.pem, chain.pem, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def make(cn, issuer, *, ca, sans=(), constraint=None):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer[0].subject if issuer else name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        else:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), critical=False)
        if constraint:
            b = b.add_extension(x509.NameConstraints([x509.DNSName(constraint)], None), critical=True)
        return b.sign(issuer[1] if issuer else key, hashes.SHA256()), key

    root = make("NC Root", None, ca=True, constraint=permitted)
    inter = make("Int", root, ca=True, sans=(intermediate_san,))
    leaf = make("leaf", inter, ca=False, sans=("mail.example.com",))
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    (d / "root.pem").write_bytes(pem(root[0]))
    (d / "chain.pem").write_bytes(pem(leaf[0]) + pem(inter[0]))
    (d / "leaf.key").write_bytes(leaf[1].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return d / "root.pem", d / "chain.pem", d / "leaf.key"


class TestClientWithCA:
    @pytest.mark.parametrize("intermediate_san, trusted", [("relay.example.com", True), ("evil.org", False)])
    async def test_every_openssl_complaint_refuses(self, tmp_path, client_service, scripted_upstream, caplog,
                                                   intermediate_san, trusted):
        """With --ca the client refuses any chain OpenSSL finds fault with, at any depth: here an
        intermediate outside its root's name constraints, which OpenSSL reports only after it has
        checked the leaf. Nothing then reaches the upstream; the control chain passes."""
        caplog.set_level(logging.INFO, "certproxy")
        root, chain, key = _ca_chain(tmp_path, permitted="example.com", intermediate_san=intermediate_san)

        async def script(reader, writer, received):
            writer.write(b"220 upstream ESMTP\r\n")
            while line := await reader.readline():
                received.extend(line)
                writer.write(b"250 ok\r\n")

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(chain, key)
        up = await scripted_upstream(script, ssl=ctx)
        cli = await client_service(up.endpoint, mode="tls", pins=[], ca=str(root), server_name="mail.example.com")
        reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
        first = await read_reply(reader)
        if trusted:
            assert first == b"220 upstream ESMTP\r\n"
            writer.write(b"EHLO me\r\n")
            assert await read_reply(reader) == b"250 ok\r\n"
            assert bytes(up.received) == b"EHLO me\r\n"
        else:
            assert first == b"421 4.7.0 upstream certificate not trusted\r\n"
            writer.close()
            line = await session_line(caplog)
            assert "permitted subtree violation" in line and "depth 1" in line and "outcome=refused" in line, line
            assert up.received == b""
        writer.close()

    async def test_a_failing_check_is_a_refusal_not_a_crash(self, certs, client_service, aiosmtpd_upstream,
                                                              caplog, monkeypatch):
        """If checking the server's certificate raises (a certificate OpenSSL parses and cryptography
        cannot), the handshake fails closed, with an alert, a 421 and the reason in the log."""
        caplog.set_level(logging.INFO, "certproxy")
        up = aiosmtpd_upstream("tls")

        def broken(der: bytes) -> bytes:
            raise ValueError("unparsable")

        monkeypatch.setattr(certproxy, "spki_fingerprint", broken)  # reached for a pin that does not match
        cli = await client_service(up.endpoint, mode="tls", pins=[certs.other_server.fp])
        reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
        assert await read_reply(reader) == b"421 4.7.0 upstream certificate not trusted\r\n"
        writer.close()
        line = await session_line(caplog)
        assert "cannot check the peer's certificate (ValueError: unparsable)" in line, line
        assert up.recorder.messages == []
