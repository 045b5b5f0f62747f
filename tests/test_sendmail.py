"""sendmail 8.17 (Debian 12's, unpacked and run as nobody: see sendmail_peer.py) on both sides of certproxy.

The laptop's MTA: sendmail relays everything to its smart host, certproxy server, over STARTTLS,
presenting the laptop's certificate itself (``confCLIENT_CERT``/``confCLIENT_KEY``) and accepting only
the server's certificate (``confCACERT`` + ``TLS_Srv:127.0.0.1 VERIFY``); smtp-sink behind certproxy
writes each message to a file. sendmail 8.17 has no implicit-TLS (SMTPS) client: its TLS starts only with
STARTTLS after EHLO (deliver.c); on port 465 it goes through certproxy client instead.

The mail server: certproxy server in front of a plain sendmail port that queues what it accepts; the
queue's ``df`` file is the body as sendmail stored it.

Every daemon runs on free loopback ports and is stopped by PID."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from realpeers import Process, free_port, require_tool, smtp_sink, wait_files
from sendmail_peer import Sendmail

ROOT = Path(__file__).resolve().parent.parent
SENDER, RECIPIENT = "a@laptop.test", "b@example.net"
# What a body can hold that a careless relay would change: dot lines (stuffed on the wire by sendmail,
# unstuffed by the server), a 'From ' line, trailing blanks, a 900-octet line (under the relay mailer's
# L=2040 and SMTP's 998).
BODY = ("sendmail through certproxy\n"
        ".a line that starts with a dot\n"
        "..and one with two\n"
        "From the start of a line\n"
        "trailing blanks and a tab \t \n"
        + "0123456789" * 90 + "\n"
        "the end\n")


def message(subject: str) -> bytes:
    return (f"From: {SENDER}\nTo: {RECIPIENT}\nSubject: {subject}\n\n" + BODY).encode()


def certproxy_server(tmp_path: Path, backend: int, *args: str, name: str = "server") -> Process:
    """certproxy server (a process, as an operator runs it) on a free port in front of 127.0.0.1:``backend``;
    ``args``: the mode, --cert/--key, --allow and the rest."""
    port = free_port()
    return Process([sys.executable, str(ROOT / "certproxy.py"), "server", "--listen", f"127.0.0.1:{port}",
                    "--backend", f"127.0.0.1:{backend}", "--hostname", "mx.certproxy.test", *args],
                   port, tmp_path / f"{name}.log")


def server_args(certs, *mode: str, cert=None, allow: Path | None = None) -> list[str]:
    """``allow``: an --allow directory instead of the laptop's certificate file."""
    pair = cert or certs.server
    return [*mode, "--cert", str(pair.cert), "--key", str(pair.key), "--allow", str(allow or certs.client.cert)]


def session_line(proc: Process) -> str:
    log = proc.wait_log("outcome=")
    lines = [line for line in log.splitlines() if " session id=" in line]
    assert len(lines) == 1, log
    return lines[0]


def body_of(received: bytes) -> bytes:
    """The body of a message as smtp-sink wrote it: its own X- and Received: lines lead the header, and it
    ends every file with one more line break than the message had (so for smtplib straight into it too)."""
    body = received.split(b"\n\n", 1)[1]
    assert body.endswith(b"\n\n"), received
    return body[:-1]


def delivery_line(log: str, qid: str) -> str:
    lines = [line for line in log.splitlines() if line.startswith(f"{qid}: to=<{RECIPIENT}>")]
    assert len(lines) == 1, log
    return lines[0]


@pytest.fixture
def sink(tmp_path):
    proc, out = smtp_sink(tmp_path)
    yield proc, out
    proc.stop()
    shutil.rmtree(out, ignore_errors=True)


class TestSendmailOnTheLaptop:
    """sendmail → certproxy server → smtp-sink."""

    @pytest.mark.parametrize("mode", [["--starttls"], ["--tls", "--starttls"]], ids=["starttls", "dual-port"])
    def test_relays_with_its_own_client_certificate(self, tmp_path, certs, sink, mode):
        """On a dual port (``--tls --starttls``) sendmail, silent until greeted, gets SMTP after 0.25 s."""
        sink_proc, out = sink
        server = certproxy_server(tmp_path, sink_proc.port, *server_args(certs, *mode))
        try:
            with Sendmail("laptop.certproxy.test", relay_port=server.port, client_cert=certs.client.cert,
                          client_key=certs.client.key, server_cert=certs.server.cert) as sm:
                qid = sm.submit(SENDER, RECIPIENT, message("sendmail relay"))
                log = sm.wait_log(rf"^{qid}: done")
            line = session_line(server)
        finally:
            server.stop()
        files = wait_files(out, 1)
        assert len(files) == 1, log
        received = files[0].read_bytes()
        assert body_of(received) == BODY.encode()
        assert f"for <{RECIPIENT}>".encode() in received and b"by laptop.certproxy.test (8.17.1.9" in received
        cipher = re.search(r" cipher=(\S+) ", line).group(1)  # both ends name the same one
        assert f"STARTTLS=client, relay=[127.0.0.1], version=TLSv1.3, verify=OK, cipher={cipher}, " in log, log
        assert "STARTTLS=client, cert-subject=/CN=mx.certproxy.test, cert-issuer=/CN=mx.certproxy.test" in log
        assert re.search(r", mailer=relay, pri=\d+, relay=\[127\.0\.0\.1\] \[127\.0\.0\.1\], dsn=2\.0\.0, "
                         r"stat=Sent \(", delivery_line(log, qid)), log
        assert (f"tls=starttls tls_version=TLSv1.3 cipher={cipher} cert_subject=\"CN=laptop\" "
                f"cert_fp={certs.client.fp} cert=allowed cert_name=laptop backend=127.0.0.1:{sink_proc.port} "
                in line), line
        assert " outcome=ok" in line, line

    def test_refused_certificate_bounces(self, tmp_path, certs, sink):
        """certproxy's ``554 5.7.1`` (to the EHLO inside TLS) is permanent for sendmail: the message is
        bounced at once, not kept in the queue; the bounce fails the same way (its sender's domain is
        relayed too) and stays queued for postmaster. Nothing reaches the MTA."""
        sink_proc, out = sink
        server = certproxy_server(tmp_path, sink_proc.port, *server_args(certs, "--starttls"))
        try:
            with Sendmail("laptop.certproxy.test", relay_port=server.port, client_cert=certs.other_client.cert,
                          client_key=certs.other_client.key, server_cert=certs.server.cert) as sm:
                qid = sm.submit(SENDER, RECIPIENT, message("from a stranger"))
                log = sm.wait_log(rf"^{qid}: done")
                mailq = sm.mailq()
                queued = sm.queue_files()
            line = session_line(server)
        finally:
            server.stop()
        assert wait_files(out, 1, timeout=1) == []
        assert "verify=OK" in log, log  # the server was the right one; the refusal is certproxy's
        assert re.search(r", mailer=relay, pri=\d+, relay=\[127\.0\.0\.1\] \[127\.0\.0\.1\], dsn=5\.5\.0, "
                         r"reply=554 5\.7\.1 certificate not authorised, stat=Service unavailable$",
                         delivery_line(log, qid), re.M), log
        assert re.search(rf"^{qid}: (\w+): DSN: Service unavailable$", log, re.M), log
        assert qid not in mailq and f"qf{qid}" not in queued and f"df{qid}" not in queued, (mailq, queued)
        assert "MAILER-DAEMON" in mailq and "Total requests: 1" in mailq, mailq
        assert re.search(rf'tls=starttls tls_version=TLSv1\.3 cipher=\S+ cert_subject="CN=stranger" '
                         rf"cert_fp={certs.other_client.fp} cert=refused ", line), line
        assert " backend=" not in line and ' outcome=refused reason="certificate is not an --allow certificate"' \
            in line, line

    def test_soft_refusal_stays_queued_until_allowed(self, tmp_path, certs, sink):
        """With certproxy server --soft-refusal the same stranger hears ``454 4.7.1``: sendmail defers (no
        DSN, nothing for postmaster) and keeps the message; once the certificate is in the --allow directory
        and certproxy has reloaded, the next queue run delivers it, byte-intact."""
        sink_proc, out = sink
        allow = tmp_path / "allow"
        allow.mkdir()
        shutil.copy(certs.client.cert, allow / "laptop.pem")
        server = certproxy_server(tmp_path, sink_proc.port, *server_args(certs, "--starttls", allow=allow),
                                  "--soft-refusal")
        try:
            with Sendmail("laptop.certproxy.test", relay_port=server.port, client_cert=certs.other_client.cert,
                          client_key=certs.other_client.key, server_cert=certs.server.cert) as sm:
                qid = sm.submit(SENDER, RECIPIENT, message("queued for a stranger"))
                log = sm.wait_log(rf"^{qid}: to=")
                mailq = sm.mailq(until="(Deferred: ")
                queued = sm.queue_files()
                refused = session_line(server)
                nothing = wait_files(out, 1, timeout=0)
                shutil.copy(certs.other_client.cert, allow / "new-laptop.pem")
                server.proc.send_signal(signal.SIGHUP)
                reloaded = server.wait_log("reload outcome=ok")
                assert sm.run_queue().returncode == 0
                after = sm.wait_log(rf"^{qid}: done")[len(log):]
                mailq_after = sm.mailq()
                queued_after = sm.queue_files()
            lines = [line for line in server.wait_log("outcome=ok").splitlines() if " session id=" in line]
        finally:
            server.stop()
        assert "verify=OK" in log, log
        # The enhanced code is sendmail's own (4.5.0, as 5.5.0 for the 554): it reads none from an EHLO reply.
        assert re.search(r", mailer=relay, pri=\d+, relay=\[127\.0\.0\.1\] \[127\.0\.0\.1\], dsn=4\.5\.0, "
                         r"reply=454 4\.7\.1 certificate not authorised; try again later, "
                         r"stat=Deferred: 454 4\.7\.1 certificate not authorised; try again later$",
                         delivery_line(log, qid), re.M), log
        assert "DSN:" not in log + after and "MAILER-DAEMON" not in mailq + mailq_after, (log, after, mailq)
        # mailq cuts the reason short ("... try again la)").
        assert re.search(rf"^{qid} +\d+ .*<{SENDER}>\n +\(Deferred: 454 4\.7\.1 certificate not authorised; try "
                         rf"again la\)\n\s+<{RECIPIENT}>\n\s+Total requests: 1$", mailq, re.M), mailq
        assert queued == [f"df{qid}", f"qf{qid}"], queued
        assert re.search(rf'tls=starttls tls_version=TLSv1\.3 cipher=\S+ cert_subject="CN=stranger" '
                         rf"cert_fp={certs.other_client.fp} cert=refused ", refused), refused
        assert " backend=" not in refused and ' outcome=refused reason="certificate is not an --allow certificate"' \
            in refused, refused
        assert nothing == []  # the refused session is over and never reached the sink
        assert "reload outcome=ok" in reloaded, reloaded
        assert re.search(rf"^{qid}: to=<{RECIPIENT}>, delay=\S+, xdelay=\S+, mailer=relay, pri=\d+, "
                         r"relay=\[127\.0\.0\.1\] \[127\.0\.0\.1\], dsn=2\.0\.0, stat=Sent \(Ok\)$", after, re.M), after
        assert re.search(rf"^{qid}: done; delay=\S+, ntries=2$", after, re.M), after
        assert "Total requests: 0" in mailq_after and queued_after == [], (mailq_after, queued_after)
        assert len(lines) == 2 and lines[0] == refused, lines
        assert f"cert_fp={certs.other_client.fp} cert=allowed cert_name=stranger backend=127.0.0.1:{sink_proc.port} " \
            in lines[1] and " outcome=ok" in lines[1], lines
        files = wait_files(out, 1)
        assert len(files) == 1, files
        received = files[0].read_bytes()
        assert body_of(received) == BODY.encode() and b"\nSubject: queued for a stranger\n" in received, received

    def test_group_readable_key_means_no_certificate(self, tmp_path, certs, sink):
        """sendmail skips a client key others may read and goes on without a certificate: certproxy's
        ``530 5.7.0`` then bounces the message like any refusal."""
        sink_proc, out = sink
        server = certproxy_server(tmp_path, sink_proc.port, *server_args(certs, "--starttls"))
        try:
            sm = Sendmail("laptop.certproxy.test", relay_port=server.port, client_cert=certs.client.cert,
                          client_key=certs.client.key, server_cert=certs.server.cert)
            key = sm.dir / "tls" / "client.key"
            key.chmod(0o640)
            with sm:
                qid = sm.submit(SENDER, RECIPIENT, message("with a readable key"))
                log = sm.wait_log(rf"^{qid}: done")
            line = session_line(server)
        finally:
            server.stop()
        assert wait_files(out, 1, timeout=1) == []
        assert f"STARTTLS=client: file {key} unsafe: Group readable file" in log, log
        assert delivery_line(log, qid).endswith(
            ", dsn=5.5.0, reply=530 5.7.0 client certificate required, stat=Service unavailable"), log
        assert " cert=none " in line and " outcome=refused " in line and " backend=" not in line, line

    def test_wrong_server_certificate_stays_queued(self, tmp_path, certs, sink):
        """A smart host with another certificate fails ``TLS_Srv:127.0.0.1 VERIFY``: sendmail says QUIT and
        keeps the message. The check runs after the handshake, so that server has already seen the
        laptop's certificate (certproxy client checks its pin inside the handshake, before sending it)."""
        sink_proc, out = sink
        server = certproxy_server(tmp_path, sink_proc.port,
                                  *server_args(certs, "--starttls", cert=certs.other_server))
        try:
            with Sendmail("laptop.certproxy.test", relay_port=server.port, client_cert=certs.client.cert,
                          client_key=certs.client.key, server_cert=certs.server.cert) as sm:
                qid = sm.submit(SENDER, RECIPIENT, message("to the wrong server"))
                log = sm.wait_log(rf"^{qid}: to=")
                mailq = sm.mailq(until="(Deferred: ")
            line = session_line(server)
        finally:
            server.stop()
        assert wait_files(out, 1, timeout=1) == []
        assert "verify=FAIL" in log and "cert-subject=/CN=evil.certproxy.test" in log, log
        assert "ruleset=tls_server, arg1=FAIL, relay=[127.0.0.1], reject=454 4.7.0 authentication failed" in log
        assert delivery_line(log, qid).endswith("dsn=4.7.0, stat=Deferred: 454 4.7.0 authentication failed"), log
        assert qid in mailq and "(Deferred: 454 4.7.0 authentication failed)" in mailq, mailq
        assert f"cert_fp={certs.client.fp} cert=allowed" in line, line

    def test_implicit_tls_port_is_beyond_sendmail(self, tmp_path, certs, sink):
        """Pointed at an implicit-TLS port sendmail waits for a greeting in clear and says nothing; certproxy
        waits for a ClientHello until ``--handshake-timeout``. The message stays queued (4.4.2)."""
        sink_proc, out = sink
        server = certproxy_server(tmp_path, sink_proc.port,
                                  *server_args(certs, "--tls"), "--handshake-timeout", "1")
        try:
            with Sendmail("laptop.certproxy.test", relay_port=server.port, client_cert=certs.client.cert,
                          client_key=certs.client.key, server_cert=certs.server.cert) as sm:
                qid = sm.submit(SENDER, RECIPIENT, message("to port 465"))
                log = sm.wait_log(rf"^{qid}: to=")
                mailq = sm.mailq(until="(reply: ")
            line = session_line(server)
        finally:
            server.stop()
        assert wait_files(out, 1, timeout=1) == []
        assert "STARTTLS=client" not in log, log
        # certproxy closed before any greeting; sendmail reports that EOF as a reset (usersmtp.c reply()).
        assert delivery_line(log, qid).endswith(", dsn=4.4.2, stat=Deferred: Connection reset by [127.0.0.1]"), log
        assert re.search(rf"^{qid} .*<{SENDER}>\n +\(reply: read error from \[127\.0\.0\.1\]\)\n", mailq, re.M), mailq
        assert "tls=implicit bytes_in=0 bytes_out=0 " in line, line
        assert ' outcome=timeout reason="handshake: timed out after 1 s"' in line, line

    def test_implicit_tls_through_certproxy_client(self, tmp_path, certs, sink):
        """For port 465, sendmail relays in clear to certproxy client on the laptop, which holds the
        certificate and the pin: sendmail → certproxy client --tls → certproxy server --tls → smtp-sink."""
        sink_proc, out = sink
        server = certproxy_server(tmp_path, sink_proc.port, *server_args(certs, "--tls"))
        try:
            port = free_port()
            client = Process([sys.executable, str(ROOT / "certproxy.py"), "client", "--upstream",
                                      f"127.0.0.1:{server.port}", "--tls", "--listen", f"127.0.0.1:{port}",
                                      "--cert", str(certs.client.cert), "--key", str(certs.client.key),
                                      "--pin", certs.server.fp], port, tmp_path / "client.log")
            try:
                with Sendmail("laptop.certproxy.test", relay_port=client.port) as sm:
                    qid = sm.submit(SENDER, RECIPIENT, message("sendmail via certproxy client"))
                    log = sm.wait_log(rf"^{qid}: done")
                client_line = session_line(client)
            finally:
                client.stop()
            line = session_line(server)
        finally:
            server.stop()
        files = wait_files(out, 1)
        assert len(files) == 1, log
        assert body_of(files[0].read_bytes()) == BODY.encode()
        assert "STARTTLS=client" not in log, log  # certproxy client offers none: the tunnel is its TLS
        assert re.search(r"relay=\[127\.0\.0\.1\] \[127\.0\.0\.1\], dsn=2\.0\.0, stat=Sent \(",
                         delivery_line(log, qid)), log
        assert f"server_fp={certs.server.fp}" in client_line and " outcome=ok" in client_line, client_line
        assert "tls=implicit tls_version=TLSv1.3" in line and f"cert_fp={certs.client.fp} cert=allowed" in line, line


class TestSendmailBehindCertproxy:
    """swaks with the laptop's certificate → certproxy server → sendmail (plain, loopback, queue only)."""

    @pytest.mark.parametrize("mode", ["starttls", "tls"])
    def test_message_reaches_the_queue(self, tmp_path, certs, mode):
        require_tool("swaks")
        data = tmp_path / "message.eml"
        # No final line break: swaks adds one before the final dot.
        data.write_bytes(message("behind certproxy").replace(b"\n", b"\r\n").removesuffix(b"\r\n"))
        with Sendmail("mta.certproxy.test", queue_only=True) as sm:
            server = certproxy_server(tmp_path, sm.port, *server_args(certs, f"--{mode}"))
            try:
                r = subprocess.run(["swaks", "--server", f"127.0.0.1:{server.port}", "--tls" if mode == "starttls"
                                    else "--tlsc", "--tls-cert", str(certs.client.cert), "--tls-key",
                                    str(certs.client.key), "--from", SENDER, "--to", RECIPIENT, "--data", str(data),
                                    "--timeout", "30"], capture_output=True, text=True, timeout=90)
                stranger = subprocess.run(["swaks", "--server", f"127.0.0.1:{server.port}", "--tls" if
                                           mode == "starttls" else "--tlsc", "--tls-cert", str(certs.other_client.cert),
                                           "--tls-key", str(certs.other_client.key), "--from", SENDER, "--to",
                                           RECIPIENT, "--body", "from a stranger", "--timeout", "30"],
                                          capture_output=True, text=True, timeout=90)
                log = server.wait_log("cert=refused")
            finally:
                server.stop()
            m = re.search(r"<~  250 2\.0\.0 (\w+) Message accepted for delivery", r.stdout)
            assert r.returncode == 0 and m, r.stdout + r.stderr + sm.log()
            qid = m.group(1)
            sm_log = sm.wait_log(rf"^{qid}: to=<{RECIPIENT}>, .*stat=queued$")
            queued = sm.queue_files()
            df = (sm.queue / f"df{qid}").read_bytes()
            qf = (sm.queue / f"qf{qid}").read_bytes().decode("latin-1")  # macros are coded in octets >= 0x80
            mailq = sm.mailq()
        assert queued == [f"df{qid}", f"qf{qid}"], queued  # the stranger's message never got there
        assert df == BODY.encode()
        assert f"\nS<{SENDER}>\nrRFC822; {RECIPIENT}\nRPFD:<{RECIPIENT}>\n" in qf, qf
        # sendmail's side of the splice is plain ESMTP from 127.0.0.1: TLS ended at certproxy.
        assert f" (localhost [127.0.0.1])\n\tby mta.certproxy.test (8.17.1.9/8.17.1.9) with ESMTP id {qid}\n" in qf, qf
        assert re.search(rf"^{qid} +\d+ .*<{SENDER}>\n\s+<{RECIPIENT}>\n\s+Total requests: 1$", mailq, re.M), mailq
        assert re.search(rf"^{qid}: from=<{SENDER}>, size=\d+, class=0, nrcpts=1, .*proto=ESMTP, daemon=MTA, "
                         r"relay=localhost \[127\.0\.0\.1\]$", sm_log, re.M), sm_log
        assert stranger.returncode != 0 and "554 5.7.1 certificate not authorised" in stranger.stdout, stranger.stdout
        lines = [line for line in log.splitlines() if " session id=" in line]
        assert len(lines) == 2, log
        assert f"cert_fp={certs.client.fp} cert=allowed cert_name=laptop backend=127.0.0.1:{sm.port}" in lines[0]
        assert f"cert_fp={certs.other_client.fp} cert=refused" in lines[1] and " backend=" not in lines[1], lines[1]
