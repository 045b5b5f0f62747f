"""sendmail 8.17 as a real peer: Debian 12's sendmail-bin unpacked (not installed: it conflicts with postfix),
its .cf built with m4 from sendmail-cf, run as ``nobody`` on a free loopback port with its own queue.

What it takes to run the packaged binary under a test, each found the hard way:

- The unpacked tree (``/tmp/certproxy-sendmail``, see ``.ci/run``) holds sendmail-bin, sendmail-cf and m4
  (m4 is not otherwise installed). Libraries the binary links against that this machine lacks are unpacked
  into the same tree and found through ``LD_LIBRARY_PATH``; that only works once the binary's setgid bit
  (``root:mail 2755`` in the package) is cleared, since the loader ignores ``LD_LIBRARY_PATH`` in a setgid
  program. Nothing here needs the bit: the daemon runs as ``nobody`` and owns its own queue.
- sendmail qualifies its own host name before it reads any configuration (``-C``, ``confDOMAIN_NAME`` come
  too late): on a host named ``vm`` it logs "My unqualified host name (vm) unknown; sleeping for retry"
  and sleeps 60 s on every start, ``mailq`` included. Each invocation therefore runs in its own UTS and
  mount namespace (``unshare --uts --mount``, root) with a qualified host name and a private /etc/hosts
  bind-mounted over the real one (so the name resolves from files, never from DNS), then drops to
  ``nobody`` with ``setpriv`` before sendmail starts: the daemon never holds root or any capability.
- A daemon started by anyone but root or ``TrustedUser`` is refused ("Permission denied (real uid not
  trusted)"): ``confTRUSTED_USER`` is ``nobody``, who owns the instance's directory, queue (0700) and
  TLS key (0600). sendmail's file-safety checks then pass without any DontBlameSendmail.
- There is no syslog here: ``-D FILE -d89.8`` sends every log line to FILE instead (sm_syslog prints to
  the debug file at that debug level); ``-bD`` keeps the daemon in the foreground, so its PID is ours.
- A smart host of ``[127.0.0.1]`` is "local" (``$=w``, rule "delete local host" in MailerToTriple) and the
  mail goes out by DNS instead: ``relay:[127.0.0.1]`` names the mailer and skips that rule.
- Relaying: every .cf built from sendmail-cf lets 127.0.0.1 relay (``R127.0.0.1 $@ RELAY originated
  locally``), so the backend instance accepts mail for any domain from certproxy's loopback connections.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import smtplib
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from realpeers import end, free_port, unavailable, unpack_packages, wait_port

SENDMAIL_DIR = Path(os.environ.get("CERTPROXY_SENDMAIL_DIR", "/tmp/certproxy-sendmail"))
SENDMAIL_PACKAGES = ("sendmail-bin", "sendmail-cf", "m4")
BINARY = Path("usr/libexec/sendmail/sendmail")
USER = "nobody"  # the daemon's only identity; also its TrustedUser

# Run as root: a qualified host name and a private /etc/hosts in new UTS and mount namespaces (propagation
# private: nothing leaks to the host), then become USER; exec all the way down, so the PID is sendmail's.
_ISOLATE = ('hostname "$1" && mount --bind "$2" /etc/hosts && u=$3 && shift 3 && '
            'exec setpriv --reuid="$u" --regid="$(id -g "$u")" --clear-groups "$@"')


def _installed(package: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip() == "install ok installed"


def _missing_library_packages() -> list[str]:
    """sendmail-bin's library dependencies that this machine does not have (e.g. libldap-2.5-0)."""
    r = subprocess.run(["apt-cache", "depends", "sendmail-bin"], capture_output=True, text=True, timeout=60)
    deps = {line.split(":", 1)[1].strip() for line in r.stdout.splitlines()
            if line.strip().lstrip("|").startswith("Depends: lib")}
    return sorted(p for p in deps if not _installed(p))


def library_path(tree: Path = SENDMAIL_DIR) -> str:
    return ":".join(str(p) for p in sorted(tree.glob("usr/lib/*-linux-gnu")) + sorted(tree.glob("lib/*-linux-gnu")))


def environment(tree: Path = SENDMAIL_DIR) -> dict[str, str]:
    env = dict(os.environ)
    if lp := library_path(tree):
        env["LD_LIBRARY_PATH"] = lp
    return env


def missing_libraries(tree: Path = SENDMAIL_DIR) -> list[str]:
    r = subprocess.run(["ldd", str(tree / BINARY)], capture_output=True, text=True, env=environment(tree), timeout=60)
    return [line.split()[0] for line in r.stdout.splitlines() if "not found" in line]


def sendmail_tree() -> Path:
    """The unpacked tree; downloaded and unpacked once (as .ci/run does) when missing."""
    if os.geteuid() != 0:
        unavailable("sendmail needs root here: unshare --uts --mount (a qualified host name before it starts)")
    for tool in ("unshare", "setpriv", "mount", "hostname", "ldd"):
        if shutil.which(tool) is None:
            unavailable(f"sendmail needs {tool} (util-linux / libc-bin)")
    binary, m4 = SENDMAIL_DIR / BINARY, SENDMAIL_DIR / "usr/bin/m4"
    if not (binary.exists() and m4.exists()):
        unpack_packages(SENDMAIL_DIR, (*SENDMAIL_PACKAGES, *_missing_library_packages()))
    mode = binary.stat().st_mode
    if mode & stat.S_ISGID:  # else the loader ignores LD_LIBRARY_PATH (and nothing here needs group mail)
        binary.chmod(mode & ~stat.S_ISGID)
    if missing := missing_libraries():
        unavailable(f"{binary} needs {', '.join(missing)}: unpack the package(s) into {SENDMAIL_DIR} (.ci/run does)")
    return SENDMAIL_DIR


class Sendmail:
    """One sendmail daemon on 127.0.0.1:``port`` with its own .cf, queue and log.

    ``relay_port``: the laptop role — all mail goes to the smart host ``relay:[127.0.0.1]`` on that port
    (``RELAY_MAILER_ARGS = TCP $h PORT``), delivered at once in the background. With ``client_cert`` and
    ``client_key`` sendmail presents them when the smart host offers STARTTLS (``confCLIENT_CERT``,
    ``confCLIENT_KEY``); with ``server_cert`` the smart host must present exactly that certificate
    (``confCACERT`` holds only it, and the access map says ``TLS_Srv:127.0.0.1 VERIFY``): anything else is
    a ``454 4.7.0`` and the mail stays queued. ``queue_only``: the server role — accepted mail stays in
    the queue (``qf``/``df`` files), where a test reads it."""

    def __init__(self, hostname: str, *, relay_port: int | None = None, client_cert: Path | None = None,
                 client_key: Path | None = None, server_cert: Path | None = None, queue_only: bool = False) -> None:
        self.tree = sendmail_tree()
        self.binary = self.tree / BINARY
        self.hostname = hostname
        self.port = free_port()
        # nobody must reach everything: pytest's tmp dirs are 0700 root.
        self.dir = Path(tempfile.mkdtemp(prefix="certproxy-sendmail-"))
        self.dir.chmod(0o755)
        self.queue = self.dir / "mqueue"
        self.logfile = self.dir / "sendmail.log"
        self.hosts = self.dir / "hosts"
        self.cf = self.dir / "sendmail.cf"
        self.proc: subprocess.Popen | None = None
        self._out = None
        self.queue.mkdir(mode=0o700)
        self.hosts.write_text(f"127.0.0.1 localhost\n127.0.1.1 {hostname} {hostname.split('.')[0]}\n")
        (self.dir / "service.switch").write_text("hosts files\naliases files\n")
        lines = [
            "divert(-1)", "divert(0)dnl",
            "VERSIONID(`certproxy test')dnl",
            "OSTYPE(`linux')dnl",
            f"define(`confDOMAIN_NAME', `{hostname}')dnl",
            f"define(`QUEUE_DIR', `{self.queue}')dnl",
            f"define(`confPID_FILE', `{self.dir}/sendmail.pid')dnl",
            "define(`confHOST_STATUS_DIRECTORY', `')dnl",
            "define(`ALIAS_FILE', `')dnl",
            f"define(`HELP_FILE', `{self.tree}/etc/mail/helpfile')dnl",
            f"define(`confCW_FILE', `-o {self.dir}/local-host-names')dnl",
            f"define(`confSERVICE_SWITCH_FILE', `{self.dir}/service.switch')dnl",
            f"define(`confHOSTS_FILE', `{self.hosts}')dnl",
            f"define(`confDEAD_LETTER_DROP', `{self.dir}/dead.letter')dnl",
            f"define(`confTRUSTED_USER', `{USER}')dnl",
            f"define(`confDEF_USER_ID', `{USER}')dnl",
            "define(`confLOG_LEVEL', `14')dnl",
            "define(`confPRIVACY_FLAGS', `noexpn,novrfy')dnl",  # no X-Authentication-Warning headers
            "define(`confDONT_PROBE_INTERFACES', `true')dnl",  # no reverse lookups of this machine's addresses
            "define(`confAUTH_MECHANISMS', `')dnl",
            f"define(`confDELIVERY_MODE', `{'queueonly' if queue_only else 'background'}')dnl",
            "FEATURE(`nocanonify')dnl",
            "FEATURE(`accept_unresolvable_domains')dnl",
            "FEATURE(`no_default_msa')dnl",
        ]
        if relay_port is not None:
            lines += ["define(`SMART_HOST', `relay:[127.0.0.1]')dnl",
                      f"define(`RELAY_MAILER_ARGS', `TCP $h {relay_port}')dnl",
                      f"define(`ESMTP_MAILER_ARGS', `TCP $h {relay_port}')dnl"]
        tls = self.dir / "tls"
        tls.mkdir()
        if client_cert is not None:
            shutil.copy(client_cert, tls / "client.pem")
            shutil.copy(client_key or client_cert, tls / "client.key")
            (tls / "client.key").chmod(0o600)  # sendmail refuses a group- or world-readable key
            lines += [f"define(`confCLIENT_CERT', `{tls}/client.pem')dnl",
                      f"define(`confCLIENT_KEY', `{tls}/client.key')dnl"]
        if server_cert is not None:
            (tls / "ca").mkdir()
            shutil.copy(server_cert, tls / "ca" / "server.pem")
            (self.dir / "access").write_text("TLS_Srv:127.0.0.1\tVERIFY\n")
            lines += [f"define(`confCACERT', `{tls}/ca/server.pem')dnl",
                      f"define(`confCACERT_PATH', `{tls}/ca')dnl",
                      f"FEATURE(`access_db', `hash -T<TMPF> -o {self.dir}/access')dnl"]
        lines += [f"DAEMON_OPTIONS(`Family=inet, Addr=127.0.0.1, Port={self.port}, Name=MTA')dnl",
                  "CLIENT_OPTIONS(`Family=inet')dnl",
                  "MAILER(`smtp')dnl"]
        (self.dir / "sendmail.mc").write_text("\n".join(lines) + "\n")
        cfdir = self.tree / "usr/share/sendmail/cf"
        r = subprocess.run([str(self.tree / "usr/bin/m4"), f"-D_CF_DIR_={cfdir}/", str(cfdir / "m4/cf.m4"),
                            str(self.dir / "sendmail.mc")], capture_output=True, text=True, timeout=60)
        if r.returncode != 0 or r.stderr.strip():
            raise RuntimeError(f"m4 failed building {self.cf}: {r.stderr}")
        self.cf.write_text(r.stdout)
        subprocess.run(["chown", "-R", f"{USER}:", str(self.dir)], check=True)
        if server_cert is not None:
            r = subprocess.run(["setpriv", f"--reuid={USER}", f"--regid={pwd.getpwnam(USER).pw_gid}",
                                "--clear-groups", str(self.tree / "usr/libexec/sendmail/makemap"), "hash",
                                f"{self.dir}/access"], input=(self.dir / "access").read_bytes(),
                               capture_output=True, env=environment(), timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"makemap failed: {r.stdout!r}{r.stderr!r}")

    def argv(self, *args: str) -> list[str]:
        return ["unshare", "--uts", "--mount", "--", "sh", "-c", _ISOLATE, "sh", self.hostname, str(self.hosts),
                USER, str(self.binary), "-C", str(self.cf), *args]

    def run(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), input=input, capture_output=True, env=environment(), timeout=60)

    def start(self) -> Sendmail:
        self._out = open(self.dir / "stdout.log", "wb")
        # -D before -d; -d89.8: log lines to the -D file instead of syslog; -bD: a daemon in the foreground.
        self.proc = subprocess.Popen(self.argv("-bD", "-D", str(self.logfile), "-d89.8"), stdout=self._out,
                                     stderr=subprocess.STDOUT, env=environment())
        try:
            wait_port(self.port, what="sendmail")
        except RuntimeError as e:
            out = (self.dir / "stdout.log").read_text(errors="replace")
            log = self.log()
            self.stop()
            raise RuntimeError(f"{e}\n{out}\n{log}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None:
            end(self.proc)
        if self._out is not None:
            self._out.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Sendmail:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def wait_log(self, pattern: str, timeout: float = 20) -> str:
        """The log once a line matches the regular expression ``pattern`` (or as it is at the deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if re.search(pattern, log, re.M) or time.monotonic() > deadline:
                return log
            time.sleep(0.05)

    def submit(self, sender: str, recipient: str, message: bytes) -> str:
        """Hand ``message`` (LF line ends) to the daemon over SMTP, as a mail client does; its queue ID.
        CRLF on the wire: sendmail 8.17.1.9+deb12u2 answers a bare LF with ``421 4.5.0 Bare linefeed (LF) not
        allowed`` (its SMTP smuggling fix)."""
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname="mua.certproxy.test", timeout=30) as s:
            s.ehlo()
            code, reply = s.mail(sender)
            assert code == 250, reply
            code, reply = s.rcpt(recipient)
            assert code == 250, reply
            code, reply = s.data(message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        m = re.fullmatch(rb"2\.0\.0 (\w+) Message accepted for delivery", reply)
        assert code == 250 and m, (code, reply)
        return m.group(1).decode()

    def mailq(self, until: str | None = None, timeout: float = 20) -> str:
        """``mailq`` (``-bp``); with ``until``, once its output contains that (a deferral is logged before
        the queue file is rewritten with its reason)."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.run("-bp")
            out = r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
            if until is None or until in out or time.monotonic() > deadline:
                return out
            time.sleep(0.1)

    def run_queue(self) -> subprocess.CompletedProcess:
        """One queue run (``-q``), logging to the daemon's log file (``-D`` appends). It returns at once:
        the runner delivers in a child of its own, so a test waits for the log line it expects."""
        return self.run("-q", "-D", str(self.logfile), "-d89.8")

    def queue_files(self) -> list[str]:
        return sorted(p.name for p in self.queue.iterdir())
