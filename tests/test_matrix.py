"""The interoperability matrix: real mail clients into certproxy client, and real mail servers behind it.

Clients (plain SMTP into certproxy client, which relays with the laptop's certificate through a Postfix
that trusts only that certificate, ``relay_clientcerts``): msmtp, Python's smtplib, a second Postfix.
Servers (the upstream of certproxy client; swaks as the mail client): Exim 4.96 (STARTTLS and implicit
TLS, relaying only for the certificate's sha256), stunnel (``protocol = smtp``, ``verifyPeer``) in front
of smtp-sink. Every daemon is started here on free loopback ports and stopped by PID; every delivery is
asserted on the file the message became."""

from __future__ import annotations

import shutil
import smtplib
import socket
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from realpeers import (Exim, Postfix, PostfixRelayClient, Process, free_port, require_tool, smtp_sink,
                       stunnel, wait_files)

ROOT = Path(__file__).resolve().parent.parent


def certproxy_client(tmp_path: Path, upstream: int, mode: str, pair, pin: str, *extra: str,
                     name: str = "client") -> Process:
    """certproxy client (a process, as a user runs it) on a free port, relaying to 127.0.0.1:``upstream``."""
    port = free_port()
    return Process([sys.executable, str(ROOT / "certproxy.py"), "client", "--upstream", f"127.0.0.1:{upstream}",
                    f"--{mode}", "--listen", f"127.0.0.1:{port}", "--cert", str(pair.cert), "--key", str(pair.key),
                    "--pin", pin, *extra], port, tmp_path / f"{name}.log")


def swaks(port: int, *args: str, body: str) -> subprocess.CompletedProcess:
    require_tool("swaks")
    return subprocess.run(["swaks", "--server", f"127.0.0.1:{port}", "--from", "a@laptop.test",
                           "--to", "b@example.net", "--h-Subject", "certproxy matrix", "--body", body,
                           "--timeout", "30", *args], capture_output=True, text=True, timeout=90)


def message(body: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@laptop.test", "b@example.net", "certproxy matrix"
    msg.set_content(body)
    return msg


@pytest.fixture
def postfix(tmp_path, certs):
    """The mail server: relays only for the laptop's certificate (relay_clientcerts), over STARTTLS."""
    with Postfix(tmp_path / "postfix", certs.server.cert, certs.server.key, {certs.client.fp: "laptop"}) as pf:
        yield pf


@pytest.fixture
def relay(tmp_path, certs, postfix):
    """certproxy client in front of ``postfix`` (STARTTLS, pinned); yields (process, postfix)."""
    proc = certproxy_client(tmp_path, postfix.starttls_port, "starttls", certs.client, certs.server.fp)
    yield proc, postfix
    proc.stop()


def assert_relayed(proc: Process, postfix: Postfix, body: str, certs) -> None:
    msgs = postfix.messages(1)
    assert len(msgs) == 1, postfix.maillog()
    assert body.encode() in msgs[0], msgs[0]
    log = proc.wait_log("outcome=")
    assert "outcome=ok" in log and f"server_fp={certs.server.fp}" in log, log
    # Relayed by certificate, nothing else: Postfix's mynetworks is empty.
    assert "Relay access denied" not in postfix.maillog()


class TestClients:
    """Mail clients speaking plain SMTP to certproxy client; the message arrives at the Postfix behind it."""

    def test_msmtp(self, tmp_path, certs, relay):
        require_tool("msmtp")
        proc, pf = relay
        rc = tmp_path / "msmtprc"
        rc.write_text(f"""\
defaults
logfile {tmp_path}/msmtp.log
syslog off

account certproxy
host 127.0.0.1
port {proc.port}
tls off
auth off
from a@laptop.test
domain laptop.test

account default : certproxy
""")
        rc.chmod(0o600)
        r = subprocess.run(["msmtp", "-C", str(rc), "-t"], input=message("sent by msmtp").as_bytes(),
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert_relayed(proc, pf, "sent by msmtp", certs)

    def test_python_smtplib(self, certs, relay):
        proc, pf = relay
        with smtplib.SMTP("127.0.0.1", proc.port, local_hostname="laptop.test", timeout=30) as s:
            code, ehlo = s.ehlo()
            assert code == 250 and b"mx.certproxy.test" in ehlo  # the real server's post-TLS EHLO
            refused = s.send_message(message("sent by smtplib"))
        assert refused == {}
        assert_relayed(proc, pf, "sent by smtplib", certs)

    def test_postfix_relayhost(self, tmp_path, certs, relay):
        """The laptop's own Postfix with ``relayhost = [127.0.0.1]:<certproxy client>``, TLS off."""
        proc, pf = relay
        with PostfixRelayClient(tmp_path / "laptop-postfix", certs.client.cert, certs.client.key,
                                f"[127.0.0.1]:{proc.port}") as laptop:
            r = laptop.sendmail("a@laptop.test", message("sent by the laptop's postfix").as_bytes())
            assert r.returncode == 0, r.stdout + r.stderr
            msgs = pf.messages(1, timeout=20)
            deadline = time.monotonic() + 10
            while "status=sent" not in (laptop_log := laptop.maillog()) and time.monotonic() < deadline:
                time.sleep(0.05)
        assert len(msgs) == 1, laptop_log + pf.maillog()
        assert b"sent by the laptop's postfix" in msgs[0]
        assert b"laptop.certproxy.test" in msgs[0]  # received from the laptop's Postfix
        assert "relay=127.0.0.1[127.0.0.1]" in laptop_log and "status=sent" in laptop_log, laptop_log
        log = proc.wait_log("outcome=")
        assert "outcome=ok" in log, log


@pytest.fixture
def exim(certs):
    """Exim relaying only for the laptop's certificate (sha256 of $tls_in_peercert)."""
    with Exim(certs.server.cert, certs.server.key, [certs.client.cert], [certs.client.fp]) as ex:
        yield ex


class TestServers:
    """certproxy client relaying, with swaks as the mail client, through MTAs that demand its certificate."""

    @pytest.mark.parametrize("mode", ["starttls", "tls"])
    def test_exim(self, tmp_path, certs, exim, mode):
        up = exim.starttls_port if mode == "starttls" else exim.tls_port
        proc = certproxy_client(tmp_path, up, mode, certs.client, certs.server.fp.replace(":", ""))  # Exim's spelling
        try:
            r = swaks(proc.port, body=f"exim over {mode}")
            log = proc.wait_log("outcome=")
        finally:
            proc.stop()
        assert r.returncode == 0, r.stdout + r.stderr + exim.mainlog()
        msgs = exim.messages(1)
        assert len(msgs) == 1 and f"exim over {mode}".encode() in msgs[0], exim.mainlog()
        assert "CV=yes" in exim.mainlog()  # Exim verified the laptop's certificate
        assert "outcome=ok" in log and f"server_fp={certs.server.fp}" in log, log

    def test_exim_refuses_relay_without_the_certificate(self, tmp_path, certs, exim):
        plain = swaks(exim.starttls_port, body="to exim in clear")
        nocert = swaks(exim.starttls_port, "-tls", body="to exim without a certificate")
        stranger = swaks(exim.tls_port, "-tlsc", "--tls-cert", str(certs.other_client.cert),
                         "--tls-key", str(certs.other_client.key), body="to exim with a stranger's certificate")
        # certproxy client with a certificate Exim does not relay for: the refusal reaches the mail client.
        proc = certproxy_client(tmp_path, exim.starttls_port, "starttls", certs.other_client, certs.server.fp)
        try:
            through = swaks(proc.port, body="stranger through certproxy")
        finally:
            proc.stop()
        for r in (plain, nocert, stranger, through):
            assert r.returncode != 0 and "550 relay not permitted" in r.stdout, r.stdout + r.stderr
        assert exim.messages(1, timeout=1) == []

    # Exim 4.96 never answers close_notify; certproxy waits at most TLS_SHUTDOWN_TIMEOUT_S for it.
    @pytest.mark.parametrize("peer", ["postfix", "exim"])
    def test_client_leaving_without_quit_ends_the_session(self, request, tmp_path, certs, peer):
        """A mail client that hangs up once greeted (a crash, a port probe): the session ends at once."""
        mta = request.getfixturevalue(peer)
        proc = certproxy_client(tmp_path, mta.starttls_port, "starttls", certs.client, certs.server.fp,
                                "--grace", "1")
        try:
            with socket.create_connection(("127.0.0.1", proc.port), timeout=30) as s:
                greeting = s.recv(512)  # certproxy greets once the tunnel is up
            log = proc.wait_log("session id=", timeout=5)
        finally:
            proc.stop()
        assert greeting.startswith(b"220 "), greeting
        assert "session id=1 " in log and "outcome=ok" in log, log

    def test_stunnel_server(self, tmp_path, certs):
        """stunnel (SMTP server mode, verifyPeer with the laptop's certificate) in front of smtp-sink."""
        sink, out = smtp_sink(tmp_path)
        st_port = free_port()
        try:
            st = stunnel(tmp_path, "stunnel-server", f"""
[in]
accept = 127.0.0.1:{st_port}
connect = 127.0.0.1:{sink.port}
protocol = smtp
cert = {certs.server.cert}
key = {certs.server.key}
CAfile = {certs.client.cert}
verifyPeer = yes
""", st_port)
            try:
                proc = certproxy_client(tmp_path, st_port, "starttls", certs.client, certs.server.fp)
                try:
                    r = swaks(proc.port, body="through stunnel to smtp-sink")
                    log = proc.wait_log("outcome=")
                finally:
                    proc.stop()
                # A certificate stunnel does not know: the mail client gets 421, the sink nothing.
                proc = certproxy_client(tmp_path, st_port, "starttls", certs.other_client, certs.server.fp,
                                        name="stranger")
                try:
                    refused = swaks(proc.port, body="stranger through stunnel")
                    refused_log = proc.wait_log("outcome=")
                finally:
                    proc.stop()
            finally:
                st.stop()
            assert r.returncode == 0, r.stdout + r.stderr + log + st.log.read_text()
            files = wait_files(out, 1)
            assert len(files) == 1 and b"through stunnel to smtp-sink" in files[0].read_bytes()
            assert "outcome=ok" in log and "tls=starttls" in log, log
            assert refused.returncode != 0 and "421 4." in refused.stdout, refused.stdout + refused_log
            assert wait_files(out, 2, timeout=1) == files
        finally:
            sink.stop()
            shutil.rmtree(out, ignore_errors=True)
