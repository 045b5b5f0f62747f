"""Issue 16: a laptop's own MTA presenting its own client certificate straight to certproxy server (no
certproxy client on the laptop), and Exim behind certproxy server, told the client's address by PROXY.

Laptop MTAs (each over STARTTLS, as on port 587, and implicit TLS, as on 465, pinning or verifying the
server's certificate): Postfix (``relayhost``, ``smtp_tls_security_level = fingerprint``), Exim 4.96 (a
manualroute smarthost, an smtp transport with ``tls_certificate``), msmtp (``tls_cert_file``,
``tls_fingerprint``). The message reaches smtp-sink behind certproxy with its body intact. With a
certificate certproxy does not allow, each MTA is refused (``554 5.7.1 certificate not authorised``) and
the tests pin down what it then does with the message — bounce, defer, or exit — since that decides
whether a refusal should be temporary. With ``--soft-refusal`` (``454 4.7.1``) Postfix over STARTTLS and
Exim defer instead, keep the message without telling the sender, and deliver it once the certificate is
allowed (test_sendmail.py: sendmail too).

Exim behind certproxy server (``--proxy-protocol``, ``hosts_proxy``): Exim sees the laptop's real address,
relays only for what certproxy vouched for, and refuses the same port reached without certproxy.

Every daemon is started here on free loopback ports and stopped by PID; nothing waits by sleeping."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from realpeers import Exim, PostfixRelayClient, Process, free_port, require_tool, smtp_sink, wait_files

ROOT = Path(__file__).resolve().parent.parent

SENDER = "a@laptop.certproxy.test"
RECIPIENT = "b@example.net"
REFUSAL = "554 5.7.1 certificate not authorised"
SOFT_REFUSAL = "454 4.7.1 certificate not authorised; try again later"  # certproxy server --soft-refusal
MODES = ["starttls", "tls"]  # certproxy server --starttls (587) / --tls (465)

# What could go wrong on the way: dot-stuffing (a lone dot, leading dots), trailing blanks, a tab, 8-bit text,
# a long line. Every MTA stuffs dots on the wire; certproxy must find the real end of the data and pass the rest.
BODY = ("Sent by the laptop's own MTA, with its own certificate.\n"
        ".\n"
        "..two dots\n"
        ".one dot\n"
        "trailing blanks   \n"
        "\ttab first\n"
        "8-bit: gr\u00fc\u00dfe aus K\u00f6ln\n"
        + "x" * 900 + "\n"
        "last line\n")


def message(subject: str) -> bytes:
    return (f"From: {SENDER}\nTo: {RECIPIENT}\nSubject: {subject}\nMIME-Version: 1.0\n"
            f"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n{BODY}").encode()


def wait_for(read, text: str, timeout: float = 20) -> str:
    """``read()`` once it contains ``text`` (or as it is at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        content = read()
        if text in content or time.monotonic() > deadline:
            return content
        time.sleep(0.05)


def lines_with(text: str, log: str) -> list[str]:
    return [line for line in log.splitlines() if text in line]


@dataclass
class Front:
    """certproxy server (a process) in front of smtp-sink; ``--allow`` is a directory holding the laptop's
    certificate, so a test can allow another one and reload."""

    proc: Process
    mode: str
    sink: Process
    out: Path
    allow: Path
    soft_refusal: bool = False

    @property
    def refusal(self) -> str:
        """What certproxy answers a certificate it does not allow (yet)."""
        return SOFT_REFUSAL if self.soft_refusal else REFUSAL

    @property
    def port(self) -> int:
        return self.proc.port

    def session_line(self, outcome: str) -> str:
        log = self.proc.wait_log(f"outcome={outcome}")
        [line] = lines_with("session id=", log)
        return line

    def assert_delivered(self, subject: str, pair, refused_first: bool = False) -> bytes:
        """One message at the sink, from a session certproxy allowed for ``pair`` (``refused_first``: the
        session after the one that refused it), its body intact."""
        if refused_first:
            lines = lines_with("session id=", self.proc.wait_log("outcome=ok"))
            assert len(lines) == 2 and f"cert_fp={pair.fp} cert=refused" in lines[0], lines
            assert "outcome=refused" in lines[0] and "outcome=ok" in lines[1], lines
            line = lines[1]
        else:
            line = self.session_line("ok")
        assert f"cert_fp={pair.fp} cert=allowed" in line, line
        assert f"tls={'starttls' if self.mode == 'starttls' else 'implicit'} " in line, line
        files = wait_files(self.out, 1)
        assert len(files) == 1, files
        data = files[0].read_bytes()
        head, body = data.split(b"\n\n", 1)
        assert re.search(rf"^X-Rcpt-Args: <{re.escape(RECIPIENT)}>( |$)".encode(), head, re.MULTILINE), head
        assert f"Subject: {subject}".encode() in head.split(b"\n"), head
        # smtp-sink -d writes lines with LF and the end-of-data line as one more empty line.
        assert body == BODY.encode() + b"\n", body
        return data

    def assert_refused(self, pair) -> str:
        """certproxy refused ``pair`` in one log line, and nothing reached the sink."""
        line = self.session_line("refused")
        assert f'cert_subject="CN=stranger" cert_fp={pair.fp} cert=refused' in line, line
        assert 'reason="certificate is not an --allow certificate"' in line, line
        assert "backend=" not in line, line
        # The session is over and certproxy never connected to the sink: nothing can still be on its way.
        assert wait_files(self.out, 1, timeout=0) == []
        return line

    def allow_and_reload(self, pair) -> None:
        """Put ``pair``'s certificate in the --allow directory and SIGHUP certproxy."""
        shutil.copy(pair.cert, self.allow / "new-laptop.pem")
        self.proc.proc.send_signal(signal.SIGHUP)
        log = self.proc.wait_log("reload outcome=ok")
        assert "reload outcome=ok" in log, log


@pytest.fixture
def front(tmp_path, certs):
    """Factory: certproxy server (``mode``: starttls or tls; ``soft_refusal``: with --soft-refusal) in front of
    smtp-sink, allowing certs.client."""
    started: list[Front] = []

    def start(mode: str, soft_refusal: bool = False) -> Front:
        sink, out = smtp_sink(tmp_path)
        allow = tmp_path / "allow"
        allow.mkdir()
        shutil.copy(certs.client.cert, allow / "laptop.pem")
        port = free_port()
        try:
            proc = Process([sys.executable, str(ROOT / "certproxy.py"), "server", f"--{mode}",
                            "--listen", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{sink.port}",
                            "--cert", str(certs.server.cert), "--key", str(certs.server.key), "--allow", str(allow),
                            "--hostname", "mx.certproxy.test", *(["--soft-refusal"] if soft_refusal else [])],
                           port, tmp_path / "certproxy.log")
        except BaseException:
            sink.stop()
            shutil.rmtree(out, ignore_errors=True)
            raise
        fr = Front(proc, mode, sink, out, allow, soft_refusal)
        started.append(fr)
        return fr

    yield start
    for fr in started:
        fr.proc.stop()
        fr.sink.stop()
        shutil.rmtree(fr.out, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Postfix on the laptop


class PostfixLaptop(PostfixRelayClient):
    """The laptop's Postfix: ``relayhost = [127.0.0.1]:PORT`` of certproxy server, the laptop's own client
    certificate, the server's certificate pinned (``fingerprint``, sha256), ``smtp_tls_wrappermode`` for
    implicit TLS. Mail for the laptop's own domain (bounces) lands in ``spool``. ``soft_bounce``: set
    ``soft_bounce = yes`` in ``main.cf`` (everything), or in ``master.cf`` on the ``smtp`` service only."""

    def __init__(self, workdir: Path, certs, pair, port: int, mode: str, soft_bounce: str | None = None) -> None:
        super().__init__(workdir, certs.server.cert, certs.server.key, f"[127.0.0.1]:{port}")
        cert = shutil.copy(pair.cert, self.dir / "client.pem")
        key = shutil.copy(pair.key, self.dir / "client.key")
        Path(key).chmod(0o600)
        settings = {
            "mydestination": "laptop.certproxy.test",
            "smtp_tls_security_level": "fingerprint",
            "smtp_tls_fingerprint_digest": "sha256",
            "smtp_tls_fingerprint_cert_match": certs.server.fp,
            "smtp_tls_cert_file": cert,
            "smtp_tls_key_file": key,
            "smtp_tls_wrappermode": "yes" if mode == "tls" else "no",
            "smtp_tls_loglevel": "1",
            "soft_bounce": "yes" if soft_bounce == "main.cf" else "no",
        }
        main_cf = self.confdir / "main.cf"
        kept = [line for line in main_cf.read_text().splitlines() if line.split(" =", 1)[0] not in settings]
        main_cf.write_text("\n".join(kept) + "\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        if soft_bounce == "master.cf":
            master_cf = self.confdir / "master.cf"
            smtp = "smtp      unix  -       -       n       -       -       smtp\n"
            assert smtp in master_cf.read_text()
            master_cf.write_text(master_cf.read_text().replace(smtp, smtp[:-1] + " -o soft_bounce=yes\n"))

    def wait_maillog(self, text: str) -> str:
        return wait_for(self.maillog, text)

    def queue(self) -> str:
        return subprocess.run(["postqueue", "-c", str(self.confdir), "-p"], capture_output=True, text=True,
                              timeout=60).stdout


def postfix_status(log: str, port: int) -> list[str]:
    """The smtp client's delivery lines for the test's recipient, from ``relay=`` on."""
    prefix = f"to=<{RECIPIENT}>, relay=127.0.0.1[127.0.0.1]:{port}, "
    return [re.sub(r"delay=\S+ delays=\S+ ", "", line.split(prefix, 1)[1].replace(",", ""))
            for line in lines_with(prefix, log)]


class TestPostfixLaptop:
    @pytest.mark.parametrize("mode", MODES)
    def test_delivers_with_its_own_certificate(self, tmp_path, certs, front, mode):
        fr = front(mode)
        with PostfixLaptop(tmp_path / "laptop", certs, certs.client, fr.port, mode) as pf:
            r = pf.sendmail(SENDER, message(f"postfix {mode}"))
            assert r.returncode == 0, r.stdout + r.stderr
            log = pf.wait_maillog("status=")
            queue = wait_for(pf.queue, "Mail queue is empty")  # qmgr removes it just after the smtp line
        assert postfix_status(log, fr.port) == ["dsn=2.0.0 status=sent (250 2.0.0 Ok)"], log
        # smtp_tls_security_level = fingerprint: Postfix checked certproxy's certificate against the pin.
        assert lines_with(f"Verified TLS connection established to 127.0.0.1[127.0.0.1]:{fr.port}: TLSv1.3", log), log
        assert "Mail queue is empty" in queue, queue
        fr.assert_delivered(f"postfix {mode}", certs.client)

    def test_refused_over_starttls_is_bounced(self, tmp_path, certs, front):
        """certproxy's 554 answers the EHLO inside TLS: Postfix takes it as permanent and bounces at once."""
        fr = front("starttls")
        with PostfixLaptop(tmp_path / "laptop", certs, certs.other_client, fr.port, "starttls") as pf:
            assert pf.sendmail(SENDER, message("postfix refused")).returncode == 0
            log = pf.wait_maillog("status=bounced")
            [ndr] = pf.messages(1)  # the non-delivery report, delivered to the sender on the laptop
            queue = wait_for(pf.queue, "Mail queue is empty")
        assert postfix_status(log, fr.port) == [
            f"dsn=5.7.1 status=bounced (host 127.0.0.1[127.0.0.1] refused to talk to me: {REFUSAL})"], log
        assert f"Diagnostic-Code: smtp; {REFUSAL}\n".encode() in ndr and b"Action: failed\n" in ndr, ndr
        assert "Mail queue is empty" in queue, queue
        fr.assert_refused(certs.other_client)

    @pytest.mark.parametrize("mode, soft_bounce, soft_refusal, status", [
        ("tls", None, False, "deferred"),
        ("starttls", "main.cf", False, "SOFTBOUNCE"),
        ("starttls", "master.cf", False, "SOFTBOUNCE"),
        ("starttls", None, True, "deferred"),
    ], ids=["implicit-tls", "starttls-soft_bounce-main.cf", "starttls-soft_bounce-master.cf", "starttls-soft-refusal"])
    def test_refused_mail_stays_queued_and_goes_once_allowed(self, tmp_path, certs, front, mode, soft_bounce,
                                                             soft_refusal, status):
        """Implicit TLS: the refusal is the greeting, and Postfix skips a 5xx greeting as a temporary problem
        (smtp_skip_5xx_greeting = yes, the default). STARTTLS with soft_bounce = yes (for everything in
        main.cf, or for the smtp client alone in master.cf): deferred too; or, with no change on the laptop,
        certproxy server --soft-refusal's 454. The message then waits in the queue until the certificate is
        allowed; a flush delivers it."""
        fr = front(mode, soft_refusal)
        refused = f"(host 127.0.0.1[127.0.0.1] refused to talk to me: {fr.refusal})"
        with PostfixLaptop(tmp_path / "laptop", certs, certs.other_client, fr.port, mode, soft_bounce) as pf:
            assert pf.sendmail(SENDER, message("postfix queued")).returncode == 0
            log = pf.wait_maillog(f"status={status}")
            queue = wait_for(pf.queue, refused)
            fr.assert_refused(certs.other_client)
            fr.allow_and_reload(certs.other_client)
            assert pf.flush().returncode == 0
            log = pf.wait_maillog("status=sent")
            bounces = wait_files(pf.spool, 1, timeout=0)
            assert postfix_status(log, fr.port) == [f"dsn=4.7.1 status={status} {refused}",
                                                    "dsn=2.0.0 status=sent (250 2.0.0 Ok)"], log
        assert refused in queue and RECIPIENT in queue, queue
        assert bounces == []  # no delay warning, no bounce: the sender learns nothing
        fr.assert_delivered("postfix queued", certs.other_client, refused_first=True)


# ---------------------------------------------------------------------------------------------------
# Exim on the laptop


class EximLaptop(Exim):
    """The laptop's Exim 4.96: no daemon; ``submit()`` queues, ``deliver()`` runs the queue, which sends by a
    manualroute smarthost to certproxy server (``remote_smtp``: the laptop's certificate, TLS required,
    the server's certificate verified; ``protocol = smtps`` for implicit TLS). Bounces for the laptop's
    own domain land in ``spool``. Retry rules are Exim's default ones."""

    def __init__(self, certs, pair, port: int, mode: str) -> None:
        self._prepare()
        cert = self.private_copy(pair.cert, "client.pem")
        key = self.private_copy(pair.key, "client.key")
        server = shutil.copy(certs.server.cert, self.dir / "server.pem")
        smtps = "  protocol = smtps\n" if mode == "tls" else ""
        self.write_config(f"""\
primary_hostname = laptop.certproxy.test
qualify_domain = laptop.certproxy.test
log_selector = +outgoing_port

begin routers

home:
  driver = accept
  domains = laptop.certproxy.test
  transport = save

smarthost:
  driver = manualroute
  route_list = * 127.0.0.1::{port}
  # in a test certproxy server is on this machine; Exim would otherwise call 127.0.0.1 a routing loop
  self = send
  transport = remote_smtp

begin transports

remote_smtp:
  driver = smtp
  hosts_require_tls = *
  tls_certificate = {cert}
  tls_privatekey = {key}
  tls_verify_certificates = {server}
  tls_verify_hosts = *
{smtps}
save:
  driver = appendfile
  directory = {self.spool}
  user = nobody
  create_directory = false

begin retry

*   *   F,2h,15m; G,16h,1h,1.5; F,4d,6h
""")

    def start(self) -> EximLaptop:
        return self  # nothing listens: mail is submitted on the command line


def exim_lines(log: str, marker: str) -> list[str]:
    """Mainlog lines with ``marker`` (``=>``, ``**``, ``==``, ``<=``), without their time stamp and id."""
    return [line.split(f" {marker} ", 1)[1] for line in log.splitlines() if f" {marker} " in line]


class TestEximLaptop:
    @pytest.mark.parametrize("mode", MODES)
    def test_delivers_with_its_own_certificate(self, certs, front, mode):
        fr = front(mode)
        with EximLaptop(certs, certs.client, fr.port, mode) as ex:
            r = ex.submit(SENDER, message(f"exim {mode}"))
            assert r.returncode == 0, r.stdout + r.stderr
            ex.deliver()  # returns once the delivery attempt is over
            log, queue = ex.mainlog(), ex.queue()
        [sent] = exim_lines(log, "=>")
        # CV=yes: Exim verified certproxy's certificate (tls_verify_certificates, tls_verify_hosts = *).
        assert re.fullmatch(rf"{RECIPIENT} R=smarthost T=remote_smtp H=127\.0\.0\.1 \[127\.0\.0\.1\]:{fr.port} "
                            r"X=TLS1\.3:\S+ CV=yes C=\"250 2\.0\.0 Ok\"", sent), sent
        assert queue == "", queue
        fr.assert_delivered(f"exim {mode}", certs.client)

    @pytest.mark.parametrize("mode", MODES)
    def test_refused_is_a_permanent_error_and_bounces(self, certs, front, mode):
        """Exim treats the 554 as permanent in both modes: the message fails at the first attempt (``**``)
        and the sender gets a bounce. Over STARTTLS Exim ignores the refused EHLO and fails at MAIL FROM."""
        fr = front(mode)
        with EximLaptop(certs, certs.other_client, fr.port, mode) as ex:
            assert ex.submit(SENDER, message("exim refused")).returncode == 0
            ex.deliver()
            ex.deliver()  # the bounce, to the sender on the laptop
            log, queue = ex.mainlog(), ex.queue()
            bounces = [p.read_text() for p in wait_files(ex.spool, 1, timeout=0)]
        [failed] = exim_lines(log, "**")
        # (sic) Exim 4.96 names a refused greeting as an empty command, written as "\n".
        after = "MAIL FROM:<a@laptop.certproxy.test>" if mode == "starttls" else "\\n"
        assert re.fullmatch(rf"{RECIPIENT} R=smarthost T=remote_smtp H=127\.0\.0\.1 \[127\.0\.0\.1\]:{fr.port} "
                            rf"X=TLS1\.3:\S+ CV=yes: SMTP error from remote mail server after {re.escape(after)}: "
                            rf"{REFUSAL}", failed), failed
        assert exim_lines(log, "==") == []  # never deferred
        assert len(exim_lines(log, "<= <>")) == 1  # one bounce
        assert queue == "", queue
        assert len(bounces) == 1, bounces
        ndr = bounces[0]
        assert "This is a permanent error." in ndr and f"\nDiagnostic-Code: smtp; {REFUSAL}\n" in ndr, ndr
        fr.assert_refused(certs.other_client)

    @pytest.mark.parametrize("mode", MODES)
    def test_soft_refusal_defers_until_allowed(self, certs, front, mode):
        """certproxy server --soft-refusal: Exim takes the 454 as temporary (``==``, defer) in both modes and
        keeps the message without telling the sender; once the certificate is allowed, the next queue run
        delivers it. (``-qff`` forces the run past Exim's retry time, F,2h,15m: 15 minutes here.)"""
        fr = front(mode, soft_refusal=True)
        with EximLaptop(certs, certs.other_client, fr.port, mode) as ex:
            assert ex.submit(SENDER, message("exim soft refusal")).returncode == 0
            ex.deliver()
            log, queue = ex.mainlog(), ex.queue()
            fr.assert_refused(certs.other_client)
            fr.allow_and_reload(certs.other_client)
            ex.deliver()
            after = ex.mainlog()[len(log):]
            queue_after = ex.queue()
            bounces = wait_files(ex.spool, 1, timeout=0)
        # Exim logs the host's error, then the recipient's deferral; errno -45 is ERRNO_MAIL4XX (a 4xx to
        # MAIL); the 454 greeting of implicit TLS has none. The refused EHLO is ignored as with the 554.
        after_what, errno = {"starttls": (f"MAIL FROM:<{SENDER}>", "-45"), "tls": ("\\n", "0")}[mode]
        error = f"SMTP error from remote mail server after {after_what}: {SOFT_REFUSAL}"
        [deferred] = exim_lines(log, "==")
        assert deferred == (f"{RECIPIENT} R=smarthost T=remote_smtp defer ({errno}) H=127.0.0.1 [127.0.0.1]:{fr.port}: "
                            f"{error}"), deferred
        assert exim_lines(log, "**") == [] and exim_lines(log, "=>") == [] and exim_lines(log, "<= <>") == [], log
        [msgid] = re.findall(rf"^\S+ \S+ (\S+) <= {re.escape(SENDER)} U=", log, re.M)
        assert re.fullmatch(rf" *0m +\S+ {msgid} <{re.escape(SENDER)}>\n +{re.escape(RECIPIENT)}\n\n", queue), queue
        [sent] = exim_lines(after, "=>")
        assert re.fullmatch(rf"{RECIPIENT} R=smarthost T=remote_smtp H=127\.0\.0\.1 \[127\.0\.0\.1\]:{fr.port} "
                            r"X=TLS1\.3:\S+ CV=yes C=\"250 2\.0\.0 Ok\"", sent), sent
        assert f" {msgid} Completed\n" in after, after
        assert exim_lines(after, "**") == [] and exim_lines(after, "<= <>") == [], after  # no bounce, ever
        assert queue_after == "" and bounces == [], (queue_after, bounces)
        fr.assert_delivered("exim soft refusal", certs.other_client, refused_first=True)


# ---------------------------------------------------------------------------------------------------
# msmtp on the laptop


def msmtp(tmp_path: Path, certs, pair, port: int, mode: str, subject: str) -> tuple[subprocess.CompletedProcess, str]:
    require_tool("msmtp")
    rc, log = tmp_path / "msmtprc", tmp_path / "msmtp.log"
    rc.write_text(f"""\
defaults
logfile {log}
syslog off

account certproxy
host 127.0.0.1
port {port}
tls on
tls_starttls {"on" if mode == "starttls" else "off"}
tls_cert_file {pair.cert}
tls_key_file {pair.key}
tls_fingerprint {certs.server.fp}
auth off
from {SENDER}
domain laptop.certproxy.test

account default : certproxy
""")
    rc.chmod(0o600)
    r = subprocess.run(["msmtp", "-C", str(rc), "-t"], input=message(subject), capture_output=True, timeout=60)
    return r, log.read_text()


class TestMsmtp:
    @pytest.mark.parametrize("mode", MODES)
    def test_delivers_with_its_own_certificate(self, tmp_path, certs, front, mode):
        fr = front(mode)
        r, log = msmtp(tmp_path, certs, certs.client, fr.port, mode, f"msmtp {mode}")
        assert r.returncode == 0, r.stdout + r.stderr
        assert re.fullmatch(rf"\w{{3}} \d\d \d\d:\d\d:\d\d host=127\.0\.0\.1 tls=on auth=off from={SENDER} "
                            rf"recipients={RECIPIENT} mailsize=\d+ smtpstatus=250 smtpmsg='250 2\.0\.0 Ok' "
                            r"exitcode=EX_OK\n", log), log
        fr.assert_delivered(f"msmtp {mode}", certs.client)

    @pytest.mark.parametrize("mode", MODES)
    def test_refused_exits_76(self, tmp_path, certs, front, mode):
        """msmtp has no queue: it exits EX_PROTOCOL (76) and prints certproxy's reply; the message stays
        wherever the program that called msmtp keeps it."""
        fr = front(mode)
        r, log = msmtp(tmp_path, certs, certs.other_client, fr.port, mode, "msmtp refused")
        why = {"starttls": "SMTP server does not accept EHLO or HELO commands",
               "tls": "cannot get initial OK message from server"}[mode]
        assert r.returncode == 76, r.stdout + r.stderr
        assert r.stderr.decode().splitlines()[:2] == [f"msmtp: {why}", f"msmtp: server message: {REFUSAL}"], r.stderr
        assert log.endswith(f"smtpstatus=554 smtpmsg='{REFUSAL}' errormsg='{why}' exitcode=EX_PROTOCOL\n"), log
        fr.assert_refused(certs.other_client)


# ---------------------------------------------------------------------------------------------------
# Exim behind certproxy server, told the client's address by the PROXY protocol


class EximBehindCertproxy(Exim):
    """Exim 4.96 (the heavy build: the light one has no PROXY support) with the README's recipe:

    - ``trusted_port``: certproxy's ``--backend``; PROXY header required from 127.0.0.1; relays.
    - ``untrusted_port``: certproxy's ``--untrusted-backend``; PROXY header required; mail for
      certproxy.test only.
    - ``local_port``: any other client (say a local web application), no PROXY header; certproxy.test only.

    Relaying is granted by ``$received_port`` plus ``$proxy_local_address`` (the address the PROXY
    header came from, set only by a valid header), never by ``$sender_host_address``, which on a PROXY
    port is the laptop's. Everything accepted is queued; ``messages()`` delivers it to ``spool``."""

    def __init__(self) -> None:
        require_tool("swaks")
        self._prepare(proxy=True)
        self.trusted_port, self.untrusted_port, self.local_port = free_port(), free_port(), free_port()
        self.ports = [self.trusted_port, self.untrusted_port, self.local_port]
        t, u = self.trusted_port, self.untrusted_port
        self.write_config(f"""\
primary_hostname = exim.certproxy.test
qualify_domain = certproxy.test
domainlist local_domains = certproxy.test
local_interfaces = 127.0.0.1
daemon_smtp_ports = {t} : {u} : {self.local_port}
tls_advertise_hosts =
log_selector = +proxy +incoming_port +incoming_interface
{self.recipe(t, u)}{self.spool_delivery()}""")

    @staticmethod
    def recipe(trusted: int, untrusted: int) -> str:
        """The main-section options and ACL of the README's recipe (ports as given)."""
        return f"""\
# certproxy's ports (and only they) must start with a PROXY header, and only from 127.0.0.1
hosts_proxy = <; ${{if or{{{{eq{{$received_port}}{{{trusted}}}}}{{eq{{$received_port}}{{{untrusted}}}}}}}{{127.0.0.1}}}}
acl_smtp_rcpt = acl_check_rcpt

begin acl

acl_check_rcpt:
  # certproxy's --backend port: certproxy checked the client certificate
  accept  condition = ${{if eq{{$received_port}}{{{trusted}}}}}
          condition = ${{if eq{{$proxy_local_address}}{{127.0.0.1}}}}
  accept  domains   = +local_domains
  deny    message   = relay not permitted
"""


def certproxy_for_exim(tmp_path: Path, certs, exim: EximBehindCertproxy, mode: str, version: str) -> Process:
    port = free_port()
    return Process([sys.executable, str(ROOT / "certproxy.py"), "server", f"--{mode}", "--listen", f"127.0.0.1:{port}",
                    "--backend", f"127.0.0.1:{exim.trusted_port}", "--client-cert", "optional",
                    "--untrusted-backend", f"127.0.0.1:{exim.untrusted_port}", "--proxy-protocol", version,
                    "--cert", str(certs.server.cert), "--key", str(certs.server.key), "--allow", str(certs.client.cert),
                    "--hostname", "mx.certproxy.test"], port, tmp_path / "certproxy.log")


def swaks(port: int, mode: str, *args: str, to: str = RECIPIENT, body: str) -> subprocess.CompletedProcess:
    """swaks from 127.0.0.2 (so that it differs from certproxy's own 127.0.0.1)."""
    return subprocess.run(["swaks", "--server", f"127.0.0.1:{port}", "-tls" if mode == "starttls" else "-tlsc",
                           "--local-interface", "127.0.0.2", "--ehlo", "laptop.test", "--from", SENDER, "--to", to,
                           "--h-Subject", "behind certproxy", "--body", body, "--timeout", "30", *args],
                          capture_output=True, text=True, timeout=90)


def cert_args(pair) -> list[str]:
    return ["--tls-cert", str(pair.cert), "--tls-key", str(pair.key)]


def dialogue(source: str, port: int, commands: list[bytes], first: bytes = b"") -> list[bytes]:
    """A raw SMTP session from ``source``: ``first`` is sent before the greeting is read; then each command;
    returns every reply (the greeting first), each as its complete bytes."""
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0)) as s:
        f = s.makefile("rb")

        def reply() -> bytes:
            out = b""
            while True:
                line = f.readline()
                out += line
                if not line or line[3:4] != b"-":
                    return out

        s.sendall(first)
        replies.append(reply())
        for command in commands:
            s.sendall(command + b"\r\n")
            replies.append(reply())
        f.close()
    return replies


class TestEximBehindCertproxy:
    @pytest.fixture
    def exim(self):
        with EximBehindCertproxy() as ex:
            yield ex

    @pytest.mark.parametrize("version", ["v2", "v1"])
    @pytest.mark.parametrize("mode", MODES)
    def test_allowed_laptop_relays_and_exim_sees_its_address(self, tmp_path, certs, exim, mode, version):
        proc = certproxy_for_exim(tmp_path, certs, exim, mode, version)
        try:
            r = swaks(proc.port, mode, *cert_args(certs.client), body="relayed for a certificate")
            line = proc.wait_log("outcome=")
        finally:
            proc.stop()
        assert r.returncode == 0, r.stdout + r.stderr + exim.mainlog()
        log = exim.mainlog("main")
        [received] = exim_lines(log, "<=")
        # The laptop's address and port, the port certproxy used, and the proxy it came through (PRX).
        assert re.fullmatch(rf"{SENDER} H=\(laptop\.test\) \[127\.0\.0\.2\]:\d+ I=\[127\.0\.0\.1\]:{exim.trusted_port} "
                            r"P=esmtp PRX=127\.0\.0\.1 S=\d+ id=\S+", received), received
        [msg] = exim.messages(1)
        assert re.match(rb"Received: from \[127\.0\.0\.2\] \(port=\d+ helo=laptop\.test\)\n"
                        rb"\tby exim\.certproxy\.test with esmtp \(Exim 4\.96\)\n", msg), msg
        assert f"\tfor {RECIPIENT};\n".encode() in msg and b"\n\nrelayed for a certificate\n" in msg, msg
        assert "peer=127.0.0.2:" in line and "cert=allowed" in line, line
        assert f"backend=127.0.0.1:{exim.trusted_port} " in line and "outcome=ok" in line, line

    @pytest.mark.parametrize("mode", MODES)
    def test_strangers_land_on_the_untrusted_port_and_cannot_relay(self, tmp_path, certs, exim, mode):
        proc = certproxy_for_exim(tmp_path, certs, exim, mode, "v2")
        try:
            stranger = swaks(proc.port, mode, *cert_args(certs.other_client), body="stranger relaying")
            nocert = swaks(proc.port, mode, body="no certificate relaying")
            inbound = swaks(proc.port, mode, *cert_args(certs.other_client), to="b@certproxy.test",
                            body="stranger delivering")
            log = proc.wait_log("session id=3 ")
        finally:
            proc.stop()
        for r in (stranger, nocert):
            assert r.returncode != 0 and "<~* 550 relay not permitted\n" in r.stdout, r.stdout
        assert inbound.returncode == 0, inbound.stdout + exim.mainlog()
        rejected = [line.split(" H=", 1)[1] for line in lines_with("rejected RCPT", exim.mainlog("main"))]
        assert len(rejected) == 2 and all(
            re.fullmatch(rf"\(laptop\.test\) \[127\.0\.0\.2\]:\d+ I=\[127\.0\.0\.1\]:{exim.untrusted_port} "
                         rf"F=<{SENDER}> rejected RCPT <{RECIPIENT}>: relay not permitted", r)
            for r in rejected), rejected
        [msg] = exim.messages(1)
        assert re.match(rb"Received: from \[127\.0\.0\.2\] \(port=\d+ helo=laptop\.test\)\n", msg), msg
        assert b"\tfor b@certproxy.test;\n" in msg and b"\n\nstranger delivering\n" in msg, msg
        sessions = lines_with("session id=", log)
        assert len(sessions) == 3 and all(f"backend=127.0.0.1:{exim.untrusted_port} " in s for s in sessions), sessions
        assert f"cert_fp={certs.other_client.fp} cert=refused" in sessions[0] and "cert=none" in sessions[1], sessions

    def test_the_proxy_port_without_certproxy(self, exim):
        """Reached directly, certproxy's port relays for nobody: from 127.0.0.1 without a PROXY header Exim
        refuses everything but QUIT; from another address a PROXY header is just a bad command and the
        sender is who it really is; a local client on the plain port needs no header and cannot relay."""
        no_header = dialogue("127.0.0.1", exim.trusted_port, [b"MAIL FROM:<a@laptop.test>", b"RCPT TO:<b@example.net>",
                                                               b"QUIT"], first=b"EHLO laptop.test\r\n")
        forged = dialogue("127.0.0.2", exim.trusted_port, [b"PROXY TCP4 192.0.2.1 127.0.0.1 1000 465",
                                                           b"EHLO laptop.test", b"MAIL FROM:<a@laptop.test>",
                                                           b"RCPT TO:<b@example.net>", b"QUIT"])
        local = dialogue("127.0.0.1", exim.local_port, [b"EHLO localhost", b"MAIL FROM:<a@laptop.test>",
                                                         b"RCPT TO:<b@example.net>", b"RCPT TO:<b@certproxy.test>",
                                                         b"QUIT"])
        refused = b"503 Command refused, required Proxy negotiation failed\r\n"
        assert no_header[0].startswith(b"220 exim.certproxy.test ESMTP") and no_header[1:] == [
            refused, refused, b"221 exim.certproxy.test closing connection\r\n"], no_header
        assert forged[1] == b"500 unrecognized command\r\n", forged
        assert forged[2].startswith(b"250-exim.certproxy.test Hello laptop.test [127.0.0.2]\r\n"), forged
        assert forged[3:5] == [b"250 OK\r\n", b"550 relay not permitted\r\n"], forged
        assert local[3:5] == [b"550 relay not permitted\r\n", b"250 Accepted\r\n"], local
        assert exim.queue() == "", exim.mainlog()  # nothing accepted (the local session never sent DATA)
        log = exim.mainlog("main")
        rejected = [line.split(" H=", 1)[1] for line in lines_with("rejected RCPT", log)]
        assert len(rejected) == 2 and re.fullmatch(
            rf"\(laptop\.test\) \[127\.0\.0\.2\]:\d+ I=\[127\.0\.0\.1\]:{exim.trusted_port} F=<a@laptop\.test> "
            r"rejected RCPT <b@example\.net>: relay not permitted", rejected[0]), rejected  # not 192.0.2.1
        assert re.fullmatch(rf"\(localhost\) \[127\.0\.0\.1\]:\d+ I=\[127\.0\.0\.1\]:{exim.local_port} "
                            r"F=<a@laptop\.test> rejected RCPT <b@example\.net>: relay not permitted",
                            rejected[1]), rejected
        assert "192.0.2.1" not in log, log
