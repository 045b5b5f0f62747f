"""Years of certificates: a private CA that revokes (ca revoke → crl.pem → server --crl, reloaded on
SIGHUP), --deny-fingerprint, the CA's index (ca list), and renewals that keep SPKI pins valid."""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
import signal
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import certproxy
from conftest import CertPair, client_ctx, read_reply, session_line
from realpeers import Process, free_port, require_tool
from test_judge import facts_of, near_miss
from test_server import smtplib_send, tls_open

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "certproxy.py"), *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def pair(d: Path, name: str) -> CertPair:
    return CertPair(d / f"{name}.pem", d / f"{name}.key")


def tls_greeting(port: int, pair: CertPair) -> bytes:
    """What an implicit-TLS client presenting ``pair`` hears first (the 554 of a refusal, or the MTA's 220)."""
    ctx = client_ctx(None, pair)
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as s:
        return s.recv(1024)


@pytest.fixture
def team(tmp_path) -> Path:
    """A private CA in tmp/ca with alice and bob issued, and an (empty) CRL."""
    d = tmp_path / "ca"
    ok(cli("ca", "init", "--dir", str(d)))
    for name in ("alice", "bob"):
        ok(cli("ca", "issue", name, "--dir", str(d)))
    ok(cli("ca", "crl", "--dir", str(d)))
    return d


class TestRevokeWhileServing:
    def test_open_session_finishes_the_next_is_refused(self, tmp_path, certs, team, sink_mta):
        """The user's story: a laptop is stolen while it has a session open. `ca revoke alice` and a
        SIGHUP: the open session still delivers, alice's next connection hears 554 ... revoked, bob is
        not affected, and the refusal's line names alice's certificate."""
        port = free_port()
        proc = Process([sys.executable, str(ROOT / "certproxy.py"), "server", "--tls",
                        "--listen", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{sink_mta.port}",
                        "--cert", str(certs.server.cert), "--key", str(certs.server.key),
                        "--client-ca", str(team / "ca.pem"), "--crl", str(team / "crl.pem"),
                        "--hostname", "mx.certproxy.test"], port, tmp_path / "server.log")
        alice = pair(team, "alice")
        try:
            live = smtplib.SMTP_SSL("127.0.0.1", port, context=client_ctx(None, alice), timeout=20)
            live.ehlo("alice.test")
            assert live.mail("alice@laptop.test")[0] == 250
            out = ok(cli("ca", "revoke", "alice", "--dir", str(team), "--reason", "keyCompromise"))
            assert re.search(r"^revoked alice serial [0-9A-F]+ \(keyCompromise\)$", out, re.M), out
            proc.proc.send_signal(signal.SIGHUP)
            assert "reload outcome=ok" in proc.wait_log("reload outcome=ok")
            today = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}"
            assert tls_greeting(port, alice) == f"554 5.7.1 certificate revoked on {today}\r\n".encode()
            assert tls_greeting(port, pair(team, "bob")).startswith(b"220 backend.test")
            # the session opened before the revocation finishes its mail
            assert live.rcpt("b@example.net")[0] == 250
            assert live.data(b"Subject: before the revocation\r\n\r\nstill delivered\r\n")[0] == 250
            live.quit()
            log = proc.wait_log("cert_name=alice backend", timeout=15)
        finally:
            proc.stop()
        assert [m[2] for m in sink_mta.messages] == [b"Subject: before the revocation\r\n\r\nstill delivered\r\n"]
        refused = [facts_of(line) for line in log.splitlines() if "outcome=refused" in line]
        assert len(refused) == 1, log
        assert refused[0]["cert_fp"] == alice.fp and refused[0]["cert_subject"] == "CN=alice", log
        assert refused[0]["reason"].startswith(f"certificate revoked on {today}") and "(keyCompromise)" in \
            refused[0]["reason"] and str(team / "crl.pem") in refused[0]["reason"], log
        allowed = [facts_of(line) for line in log.splitlines() if "cert=allowed" in line]
        assert {f["cert_name"] for f in allowed} == {"alice", "bob"}, log  # alice's live session, bob


class TestCRLFiles:
    def test_crl_of_another_ca_is_refused_at_start(self, tmp_path, certs, team):
        other = tmp_path / "other"
        ok(cli("ca", "init", "--dir", str(other), "--name", "certproxy private CA"))  # same name, other key
        ok(cli("ca", "crl", "--dir", str(other)))
        third = tmp_path / "third"
        ok(cli("ca", "init", "--dir", str(third), "--name", "Another CA"))
        ok(cli("ca", "crl", "--dir", str(third)))
        base = ["server", "--tls", "--listen", f"127.0.0.1:{free_port()}", "--backend", "127.0.0.1:1",
                "--cert", str(certs.server.cert), "--key", str(certs.server.key), "--client-ca", str(team / "ca.pem")]
        r = cli(*base, "--crl", str(third / "crl.pem"))
        assert r.returncode == 2 and r.stderr == (
            f"certproxy: error: --crl: '{third / 'crl.pem'}' is issued by CN=Another CA, which is not a --client-ca "
            "certificate: a CRL from another CA\n"), r.stderr
        r = cli(*base, "--crl", str(other / "crl.pem"))
        assert r.returncode == 2 and "its signature does not verify with the --client-ca of that name" in r.stderr, \
            r.stderr
        r = cli(*base, "--crl", str(team / "ca.pem"))
        assert r.returncode == 2 and "is not an X.509 CRL (PEM or DER)" in r.stderr, r.stderr
        r = cli(*base, "--crl", str(tmp_path / "missing.pem"))
        assert r.returncode == 2 and "--crl: cannot read" in r.stderr and "No such file" in r.stderr, r.stderr

    def test_crl_needs_client_ca(self, certs, team):
        r = cli("server", "--tls", "--backend", "127.0.0.1:1", "--cert", str(certs.server.cert), "--key",
                str(certs.server.key), "--allow", str(certs.client.cert), "--crl", str(team / "crl.pem"))
        assert r.returncode == 2 and r.stderr.startswith("certproxy: error: --crl: needs --client-ca"), r.stderr
        assert "--deny-fingerprint" in r.stderr

    def test_openssl_reads_the_crl(self, team):
        """A standard X.509 CRL: OpenSSL (what Postfix, Exim and stunnel use) verifies its signature and
        finds the revoked certificate, and leaves the other one alone."""
        require_tool("openssl")
        ok(cli("ca", "revoke", str(team / "alice.pem"), "--dir", str(team)))
        crl, ca = str(team / "crl.pem"), str(team / "ca.pem")
        r = subprocess.run(["openssl", "crl", "-in", crl, "-CAfile", ca, "-noout"], capture_output=True, text=True)
        assert r.returncode == 0 and "verify OK" in r.stdout + r.stderr, r.stdout + r.stderr
        verify = ["openssl", "verify", "-crl_check", "-CAfile", ca, "-CRLfile", crl]
        r = subprocess.run([*verify, str(team / "alice.pem")], capture_output=True, text=True)
        assert r.returncode != 0 and "certificate revoked" in r.stdout + r.stderr, r.stdout + r.stderr
        r = subprocess.run([*verify, str(team / "bob.pem")], capture_output=True, text=True)
        assert r.returncode == 0 and ": OK" in r.stdout, r.stdout + r.stderr

    async def test_outdated_crl_is_a_loud_warning_not_an_outage(self, tmp_path, certs, team, server_service, sink,
                                                                caplog):
        """A CRL past its nextUpdate: logged at ERROR with what to do, still enforced, everyone else served;
        `check` says so as a note, not an error."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization

        ca_cert, ca_key = certproxy._load_ca(str(team))
        alice = x509.load_pem_x509_certificate((team / "alice.pem").read_bytes())
        now = datetime.datetime.now(datetime.timezone.utc)
        revoked = x509.RevokedCertificateBuilder().serial_number(alice.serial_number).revocation_date(
            now - datetime.timedelta(days=40)).build()
        crl = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now - datetime.timedelta(days=40)).next_update(now - datetime.timedelta(days=3))
               .add_revoked_certificate(revoked).sign(ca_key, hashes.SHA256()))
        old = tmp_path / "old-crl.pem"
        old.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        caplog.set_level(logging.INFO, "certproxy")
        backend = await sink("backend.test")
        svc = await server_service("tls", backend.endpoint, allow=[], client_ca=str(team / "ca.pem"), crl=(str(old),))
        due = f"{now - datetime.timedelta(days=3):%Y-%m-%d}"
        async with asyncio.timeout(10):
            while not any(r.getMessage().startswith("crl ") for r in caplog.records):
                await asyncio.sleep(0.02)
        warning = next(r for r in caplog.records if r.getMessage().startswith("crl "))
        assert warning.levelno == logging.ERROR
        assert f'problem="OUTDATED since {due} (its nextUpdate); still enforced"' in warning.getMessage()
        assert "certproxy ca crl --dir CA_DIR" in warning.getMessage()
        with pytest.raises(smtplib.SMTPConnectError) as refused:  # alice: greeted with the 554
            await asyncio.to_thread(smtplib_send, svc.port, "tls", client_ctx(certs, pair(team, "alice")))
        revoked_on = f"{now - datetime.timedelta(days=40):%Y-%m-%d}"
        assert refused.value.args == (554, f"5.7.1 certificate revoked on {revoked_on}".encode())
        assert await asyncio.to_thread(smtplib_send, svc.port, "tls", client_ctx(certs, pair(team, "bob"))) == {}
        assert len(backend.messages) == 1
        conf = tmp_path / "c.toml"
        conf.write_text(f'[server.mx]\ntls = true\nlisten = "127.0.0.1:{free_port()}"\nbackend = "127.0.0.1:25"\n'
                        f'cert = "{certs.server.cert}"\nkey = "{certs.server.key}"\n'
                        f'client-ca = "{team / "ca.pem"}"\ncrl = ["{old}"]\n')
        r = cli("check", str(conf))
        assert r.returncode == 0, r.stderr
        assert f"note: {conf} [mx] --crl: {old} OUTDATED since {due} (its nextUpdate); still enforced" in r.stderr


class TestDenyFingerprint:
    @pytest.mark.parametrize("by", ["certificate", "key"])
    async def test_denied_allow_certificate_is_refused(self, certs, server_service, sink, caplog, by):
        caplog.set_level(logging.INFO, "certproxy")
        backend = await sink("backend.test")
        fp = certs.client.fp if by == "certificate" else certs.client.spki
        svc = await server_service("tls", backend.endpoint, allow=[certs.client.cert, certs.other_client.cert],
                                   deny_fingerprints=certproxy.Pins.parse([f"{fp} stolen"], "--deny-fingerprint",
                                                                          named=True))
        assert await asyncio.to_thread(tls_greeting, svc.port, certs.client) == b"554 5.7.1 certificate revoked\r\n"
        line = facts_of(await session_line(caplog))
        assert line["outcome"] == "refused" and line["cert_fp"] == certs.client.fp, line
        assert line["reason"] == "certificate (or its key) is in --deny-fingerprint", line
        assert (await asyncio.to_thread(tls_greeting, svc.port, certs.other_client)).startswith(b"220 backend.test")
        assert backend.connections == 1

    async def test_near_miss_deny_denies_nothing(self, certs, server_service, sink):
        backend = await sink("backend.test")
        svc = await server_service("tls", backend.endpoint, deny_fingerprints=certproxy.Pins.parse(
            [near_miss(certs.client.fp), near_miss(certs.client.spki)], "--deny-fingerprint"))
        assert (await asyncio.to_thread(tls_greeting, svc.port, certs.client)).startswith(b"220 backend.test")

    async def test_denied_client_goes_to_the_untrusted_backend_under_optional(self, certs, server_service, sink,
                                                                            caplog):
        caplog.set_level(logging.INFO, "certproxy")
        trusted, untrusted = await sink("trusted.test", proxy=True), await sink("untrusted.test", proxy=True)
        svc = await server_service("tls", trusted.endpoint, client_cert="optional", proxy_protocol="v1",
                                   untrusted_backend=certproxy.Endpoint.parse(untrusted.endpoint, "x"),
                                   deny_fingerprints=certproxy.Pins.parse([certs.client.fp], "--deny-fingerprint"))
        assert await asyncio.to_thread(smtplib_send, svc.port, "tls", client_ctx(certs, certs.client)) == {}
        line = facts_of(await session_line(caplog))
        assert trusted.connections == 0 and len(untrusted.messages) == 1
        assert line["backend"] == untrusted.endpoint and line["cert"] == "refused", line
        assert line["untrusted"] == "certificate (or its key) is in --deny-fingerprint", line


class TestIndexAndRenewal:
    def test_ca_list_after_issue_renew_and_revoke(self, tmp_path):
        d = tmp_path / "ca"
        ok(cli("ca", "init", "--dir", str(d)))
        assert "no certificates issued yet" in ok(cli("ca", "list", "--dir", str(d)))
        ok(cli("ca", "issue", "alice", "--dir", str(d)))
        first = certproxy._pem_to_der(str(d / "alice.pem"))[0]
        out = ok(cli("ca", "issue", "alice", "--renew", "--dir", str(d)))
        assert "Same key as before: SPKI pins" in out, out
        renewed = certproxy._pem_to_der(str(d / "alice.pem"))[0]
        ok(cli("ca", "issue", "bob", "--dir", str(d), "--days", "10"))
        ok(cli("ca", "issue", "carol", "--dir", str(d)))
        ok(cli("ca", "revoke", "carol", "--dir", str(d), "--reason", "cessation-of-operation"))
        out = ok(cli("ca", "list", "--dir", str(d)))
        header, *lines = [line for line in out.splitlines() if line.strip()]
        assert header.split() == ["NAME", "SERIAL", "SHA-256", "NOT", "AFTER", "STATE", "WARNING"], out
        rows = {}
        for line in lines[:-1]:
            cells = re.split(r"\s{2,}", line.strip())
            rows.setdefault(cells[0], []).append(cells)
        assert lines[-1] == f"{d / 'crl.pem'}: 1 revoked", out
        assert [r[2] for r in rows["alice"]] == [certproxy.format_fingerprint(certproxy.cert_fingerprint(der))
                                                 for der in (first, renewed)], out
        assert [r[4] for r in rows["alice"]] == ["valid", "valid"], out  # the renewal does not end the old one
        assert rows["bob"][0][4:] == ["valid", "expires in 9 days"], out
        assert rows["carol"][0][4].startswith("revoked ") and rows["carol"][0][4].endswith(
            "(cessationOfOperation)"), out
        serials = [r[1] for rs in rows.values() for r in rs]
        assert len(set(serials)) == 4 and all(re.fullmatch(r"[0-9A-F]+", s) for s in serials), out
        index = (d / "index.txt").read_text().splitlines()  # OpenSSL's ca format, which 'openssl ca' reads
        assert [line.split("\t")[0] for line in index] == ["V", "V", "V", "R"], index
        assert index[3].split("\t")[5] == "/CN=carol" and index[3].split("\t")[2].endswith(",cessationOfOperation")

    def test_revoke_by_name_ends_every_valid_certificate_of_that_name(self, tmp_path, team):
        ok(cli("ca", "issue", "alice", "--renew", "--dir", str(team)))
        out = ok(cli("ca", "revoke", "alice", "--dir", str(team)))
        assert len(re.findall(r"^revoked alice serial", out, re.M)) == 2, out
        r = cli("ca", "revoke", "alice", "--dir", str(team))
        assert r.returncode == 2 and "no valid certificate named 'alice'" in r.stderr, r.stderr

    def test_revoke_a_file_from_another_ca_says_what_to_do_instead(self, certs, team):
        r = cli("ca", "revoke", str(certs.client.cert), "--dir", str(team))
        assert r.returncode == 2, r.stdout
        assert f"was not issued by this CA (CN=certproxy private CA): nothing to revoke here; on the server, " \
               f"--deny-fingerprint {certs.client.fp}" in r.stderr, r.stderr

    def test_bad_reason_names_the_choices(self, team):
        r = cli("ca", "revoke", "alice", "--dir", str(team), "--reason", "stolen")
        assert r.returncode == 2 and "--reason: 'stolen': expected one of unspecified, keyCompromise" in r.stderr

    @pytest.mark.parametrize("new_key", [False, True], ids=["same-key", "new-key"])
    async def test_renewal_and_an_spki_pin(self, certs, team, server_service, sink, new_key):
        """--allow-fingerprint names alice's key: her renewal matches it; a renewal with --new-key does not
        (and is told so when it is made)."""
        spki = pair(team, "alice").spki
        out = ok(cli("ca", "issue", "alice", "--renew", "--dir", str(team), *(["--new-key"] if new_key else [])))
        assert ("New key: every pin and allow entry" in out) is new_key, out
        renewed = pair(team, "alice")
        assert (renewed.spki == spki) is not new_key
        backend = await sink("backend.test")
        svc = await server_service("tls", backend.endpoint, allow=[], client_ca=str(team / "ca.pem"),
                                   allow_fingerprints=certproxy.Pins.parse([f"{spki} alice"], "--allow-fingerprint",
                                                                           named=True))
        greeting = await asyncio.to_thread(tls_greeting, svc.port, renewed)
        if new_key:
            assert greeting == b"554 5.7.1 certificate not authorised\r\n"
        else:
            assert greeting.startswith(b"220 backend.test")

    def test_gencert_renew_keeps_a_servers_spki_pin(self, tmp_path):
        d = tmp_path / "certs"
        ok(cli("gencert", "mx.example.net", "--dir", str(d), "--days", "5"))
        before = pair(d, "mx.example.net")
        spki, fp = before.spki, before.fp
        out = ok(cli("gencert", "mx.example.net", "--renew", "--dir", str(d)))
        after = pair(d, "mx.example.net")
        assert after.spki == spki and after.fp != fp
        assert f"--pin {spki} to keep the pin across renewals" in out and "Same key as before" in out, out
        summary = certproxy.certificate_summary(certproxy._pem_to_der(str(after.cert))[0])
        assert summary["sans"] == "mx.example.net" and int(summary["days_left"]) >= 824, summary
        r = cli("gencert", "nothing-here", "--renew", "--dir", str(d))
        assert r.returncode == 2 and "nothing to renew" in r.stderr, r.stderr
        r = cli("gencert", "mx.example.net", "--new-key", "--dir", str(d))
        assert r.returncode == 2 and "--new-key: only with --renew" in r.stderr, r.stderr

    def test_gencert_renew_of_a_ca_issued_certificate_points_at_the_ca(self, team):
        r = cli("gencert", "alice", "--renew", "--dir", str(team))
        assert r.returncode == 2 and "renew it from that CA (certproxy ca issue alice --renew --dir CA_DIR)" in r.stderr


def test_check_list_shows_what_is_shut_out(tmp_path, certs, team):
    ok(cli("ca", "revoke", "alice", "--dir", str(team)))
    conf = tmp_path / "c.toml"
    conf.write_text(f'[server.mx]\ntls = true\nlisten = "127.0.0.1:{free_port()}"\nbackend = "127.0.0.1:25"\n'
                    f'cert = "{certs.server.cert}"\nkey = "{certs.server.key}"\nclient-ca = "{team / "ca.pem"}"\n'
                    f'crl = ["{team / "crl.pem"}"]\ndeny-fingerprint = ["{certs.client.spki} stolen"]\n')
    out = ok(cli("check", "--list", str(conf)))
    assert f"    --deny-fingerprint stolen                   {certs.client.spki}\n" in out, out
    assert re.search(rf"^    --crl              {re.escape(str(team / 'crl.pem'))}: 1 revoked, next update "
                     r"\d{4}-\d\d-\d\d$", out, re.M), out


class TestSoftRefusal:
    """--soft-refusal: a certificate not (yet) allowed hears 454 4.7.x, so the sending MTA keeps the mail
    queued and retries (sendmail and Postfix bounce on the 554 at once); revoked stays 554."""

    @pytest.mark.parametrize("mode", ["tls", "starttls"])
    async def test_unknown_and_missing_certificates_hear_454(self, certs, server_service, sink, caplog, mode):
        caplog.set_level(logging.INFO, "certproxy")
        backend = await sink("backend.test")
        svc = await server_service(mode, backend.endpoint, soft_refusal=True,
                                   deny_fingerprints=certproxy.Pins.parse([certs.client.fp], "--deny-fingerprint"))
        for presented, reply in ((certs.other_client, b"454 4.7.1 certificate not authorised; try again later\r\n"),
                                 (None, b"454 4.7.0 client certificate required; try again later\r\n"),
                                 (certs.client, b"554 5.7.1 certificate revoked\r\n")):
            reader, writer, greeting = await tls_open(svc.port, mode, client_ctx(certs, presented))
            if mode == "tls":
                assert greeting == reply
            writer.write(b"EHLO laptop.test\r\nMAIL FROM:<a@laptop.test>\r\n")
            assert await read_reply(reader) == reply
            assert await read_reply(reader) == reply
            writer.write(b"QUIT\r\n")
            assert (await read_reply(reader)).startswith(b"221 ")
            writer.close()
            line = facts_of(await session_line(caplog))
            caplog.clear()
            told = reply.decode().strip() if reply.startswith(b"454") else None  # a 554 is the usual: not repeated
            assert line["outcome"] == "refused" and line.get("reply") == told, line
        assert backend.connections == 0

    async def test_certproxy_client_names_the_soft_refusal(self, certs, server_service, client_service, sink, caplog):
        """The laptop's certproxy client takes the 454 for what it is: its certificate refused, with the
        fingerprint the server admin needs; the mail program gets a 421 and keeps the mail."""
        caplog.set_level(logging.INFO, "certproxy")
        backend = await sink("backend.test")
        svc = await server_service("tls", backend.endpoint, allow=[certs.other_client.cert], soft_refusal=True)
        client = await client_service(f"127.0.0.1:{svc.port}", mode="tls")
        with pytest.raises(smtplib.SMTPConnectError) as e:
            await asyncio.to_thread(smtplib.SMTP, "127.0.0.1", client.port, timeout=20)
        assert e.value.smtp_code == 421 and e.value.smtp_error == b"4.7.0 upstream refused our client certificate"
        async with asyncio.timeout(10):
            while not (lines := [r.getMessage() for r in caplog.records
                                 if r.getMessage().startswith("session ") and "service=client" in r.getMessage()]):
                await asyncio.sleep(0.02)
        assert "the server refused our client certificate (454 4.7.1 certificate not authorised; try again " \
               "later)" in lines[0] and certs.client.fp in lines[0], lines

    def test_only_with_required_certificates(self, certs):
        r = cli("server", "--tls", "--cert", str(certs.server.cert), "--key", str(certs.server.key),
                "--client-cert", "optional", "--untrusted-backend", "127.0.0.1:2", "--xclient",
                "--backend", "127.0.0.1:1", "--allow", str(certs.client.cert), "--soft-refusal")
        assert r.returncode == 2 and r.stderr.startswith("certproxy: error: --soft-refusal: with --client-cert "
                                                         "optional nobody is refused"), r.stderr


class TestCompromisedKeys:
    def test_key_compromise_revokes_every_certificate_of_the_key(self, team):
        """Revoking one file for keyCompromise also ends its same-key renewal; renewing that key again
        is refused (only --new-key); openssl's own reader agrees."""
        old = (team / "alice.pem").read_bytes()
        (team / "alice-old.pem").write_bytes(old)
        ok(cli("ca", "issue", "alice", "--renew", "--dir", str(team)))
        out = ok(cli("ca", "revoke", str(team / "alice-old.pem"), "--dir", str(team), "--reason", "keyCompromise"))
        assert len(re.findall(r"^revoked alice serial", out, re.M)) == 2, out
        r = cli("ca", "issue", "alice", "--renew", "--dir", str(team))
        assert r.returncode == 2 and "a certificate of this key was revoked" in r.stderr and "--new-key" in r.stderr
        ok(cli("ca", "issue", "alice", "--renew", "--new-key", "--dir", str(team)))
        require_tool("openssl")
        verify = ["openssl", "verify", "-crl_check", "-CAfile", str(team / "ca.pem"), "-CRLfile", str(team / "crl.pem")]
        for name, revoked in (("alice-old.pem", True), ("alice.pem", False), ("bob.pem", False)):
            r = subprocess.run([*verify, str(team / name)], capture_output=True, text=True)
            assert (r.returncode != 0) is revoked, (name, r.stdout + r.stderr)

    @pytest.mark.parametrize("reason", ["removeFromCRL", "certificateHold", "privilegeWithdrawn"])
    def test_reasons_openssl_would_not_enforce_are_refused(self, team, reason):
        r = cli("ca", "revoke", "alice", "--dir", str(team), "--reason", reason)
        assert r.returncode == 2 and r.stderr == (
            f"certproxy: error: --reason: '{reason}': expected one of unspecified, keyCompromise, cACompromise, "
            "affiliationChanged, superseded, cessationOfOperation\n"), r.stderr

    def test_openssl_ca_reads_the_index_after_a_renewal(self, tmp_path, team):
        """index.txt is OpenSSL's: 'openssl ca -gencrl' signs a CRL from it, with the renewal's two valid
        rows for one subject (index.txt.attr) and our crlnumber."""
        require_tool("openssl")
        ok(cli("ca", "issue", "alice", "--renew", "--dir", str(team)))
        ok(cli("ca", "revoke", "bob", "--dir", str(team), "--reason", "superseded"))
        conf = tmp_path / "openssl.cnf"
        conf.write_text(f"[ca]\ndefault_ca = team\n[team]\ndatabase = {team / 'index.txt'}\n"
                        f"crlnumber = {team / 'crlnumber'}\ncertificate = {team / 'ca.pem'}\n"
                        f"private_key = {team / 'ca.key'}\ndefault_md = sha256\ndefault_crl_days = 30\n")
        out = tmp_path / "openssl-crl.pem"
        r = subprocess.run(["openssl", "ca", "-config", str(conf), "-gencrl", "-out", str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        text = subprocess.run(["openssl", "crl", "-in", str(out), "-noout", "-text"], capture_output=True,
                              text=True).stdout
        assert text.count("Serial Number:") == 1 and "Superseded" in text, text


def _ca_chain(d: Path, *, crl_issuer_printable: bool = False):
    """Root → intermediate → leaf (the leaf's file carries the intermediate), and a CRL signed by the
    root revoking ``revoke``: returns a function writing (root.pem, bundle.pem, leaf pair, crl path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.name import _ASN1Type
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]

    def name(cn: str, printable: bool = False):
        kind = {"_type": _ASN1Type.PrintableString} if printable else {}
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn, **kind)])

    def make(cn: str, key, issuer: x509.Name, issuer_key, ca: bool):
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
             .not_valid_after(now + datetime.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False))
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True) \
            if ca else b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    root = make("Team Root", keys[0], name("Team Root"), keys[0], True)
    inter = make("Team Laptops", keys[1], root.subject, keys[0], True)
    leaf = make("alice", keys[2], inter.subject, keys[1], False)
    (d / "root.pem").write_bytes(pem(root))
    (d / "bundle.pem").write_bytes(pem(root) + pem(inter))
    (d / "inter.pem").write_bytes(pem(inter))
    (d / "alice.pem").write_bytes(pem(leaf) + pem(inter))
    (d / "alice.key").write_bytes(keys[2].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))

    def crl(issuer: str, revoked) -> Path:
        signer, signer_name = (keys[0], "Team Root") if issuer == "root" else (keys[1], "Team Laptops")
        entry = x509.RevokedCertificateBuilder().serial_number(revoked.serial_number).revocation_date(now).build()
        c = (x509.CertificateRevocationListBuilder().issuer_name(name(signer_name, crl_issuer_printable))
             .last_update(now - datetime.timedelta(minutes=5)).next_update(now + datetime.timedelta(days=30))
             .add_revoked_certificate(entry).sign(signer, hashes.SHA256()))
        path = d / f"{issuer}-crl.pem"
        path.write_bytes(c.public_bytes(serialization.Encoding.PEM))
        return path

    return CertPair(d / "alice.pem", d / "alice.key"), crl, inter, leaf


class TestRevocationMatching:
    """Found by review: a revocation must match however the names are encoded, and wherever in the
    chain the revoked certificate sits, trust anchors of a --client-ca bundle included."""

    @pytest.mark.parametrize("client_ca", ["root.pem", "bundle.pem"])
    async def test_revoked_intermediate(self, tmp_path, certs, server_service, sink, client_ca):
        alice, crl, inter, _ = _ca_chain(tmp_path)
        backend = await sink("backend.test")
        svc = await server_service("tls", backend.endpoint, allow=[], client_ca=str(tmp_path / client_ca),
                                   crl=(str(crl("root", inter)),))
        greeting = await asyncio.to_thread(tls_greeting, svc.port, alice)
        assert greeting.startswith(b"554 5.7.1 certificate revoked on "), greeting
        assert backend.connections == 0

    async def test_crl_issuer_in_another_string_type(self, tmp_path, certs, server_service, sink):
        """The CRL names its issuer as a PrintableString, the certificates as UTF8String: one CA (OpenSSL
        compares canonical names too)."""
        alice, crl, _, leaf = _ca_chain(tmp_path, crl_issuer_printable=True)
        backend = await sink("backend.test")
        path = crl("inter", leaf)
        svc = await server_service("tls", backend.endpoint, allow=[], client_ca=str(tmp_path / "bundle.pem"),
                                   crl=(str(path),))
        greeting = await asyncio.to_thread(tls_greeting, svc.port, alice)
        assert greeting.startswith(b"554 5.7.1 certificate revoked on "), greeting

    def test_a_connection_opened_before_the_reload_is_judged_by_the_new_policy(self, tmp_path, certs, team,
                                                                              sink_mta):
        """A thief who opens connections before `ca revoke` + SIGHUP and sends the certificate after it
        is refused: the handshake is judged by the policy of the moment, not of the accept."""
        port = free_port()
        proc = Process([sys.executable, str(ROOT / "certproxy.py"), "server", "--starttls",
                        "--listen", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{sink_mta.port}",
                        "--cert", str(certs.server.cert), "--key", str(certs.server.key),
                        "--client-ca", str(team / "ca.pem"), "--crl", str(team / "crl.pem")],
                       port, tmp_path / "server.log")
        try:
            early = smtplib.SMTP("127.0.0.1", port, timeout=20)
            early.ehlo("thief.test")
            ok(cli("ca", "revoke", "alice", "--dir", str(team)))
            proc.proc.send_signal(signal.SIGHUP)
            assert "reload outcome=ok" in proc.wait_log("reload outcome=ok")
            early.starttls(context=client_ctx(None, pair(team, "alice")))
            code, text = early.ehlo("thief.test")
            assert (code, text[:30]) == (554, b"5.7.1 certificate revoked on 2"), (code, text)
            early.close()
            proc.wait_log("outcome=refused")
        finally:
            proc.stop()
        assert sink_mta.connections == 0


async def test_deny_fingerprint_of_an_intermediate_shuts_out_what_it_issued(tmp_path, certs, server_service, sink):
    """--deny-fingerprint names a CA of the chain (a compromised intermediate, by certificate or key):
    every leaf it issued is refused; a near miss of it refuses nothing."""
    from cryptography.hazmat.primitives.serialization import Encoding

    alice, _, inter, _ = _ca_chain(tmp_path)
    backend = await sink("backend.test")
    inter_der = inter.public_bytes(Encoding.DER)
    for deny, refused in ((certproxy.format_fingerprint(certproxy.cert_fingerprint(inter_der)), True),
                          (certproxy.format_fingerprint(certproxy.spki_fingerprint(inter_der)), True),
                          (near_miss(certproxy.format_fingerprint(certproxy.cert_fingerprint(inter_der))), False)):
        svc = await server_service("tls", backend.endpoint, allow=[], client_ca=str(tmp_path / "root.pem"),
                                   deny_fingerprints=certproxy.Pins.parse([deny], "--deny-fingerprint"))
        greeting = await asyncio.to_thread(tls_greeting, svc.port, alice)
        assert greeting.startswith(b"554 5.7.1 certificate revoked\r\n" if refused else b"220 backend.test"), \
            (deny, greeting)
