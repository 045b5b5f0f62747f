"""Every mistake answered with its fix (issue 14, the points done so far): each test shows the exact
message an operator meets."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

import certproxy

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "certproxy.py"), *args], capture_output=True, text=True,
                          timeout=timeout)


class TestPinSpellings:
    DIGEST = hashlib.sha256(b"a certificate").digest()
    B64 = base64.b64encode(DIGEST).decode()

    @pytest.mark.parametrize("text", [B64, B64.rstrip("="), f"sha256//{B64}", f'pin-sha256="{B64}"',
                                      f'pin-sha256="{B64}";', DIGEST.hex(), DIGEST.hex().upper(),
                                      certproxy.format_fingerprint(DIGEST), f"SHA256 Fingerprint={DIGEST.hex(':')}"])
    def test_every_spelling_people_paste(self, text):
        assert certproxy.parse_fingerprint(text) == self.DIGEST

    @pytest.mark.parametrize("text, name", [
        (hashlib.sha1(b"x").hexdigest(), "a SHA-1"), (hashlib.sha1(b"x").digest().hex(":").upper(), "a SHA-1"),
        (hashlib.md5(b"x").hexdigest(), "an MD5"), (hashlib.md5(b"x").digest().hex(":"), "an MD5")])
    def test_the_wrong_hash_is_named(self, text, name):
        with pytest.raises(ValueError) as e:
            certproxy.parse_fingerprint(text)
        assert str(e.value) == (f"{text!r} is {name} fingerprint; certproxy needs the SHA-256 one: "
                                "openssl x509 -in CERT -noout -fingerprint -sha256, or certproxy fingerprint CERT")

    def test_on_the_command_line(self, certs):
        r = cli("client", "--upstream", "mx.example.org:587", "--cert", str(certs.client.cert),
                "--key", str(certs.client.key), "--pin", hashlib.sha1(b"x").hexdigest())
        assert r.returncode == 2 and "--pin: " in r.stderr and "is a SHA-1 fingerprint" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


class TestLogOptionsWhereverTheyAre:
    """--log-format / --log-level before the command, after it, or at the top of the config file."""

    @pytest.mark.parametrize("where", ["before", "after", "file"])
    def test_json_lines_from_each_place(self, tmp_path, certs, where):
        import json

        from realpeers import Process, free_port
        from test_ops import server_table

        port = free_port()
        conf = tmp_path / "c.toml"
        conf.write_text(('log-format = "json"\nlog-level = "info"\n' if where == "file" else "")
                        + server_table(certs, port, 25))
        args = {"before": ["--log-format", "json", "run", str(conf)], "after": ["run", str(conf), "--log-format", "json"],
                "file": ["run", str(conf)]}[where]
        proc = Process([sys.executable, str(ROOT / "certproxy.py"), *args], port, tmp_path / "run.log")
        try:
            text = proc.wait_log("listening")
        finally:
            proc.stop()
        first = json.loads(text.splitlines()[0])
        assert first["event"] == "listening" and first["service"] == "smtps", text

    def test_inside_a_table_is_named(self, tmp_path, certs):
        from test_ops import server_table

        conf = tmp_path / "c.toml"
        conf.write_text(server_table(certs, 2465, 25) + 'log-format = "json"\n')
        r = cli("check", str(conf))
        assert r.returncode == 2 and f"[server.smtps] --log-format: applies to the whole process: give it at the " \
            f"top of {conf}, before any table" in r.stderr, r.stderr

    def test_a_wrong_value_in_the_file_is_named(self, tmp_path, certs):
        from test_ops import server_table

        conf = tmp_path / "c.toml"
        conf.write_text('log-format = "xml"\n' + server_table(certs, 2465, 25))
        r = cli("check", str(conf))
        assert r.returncode == 2 and f"{conf} log-format: 'xml': expected one of text, json" in r.stderr, r.stderr


class TestKeyAndCertificateErrors:
    """Each mistake with a key or certificate named, never '[SSL] PEM lib'."""

    @pytest.fixture
    def files(self, tmp_path, certs):
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(certs.client.key.read_bytes(), None)
        enc = tmp_path / "enc.key"
        enc.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.BestAvailableEncryption(b"secret")))
        return {"cert": str(certs.client.cert), "key": str(certs.client.key), "other_key": str(certs.other_client.key),
                "enc": str(enc), "missing": str(tmp_path / "nope.pem"), "dir": str(tmp_path)}

    @pytest.mark.parametrize("cert, key, expected", [
        ("cert", None, "--key: '{cert}' holds no private key: give the key with --key FILE"),
        ("key", "cert", "--cert: '{key}' holds a private key, not a certificate: are --cert and --key swapped?"),
        ("cert", "cert", "--key: '{cert}' holds a certificate, not a private key: are --cert and --key swapped?"),
        ("cert", "other_key", "--key: the key '{other_key}' does not belong to the certificate '{cert}'"),
        ("cert", "enc", "--key: the key in '{enc}' is encrypted (it has a passphrase) and certproxy runs unattended: "
                        "decrypt it once with  openssl pkey -in {enc} -out {enc}.plain  and use that (mode 0600)"),
        ("missing", "key", "--cert: '{missing}' does not exist"),
        ("dir", "key", "--cert: '{dir}' is a directory, not a PEM file"),
    ])
    def test_named(self, files, cert, key, expected):
        argv = ["client", "--upstream", "mx.example.org:587", "--pin", "AA" * 32, "--cert", files[cert]]
        r = cli(*argv, *(["--key", files[key]] if key else []))
        assert r.returncode == 2 and r.stderr == f"certproxy: error: {expected.format(**files)}\n", r.stderr

    def test_unreadable_message(self, monkeypatch, tmp_path):
        def denied(*a, **k):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr("builtins.open", denied)
        with pytest.raises(certproxy.ConfigError) as e:
            certproxy._read_file(str(tmp_path / "k.pem"), "--key")
        assert str(e.value).startswith(f"--key: cannot read '{tmp_path / 'k.pem'}': permission denied for user ")


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """A private CA (Team CA) and two laptop certificates: one it issued, one self-signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from conftest import CertPair

    d = tmp_path_factory.mktemp("team")
    ca_pem, ca_key = certproxy.make_certificate("Team CA", ca=True)
    (d / "ca.pem").write_bytes(ca_pem)
    issuer = (x509.load_pem_x509_certificate(ca_pem), load_pem_private_key(ca_key, None))
    out = {"ca": d / "ca.pem"}
    for name, kw in (("alice", {"issuer": issuer}), ("stranger", {})):
        cert, key = certproxy.make_certificate(name, usage="client", **kw)
        (d / f"{name}.pem").write_bytes(cert)
        (d / f"{name}.key").write_bytes(key)
        out[name] = CertPair(d / f"{name}.pem", d / f"{name}.key")
    return out


class TestProbeWithACertificate:
    """probe --cert/--key tells whether the server accepts that client certificate, and which CA names
    it asked for, before anything is configured on the laptop."""

    @pytest.mark.parametrize("mode", ["tls", "starttls"])
    @pytest.mark.parametrize("who, verdict", [("alice", "accepted (the server answered inside TLS: "),
                                              ("stranger", "REFUSED, the server says: ")])
    async def test_verdict_and_ca_names(self, certs, team, server_service, sink, mode, who, verdict):
        import asyncio

        backend = await sink("backend.test")
        svc = await server_service(mode, backend.endpoint, allow=[], client_ca=str(team["ca"]))
        r = await asyncio.to_thread(cli, "probe", f"127.0.0.1:{svc.port}", f"--{mode}", "--cert",
                                    str(team[who].cert), "--key", str(team[who].key))
        assert r.returncode == 0, r.stderr
        assert "asked for a client certificate: yes (CA names: CN=Team CA)" in r.stdout, r.stdout
        assert f"our client certificate: {verdict}" in r.stdout, r.stdout
        if who == "stranger":
            assert "REFUSED, the server says: 554 5.7.1 certificate not authorised" in r.stdout, r.stdout


class TestLaptopLearnsItWasRefused:
    """When the server refuses the laptop's certificate, the laptop's own log says so, with the laptop's
    fingerprint and what the server's admin must add; never outcome=ok, and the mail program gets a 421
    (the message stays queued)."""

    @pytest.mark.parametrize("mode", ["tls", "starttls"])
    async def test_the_line_to_paste(self, certs, team, server_service, sink, caplog, mode):
        import asyncio
        import logging

        from conftest import read_reply, session_line

        caplog.set_level(logging.INFO, "certproxy")
        backend = await sink("backend.test")
        srv = await server_service(mode, backend.endpoint)  # allows certs.client only
        ep = certproxy.Endpoint(host="127.0.0.1", port=srv.port)
        cli_svc = certproxy.ClientService(certproxy.ClientConfig(
            listen=certproxy.Endpoint(host="127.0.0.1", port=0),
            upstreams=(certproxy.Upstream(endpoint=ep, mode=certproxy.upstream_mode(ep, mode == "starttls", mode == "tls")),),
            cert=str(team["stranger"].cert), key=str(team["stranger"].key),
            pins=certproxy.Pins.parse([certs.server.fp], "--pin"), server_name="localhost"))
        await cli_svc.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", cli_svc.port)
            assert await read_reply(reader) == b"421 4.7.0 upstream refused our client certificate\r\n"
            writer.close()
        finally:
            await cli_svc.stop(grace=5)
        fp = team["stranger"].fp
        lines = [await session_line(caplog, i, count=2) for i in (0, 1)]
        line = next(ln for ln in lines if "service=client" in ln)
        assert "outcome=refused" in line and "outcome=ok" not in line, line
        assert (f"the server refused our client certificate (554 5.7.1 certificate not authorised); our certificate "
                f"is sha256 {fp}: the server's admin must allow it (certproxy server --allow-fingerprint {fp}, "
                f"or Postfix relay_clientcerts '{fp} laptop')") in line, line
        assert backend.connections == 0


class TestWhoMayRelay:
    def test_check_list(self, tmp_path, certs, team):
        """certproxy check --list: who can relay through my server, with names, fingerprints and expiry."""
        from test_judge import _expired_certificate

        expired_cert, _ = _expired_certificate("old-laptop")
        (tmp_path / "old.pem").write_bytes(expired_cert)
        conf = tmp_path / "c.toml"
        conf.write_text(
            "[server.mx]\ntls = true\nlisten = \"127.0.0.1:2465\"\nbackend = \"127.0.0.1:25\"\n"
            f"cert = \"{certs.server.cert}\"\nkey = \"{certs.server.key}\"\n"
            f"allow = [\"{certs.client.cert}\", \"{tmp_path / 'old.pem'}\"]\nclient-ca = \"{team['ca']}\"\n"
            f"allow-fingerprint = [\"{certs.client.fp} laptop\", \"{team['alice'].spki} alice\"]\n"
            "[client.laptop]\nupstream = [\"mx.example.org:465\"]\n"
            f"cert = \"{certs.client.cert}\"\nkey = \"{certs.client.key}\"\npin = [\"{certs.server.fp}\"]\n")
        r = cli("check", "--list", str(conf))
        assert r.returncode == 0, r.stderr
        out = r.stdout
        assert f"--allow            laptop                   {certs.client.fp}  until " in out, out
        assert "--allow            old-laptop               " in out and "EXPIRED on" in out, out
        assert "--client-ca        any it issued: CN=Team CA" in out, out
        assert f"alice                    {team['alice'].spki}" in out, out
        assert f"--pin              (server or its key)      {certs.server.fp}" in out, out


class TestWrongTLSMode:
    """The TLS mode of an upstream mixed up: named with its fix within seconds, not a 60 s timeout or
    WRONG_VERSION_NUMBER (issue 14, point 3)."""

    @pytest.mark.parametrize("configured, actual, reply, reason", [
        ("starttls", "tls", b"421 4.7.0 upstream expects implicit TLS (add --tls)\r\n",
         "no SMTP greeting in 3 s, and the port answers a TLS ClientHello: it speaks implicit TLS; add --tls"),
        ("tls", "starttls", b"421 4.7.0 upstream expects STARTTLS (drop --tls)\r\n",
         "it greets in clear ('220 '...) instead of speaking TLS: it is a STARTTLS port; drop --tls, or say --starttls"),
    ])
    async def test_client_says_which_mode_the_upstream_speaks(self, client_service, aiosmtpd_upstream,
                                                              scripted_upstream, caplog, configured, actual, reply,
                                                              reason):
        import asyncio
        import logging

        from conftest import read_reply, session_line

        async def starttls_port(reader, writer, received):
            """A STARTTLS server greets in clear and takes a ClientHello for a bad command. (Not aiosmtpd
            here: when certproxy closes with its 500 unread, the kernel resets, and aiosmtpd leaves that
            ConnectionResetError in a future nobody retrieves.)"""
            writer.write(b"220 mx.certproxy.test ESMTP\r\n")
            while data := await reader.read(4096):
                received += data
                writer.write(b"500 5.5.2 Error: bad syntax\r\n")

        caplog.set_level(logging.INFO, "certproxy")
        up = aiosmtpd_upstream(actual) if actual == "tls" else await scripted_upstream(starttls_port)
        svc = await client_service(up.endpoint, mode=configured)
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        async with asyncio.timeout(15):  # the 60 s dialogue timeout would be the old answer
            assert await read_reply(reader) == reply
        writer.close()
        line = await session_line(caplog)
        assert reason in line and "outcome=refused" in line, line
        if actual == "tls":
            assert up.recorder.messages == []
        else:  # what reached the STARTTLS port: a TLS ClientHello, never a command in clear
            assert bytes(up.received[:1]) == b"\x16" and b"MAIL" not in up.received

    @pytest.mark.parametrize("actual", ["tls", "starttls"])
    async def test_probe_detects_the_mode(self, aiosmtpd_upstream, actual):
        import asyncio

        up = aiosmtpd_upstream(actual)
        wrong = "starttls" if actual == "tls" else "tls"
        # Port not 465: the default guess is STARTTLS, right or wrong.
        r = await asyncio.to_thread(cli, "probe", up.endpoint)
        assert r.returncode == 0, r.stderr
        first = r.stdout.splitlines()[0]
        if actual == "tls":
            assert first == f"{up.endpoint} (tls -- detected: no SMTP greeting in 3 s, and the port answers a TLS " \
                            "ClientHello; so tls, not starttls)", first
        else:
            assert first == f"{up.endpoint} (starttls)", first
        # Told the wrong one explicitly: the error says which it is.
        r = await asyncio.to_thread(cli, "probe", up.endpoint, f"--{wrong}")
        assert r.returncode == 1 and ("add --tls" if actual == "tls" else "drop --tls") in r.stderr, r.stderr


class TestPasteLinesFitTheCertificate:
    """gencert / ca issue print what the other side needs for the certificate's role (issue 14, point 8)."""

    def test_a_laptop(self, tmp_path):
        r = cli("gencert", "laptop", "--dir", str(tmp_path))
        assert r.returncode == 0, r.stderr
        fp = certproxy.format_fingerprint(certproxy.cert_fingerprint(certproxy._pem_to_der(str(tmp_path / "laptop.pem"))[0]))
        assert "This is a laptop's (client) certificate. On the mail server, one of:" in r.stdout
        assert f"certproxy server ... --allow {tmp_path / 'laptop.pem'}" in r.stdout
        assert f"      {fp} laptop" in r.stdout and fp.replace(":", "") in r.stdout
        assert "--pin" not in r.stdout, r.stdout

    @pytest.mark.parametrize("args", [["mx.example.org"], ["mx", "--san", "mail.example.org"], ["mx", "--role", "server"]])
    def test_a_server(self, tmp_path, args):
        r = cli("gencert", *args, "--dir", str(tmp_path))
        assert r.returncode == 0, r.stderr
        name = args[0]
        fp = certproxy.format_fingerprint(certproxy.cert_fingerprint(certproxy._pem_to_der(str(tmp_path / f"{name}.pem"))[0]))
        assert f"This is a mail server's certificate. On each laptop:\n    certproxy client ... --pin {fp}" in r.stdout
        assert "--allow" not in r.stdout and "relay_clientcerts" not in r.stdout, r.stdout

    def test_a_ca_issued_laptop(self, tmp_path):
        assert cli("ca", "init", "--dir", str(tmp_path)).returncode == 0
        r = cli("ca", "issue", "alice", "--dir", str(tmp_path))
        assert r.returncode == 0, r.stderr
        fp = certproxy.format_fingerprint(certproxy.cert_fingerprint(certproxy._pem_to_der(str(tmp_path / "alice.pem"))[0]))
        assert f"certproxy server ... --client-ca {tmp_path / 'ca.pem'} --allow-fingerprint '{fp} alice'" in r.stdout

    def test_the_demo_says_how_to_make_the_files_it_names(self):
        r = cli("demo")
        assert r.returncode == 0, r.stderr
        assert "certproxy gencert mail.example.org" in r.stdout and "certproxy gencert laptop" in r.stdout
        assert "--cert certs/mail.example.org.pem --key certs/mail.example.org.key --allow certs/laptop.pem" in r.stdout


class TestExpiredPinnedServer:
    async def test_the_session_line_warns(self, tmp_path, client_service, scripted_upstream, caplog):
        """Pinning makes an expired server certificate work; the laptop's log still says so."""
        import asyncio
        import logging
        import ssl

        from conftest import read_reply, session_line
        from test_judge import _expired_certificate

        caplog.set_level(logging.INFO, "certproxy")
        cert, key = _expired_certificate("mx.example.org")
        (tmp_path / "mx.pem").write_bytes(cert)
        (tmp_path / "mx.key").write_bytes(key)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tmp_path / "mx.pem", tmp_path / "mx.key")

        async def script(reader, writer, received):
            writer.write(b"220 mx ESMTP\r\n")
            while line := await reader.readline():
                received.extend(line)
                writer.write(b"221 bye\r\n" if line.startswith(b"QUIT") else b"250 ok\r\n")
                if line.startswith(b"QUIT"):
                    break

        up = await scripted_upstream(script, ssl=ctx)
        fp = certproxy.format_fingerprint(certproxy.cert_fingerprint(certproxy._pem_to_der(str(tmp_path / "mx.pem"))[0]))
        svc = await client_service(up.endpoint, mode="tls", pins=[fp])
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        assert (await read_reply(reader)).startswith(b"220 mx")
        writer.write(b"QUIT\r\n")
        assert (await read_reply(reader)).startswith(b"221")
        writer.close()
        line = await session_line(caplog)
        expired_on = certproxy._expired_on(certproxy._pem_to_der(str(tmp_path / "mx.pem"))[0])
        assert expired_on and "outcome=ok" in line, line
        assert f"the server's certificate expired on {expired_on}; the pin keeps it working" in line, line


def test_check_notes_an_unusual_tls_mode_for_the_port(tmp_path, certs):
    conf = tmp_path / "c.toml"
    conf.write_text(f'[client.laptop]\nupstream = ["mx.example.org:465"]\nstarttls = true\ncert = "{certs.client.cert}"\n'
                    f'key = "{certs.client.key}"\npin = ["{certs.server.fp}"]\nlisten = "127.0.0.1:0"\n'
                    f'[client.other]\nupstream = ["mx.example.org:587"]\ntls = true\ncert = "{certs.client.cert}"\n'
                    f'key = "{certs.client.key}"\npin = ["{certs.server.fp}"]\nlisten = "127.0.0.1:0"\n')
    r = cli("check", str(conf))
    assert r.returncode == 0, r.stderr
    assert "[laptop] --upstream mx.example.org:465: port 465 is implicit TLS (RFC 8314); with --starttls" in r.stderr
    assert "[other] --upstream mx.example.org:587: port 587 normally speaks STARTTLS; with --tls" in r.stderr
