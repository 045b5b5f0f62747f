"""certproxy against real peers: Postfix (relay_clientcerts), swaks, openssl s_client, stunnel, smtp-sink.
Every daemon is started here on free loopback ports and stopped by PID."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import client_ctx
from realpeers import Postfix, Process, free_port, require_tool, smtp_sink, stunnel, wait_files

ROOT = Path(__file__).resolve().parent.parent


def certproxy(tmp_path: Path, name: str, *args: str, port: int) -> Process:
    return Process([sys.executable, str(ROOT / "certproxy.py"), *args], port, tmp_path / f"{name}.log")


def swaks(port: int, *args: str, body: str = "hello from swaks") -> subprocess.CompletedProcess:
    require_tool("swaks")
    return subprocess.run(["swaks", "--server", f"127.0.0.1:{port}", "--from", "a@laptop.test",
                           "--to", "b@example.net", "--h-Subject", "certproxy interop", "--body", body,
                           "--timeout", "30", *args], capture_output=True, text=True, timeout=90)


@pytest.fixture
def postfix(tmp_path, certs):
    with Postfix(tmp_path / "postfix", certs.server.cert, certs.server.key, {certs.client.fp: "laptop"}) as pf:
        yield pf


class TestClientAgainstPostfix:
    """The laptop's certproxy client relays through a real Postfix that trusts only its certificate."""

    @pytest.mark.parametrize("mode", ["starttls", "tls"])
    def test_relay_through_certproxy(self, tmp_path, certs, postfix, mode):
        port = free_port()
        up = postfix.starttls_port if mode == "starttls" else postfix.tls_port
        proc = certproxy(tmp_path, "client", "client", "--upstream", f"127.0.0.1:{up}", f"--{mode}",
                         "--listen", f"127.0.0.1:{port}", "--cert", str(certs.client.cert),
                         "--key", str(certs.client.key), "--pin", certs.server.fp, port=port)
        try:
            r = swaks(port, body=f"relayed over {mode}")
            log = proc.wait_log("outcome=ok")  # the harness's port probe made a session of its own
        finally:
            proc.stop()
        assert r.returncode == 0, r.stdout + r.stderr
        assert "250 2.0.0 Ok: queued" in r.stdout
        [msg] = postfix.messages(1)
        assert f"relayed over {mode}".encode() in msg
        assert "outcome=ok" in log and f"server_fp={certs.server.fp}" in log

    def test_without_certproxy_relay_is_denied(self, certs, postfix):
        r = swaks(postfix.starttls_port, "-tls")
        assert r.returncode != 0 and "Relay access denied" in r.stdout
        r = swaks(postfix.starttls_port, "-tls", "--tls-cert", str(certs.other_client.cert),
                  "--tls-key", str(certs.other_client.key))
        assert r.returncode != 0 and "Relay access denied" in r.stdout
        assert postfix.messages(1, timeout=1) == []

    def test_wrong_pin_gives_421_and_nothing_is_sent(self, tmp_path, certs, postfix):
        port = free_port()
        proc = certproxy(tmp_path, "client", "client", "--upstream", f"127.0.0.1:{postfix.starttls_port}",
                         "--listen", f"127.0.0.1:{port}", "--cert", str(certs.client.cert),
                         "--key", str(certs.client.key), "--pin", certs.other_server.fp, port=port)
        try:
            r = swaks(port)
            log = proc.wait_log("session ")
        finally:
            proc.stop()
        assert r.returncode != 0 and "421 4.7.0" in r.stdout
        assert f"--pin {certs.server.fp}" in log  # the fingerprint actually seen, ready to paste
        assert postfix.messages(1, timeout=1) == []


@pytest.fixture
def sink(tmp_path):
    proc, out = smtp_sink(tmp_path)
    yield proc, out
    proc.stop()
    shutil.rmtree(out, ignore_errors=True)


def server_args(certs, mode: str, backend: int, port: int) -> list[str]:
    return ["server", f"--{mode}", "--listen", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{backend}",
            "--cert", str(certs.server.cert), "--key", str(certs.server.key), "--allow", str(certs.client.cert),
            "--hostname", "mx.certproxy.test"]


class TestServerWithRealClients:
    @pytest.mark.parametrize("mode, flag", [("starttls", "-tls"), ("tls", "-tlsc")])
    def test_swaks_with_and_without_certificate(self, tmp_path, certs, sink, mode, flag):
        sink_proc, out = sink
        port = free_port()
        proc = certproxy(tmp_path, "server", *server_args(certs, mode, sink_proc.port, port), port=port)
        try:
            ok = swaks(port, flag, "--tls-cert", str(certs.client.cert), "--tls-key", str(certs.client.key),
                       body="swaks with a certificate")
            nocert = swaks(port, flag, body="swaks without a certificate")
            stranger = swaks(port, flag, "--tls-cert", str(certs.other_client.cert),
                             "--tls-key", str(certs.other_client.key), body="swaks with a stranger's certificate")
            plain = swaks(port, body="swaks in clear") if mode == "starttls" else None
            log = proc.wait_log("no client certificate")
        finally:
            proc.stop()
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert nocert.returncode != 0 and "530 5.7.0 client certificate required" in nocert.stdout
        assert stranger.returncode != 0
        if plain is not None:
            assert plain.returncode != 0 and "530 5.7.0 Must issue a STARTTLS command first" in plain.stdout
        files = wait_files(out, 1)
        assert len(files) == 1 and b"swaks with a certificate" in files[0].read_bytes()
        assert f"cert_fp={certs.client.fp}" in log and "no client certificate" in log

    def test_openssl_s_client_starttls(self, tmp_path, certs, sink):
        require_tool("openssl")
        sink_proc, _ = sink
        port = free_port()
        proc = certproxy(tmp_path, "server", *server_args(certs, "starttls", sink_proc.port, port), port=port)
        try:
            r = subprocess.run(["openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{port}",
                                "-cert", str(certs.client.cert), "-key", str(certs.client.key), "-quiet",
                                "-verify_quiet"], input="EHLO laptop.test\r\nQUIT\r\n", capture_output=True,
                               text=True, timeout=60)
        finally:
            proc.stop()
        assert "250-sink.certproxy.test" in r.stdout or "250 sink.certproxy.test" in r.stdout, r.stdout + r.stderr
        assert "STARTTLS" not in r.stdout.split("250", 1)[1]
        assert "221" in r.stdout

    def test_stunnel_client_to_certproxy_server(self, tmp_path, certs, sink):
        sink_proc, out = sink
        port, st_port = free_port(), free_port()
        proc = certproxy(tmp_path, "server", *server_args(certs, "starttls", sink_proc.port, port), port=port)
        st = stunnel(tmp_path, "stunnel-client", f"""
[out]
client = yes
accept = 127.0.0.1:{st_port}
connect = 127.0.0.1:{port}
protocol = smtp
cert = {certs.client.cert}
key = {certs.client.key}
CAfile = {certs.server.cert}
verifyPeer = yes
""", st_port)
        try:
            r = swaks(st_port, body="through stunnel")
        finally:
            st.stop()
            proc.stop()
        assert r.returncode == 0, r.stdout + r.stderr + st.log.read_text()
        files = wait_files(out, 1)
        assert len(files) == 1 and b"through stunnel" in files[0].read_bytes()


class TestFullTunnelProcesses:
    @pytest.mark.parametrize("mode", ["starttls", "tls"])
    def test_client_to_server_to_smtp_sink(self, tmp_path, certs, sink, mode):
        sink_proc, out = sink
        sport, cport = free_port(), free_port()
        server = certproxy(tmp_path, "server", *server_args(certs, mode, sink_proc.port, sport), port=sport)
        client = certproxy(tmp_path, "client", "client", "--upstream", f"127.0.0.1:{sport}", f"--{mode}",
                           "--listen", f"127.0.0.1:{cport}", "--cert", str(certs.client.cert),
                           "--key", str(certs.client.key), "--pin", certs.server.spki, port=cport)
        try:
            results = [swaks(cport, body=f"tunnel message {i}") for i in range(3)]
        finally:
            client.stop()
            server.stop()
        for r in results:
            assert r.returncode == 0, r.stdout + r.stderr
        files = wait_files(out, 3)
        bodies = b"".join(f.read_bytes() for f in files)
        assert len(files) == 3 and all(f"tunnel message {i}".encode() in bodies for i in range(3))


XCLIENT_OK = "-o smtpd_authorized_xclient_hosts=127.0.0.1"


@pytest.fixture
def fronted_postfix(tmp_path, certs):
    """Postfix behind certproxy server, the ports an operator would set up:
    ``trusted``: relays for an identity that XCLIENT names (permit_sasl_authenticated);
    ``inbound``: strangers, mail for certproxy.test (relay_domains) only, told who they are by XCLIENT;
    ``proxy``: PROXY protocol in, relays for 127.0.0.2 only (so the header is all that can make it relay)."""
    extra = {
        "trusted": f"{XCLIENT_OK} -o smtpd_sasl_auth_enable=yes "
                   "-o smtpd_relay_restrictions=permit_sasl_authenticated,reject_unauth_destination",
        "inbound": f"{XCLIENT_OK} -o smtpd_relay_restrictions=reject_unauth_destination",
        "proxy": "-o smtpd_upstream_proxy_protocol=haproxy -o mynetworks=127.0.0.2/32 "
                 "-o smtpd_relay_restrictions=permit_mynetworks,reject_unauth_destination",
    }
    with Postfix(tmp_path / "postfix", certs.server.cert, certs.server.key, {}, extra,
                 main_extra="relay_domains = certproxy.test\n") as pf:
        yield pf


def cert_args(pair) -> list[str]:
    return ["--tls-cert", str(pair.cert), "--tls-key", str(pair.key)]


class TestServerInFrontOfPostfix:
    """The MTA learns who the client really is (XCLIENT, PROXY protocol) and relays by identity."""

    # alice+laptop: '+' is xtext's escape (RFC 3461); certproxy sends LOGIN=alice+2Blaptop, Postfix decodes it.
    @pytest.mark.parametrize("name", ["alice", "alice+laptop"])
    def test_xclient_identity_relays_and_shows_the_real_client(self, tmp_path, certs, fronted_postfix, name):
        pf, port = fronted_postfix, free_port()
        proc = certproxy(tmp_path, "server", "server", "--tls", "--listen", f"127.0.0.1:{port}",
                         "--backend", f"127.0.0.1:{pf.ports['trusted']}", "--xclient",
                         "--cert", str(certs.server.cert), "--key", str(certs.server.key),
                         "--allow", str(certs.client.cert), "--allow-fingerprint", f"{certs.client.fp} {name}",
                         port=port)
        try:
            r = swaks(port, "-tlsc", *cert_args(certs.client), "--local-interface", "127.0.0.2")
            log = proc.wait_log("cert_name=")
        finally:
            proc.stop()
        assert r.returncode == 0, r.stdout + pf.maillog()
        msg = pf.messages(1)[0].decode()
        assert "(unknown [127.0.0.2])" in msg and "with ESMTPA" in msg, msg  # the laptop, authenticated
        maillog = pf.maillog()
        assert re.search(rf"sasl_method=XCLIENT, sasl_username={re.escape(name)}$", maillog, re.MULTILINE), maillog
        assert re.search(rf"cert_name={re.escape(name)}(\s|$)", log) and "outcome=ok" in log, log

    @pytest.mark.parametrize("xclient", [True, False], ids=["with-xclient", "without-xclient"])
    @pytest.mark.parametrize("command", ["XCLIENT LOGIN=postmaster ADDR=127.0.0.1", "  xclient LOGIN=postmaster",
                                         "XFORWARD ADDR=192.0.2.1"])
    def test_a_client_cannot_send_xclient_itself(self, tmp_path, certs, fronted_postfix, xclient, command):
        """The MTA port trusts 127.0.0.1 with XCLIENT (the README's recipe), and every connection certproxy
        makes comes from there: a client's own XCLIENT/XFORWARD, in any spelling Postfix reads, must never
        be written to it, with or without --xclient. certproxy ends the session with a 421 instead."""
        import smtplib

        pf, port = fronted_postfix, free_port()
        proc = certproxy(tmp_path, "server", "server", "--tls", "--listen", f"127.0.0.1:{port}",
                         "--backend", f"127.0.0.1:{pf.ports['trusted']}", *(["--xclient"] if xclient else []),
                         "--cert", str(certs.server.cert), "--key", str(certs.server.key),
                         "--allow", str(certs.client.cert), port=port)
        ctx = client_ctx(certs, certs.client)
        try:
            with smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=30, source_address=("127.0.0.2", 0)) as s:
                code, ehlo = s.ehlo("laptop.test")
                s.putcmd(command)
                refused = s.getreply()
                with pytest.raises(smtplib.SMTPServerDisconnected):
                    s.mail("a@laptop.test")
            log = proc.wait_log("outcome=refused")
        finally:
            proc.stop()
        assert code == 250 and b"XCLIENT" not in ehlo and b"XFORWARD" not in ehlo
        verb = command.split()[0].upper()
        assert refused == (421, f"4.7.0 {verb} is not for clients; closing".encode()), refused
        assert f"client sent {verb} inside the tunnel" in log, log
        maillog = pf.maillog()
        assert "postmaster" not in maillog and "192.0.2.1" not in maillog, maillog

    def test_message_content_is_never_inspected(self, tmp_path, certs, fronted_postfix):
        """A body line that reads like a hidden command passes untouched (content starts at the 354)."""
        pf, port = fronted_postfix, free_port()
        proc = certproxy(tmp_path, "server", "server", "--tls", "--listen", f"127.0.0.1:{port}",
                         "--backend", f"127.0.0.1:{pf.ports['trusted']}", "--xclient",
                         "--cert", str(certs.server.cert), "--key", str(certs.server.key),
                         "--allow", str(certs.client.cert), "--allow-fingerprint", f"{certs.client.fp} alice",
                         port=port)
        body = "first line\nXCLIENT LOGIN=postmaster ADDR=127.0.0.1\nXFORWARD NAME=evil\nlast line"
        try:
            r = swaks(port, "-tlsc", *cert_args(certs.client), "--pipeline", body=body)
            log = proc.wait_log("outcome=")
        finally:
            proc.stop()
        assert r.returncode == 0, r.stdout + pf.maillog()
        msg = pf.messages(1)[0].decode()
        assert "XCLIENT LOGIN=postmaster ADDR=127.0.0.1\n" in msg and "XFORWARD NAME=evil\n" in msg, msg
        assert "outcome=ok" in log, log

    @pytest.mark.parametrize("mode,flag", [("starttls", "-tls"), ("tls", "-tlsc")])
    def test_strangers_land_on_the_inbound_port(self, tmp_path, certs, fronted_postfix, mode, flag):
        pf, port = fronted_postfix, free_port()
        proc = certproxy(tmp_path, "server", "server", f"--{mode}", "--listen", f"127.0.0.1:{port}",
                         "--backend", f"127.0.0.1:{pf.ports['trusted']}", "--client-cert", "optional",
                         "--untrusted-backend", f"127.0.0.1:{pf.ports['inbound']}", "--xclient",
                         "--cert", str(certs.server.cert), "--key", str(certs.server.key),
                         "--allow", str(certs.client.cert), port=port)
        try:
            relay = swaks(port, flag, "--local-interface", "127.0.0.3", body="stranger relaying")
            inbound = swaks(port, flag, "--local-interface", "127.0.0.3", "--to", "b@certproxy.test",
                            body="stranger delivering")
            laptop = swaks(port, flag, *cert_args(certs.client), body="laptop relaying")
            log = proc.wait_log("cert=allowed")
        finally:
            proc.stop()
        assert relay.returncode != 0 and "Relay access denied" in relay.stdout, relay.stdout
        assert inbound.returncode == 0 and laptop.returncode == 0, inbound.stdout + laptop.stdout
        msgs = {m.split(b"\n\n", 1)[1].strip(): m.decode() for m in pf.messages(2)}
        assert "(unknown [127.0.0.3])" in msgs[b"stranger delivering"]
        assert "with ESMTPA" in msgs[b"laptop relaying"]
        assert f"backend=127.0.0.1:{pf.ports['inbound']}" in log and "cert=none" in log

    @pytest.mark.parametrize("version", ["v1", "v2"])
    def test_proxy_protocol_gives_postfix_the_real_address(self, tmp_path, certs, fronted_postfix, version):
        pf, port = fronted_postfix, free_port()
        proc = certproxy(tmp_path, "server", "server", "--tls", "--listen", f"127.0.0.1:{port}",
                         "--backend", f"127.0.0.1:{pf.ports['proxy']}", "--proxy-protocol", version,
                         "--cert", str(certs.server.cert), "--key", str(certs.server.key),
                         "--allow", str(certs.client.cert), port=port)
        try:
            ok = swaks(port, "-tlsc", *cert_args(certs.client), "--local-interface", "127.0.0.2", body="from .2")
            other = swaks(port, "-tlsc", *cert_args(certs.client), "--local-interface", "127.0.0.3", body="from .3")
        finally:
            proc.stop()
        assert ok.returncode == 0, ok.stdout + pf.maillog()
        # Postfix relays for 127.0.0.2 only: without the header both would be 127.0.0.1, alike.
        assert other.returncode != 0 and "Relay access denied" in other.stdout, other.stdout
        assert "(localhost [127.0.0.2])" in pf.messages(1)[0].decode() or \
            "[127.0.0.2])" in pf.messages(1)[0].decode()
