"""Real peers started by the tests: a throwaway Postfix, smtp-sink, stunnel. Loopback only, stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_tool(*names: str) -> None:
    """Skip when a peer is not installed; fail instead under CERTPROXY_REQUIRE_PEERS=1 (CI)."""
    for name in names:
        if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists():
            msg = f"{name} is not installed (apt-get install postfix stunnel4 swaks openssl)"
            if os.environ.get("CERTPROXY_REQUIRE_PEERS") == "1":
                pytest.fail(msg)
            pytest.skip(msg)


def wait_port(port: int, timeout: float = 20, what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


def wait_files(directory: Path, n: int, timeout: float = 20) -> list[Path]:
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(p for p in directory.rglob("*") if p.is_file() and p.stat().st_size > 0)
        if len(files) >= n or time.monotonic() > deadline:
            return files
        time.sleep(0.05)


class Postfix:
    """Postfix with its own config dir: a STARTTLS-required port and an implicit-TLS port that relay
    only for client certificates in relay_clientcerts (sha256); every delivery lands in ``spool``."""

    def __init__(self, workdir: Path, cert: Path, key: Path, relay_clientcerts: dict[str, str],
                 extra: dict[str, str] | None = None, main_extra: str = "") -> None:
        """``extra``: more plain smtpd ports, name → master.cf ``-o`` options; their ports in ``ports``."""
        require_tool("postfix")
        # Postfix's unprivileged processes must reach these paths: pytest's tmp dirs are 0700.
        self.dir = Path(tempfile.mkdtemp(prefix="certproxy-postfix-"))
        self.dir.chmod(0o755)
        self.confdir = self.dir / "etc"
        self.spool = self.dir / "spool"
        self.starttls_port = free_port()
        self.tls_port = free_port()
        self.ports = {name: free_port() for name in extra or {}}
        extra_lines = "".join(f"127.0.0.1:{self.ports[name]} inet n - n - - smtpd {opts}\n"
                              for name, opts in (extra or {}).items())
        for d in (self.confdir, self.spool, self.dir / "queue", self.dir / "data"):
            d.mkdir(parents=True, exist_ok=True)
        self.spool.chmod(0o777)
        shutil.chown(self.dir / "data", "postfix")
        save = self.dir / "save.sh"
        save.write_text(f'#!/bin/sh\ncat > "{self.spool}/msg.$$.$(date +%s%N)"\n')
        save.chmod(0o755)
        (self.confdir / "relay_clientcerts").write_text(
            "".join(f"{fp} {name}\n" for fp, name in relay_clientcerts.items()))
        key_copy = self.dir / "server.key"
        shutil.copy(key, key_copy)
        key_copy.chmod(0o600)
        cert = shutil.copy(cert, self.dir / "server.pem")
        (self.confdir / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {self.dir}/queue
data_directory = {self.dir}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.certproxy.test
mydomain = certproxy.test
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks =
maillog_file = {self.dir}/maillog
maillog_file_prefixes = /var, /dev/stdout, {self.dir}
smtpd_tls_chain_files = {key_copy}, {cert}
smtpd_tls_security_level = may
smtpd_tls_ask_ccert = yes
smtpd_tls_fingerprint_digest = sha256
smtpd_tls_protocols = >=TLSv1.2
smtpd_tls_mandatory_protocols = >=TLSv1.2
relay_clientcerts = texthash:{self.confdir}/relay_clientcerts
smtpd_relay_restrictions = permit_tls_clientcerts, reject_unauth_destination
smtpd_recipient_restrictions =
default_transport = save
relay_transport = save
local_transport = save
alias_maps =
alias_database =
biff = no
{main_extra}""")
        (self.confdir / "master.cf").write_text(f"""\
127.0.0.1:{self.starttls_port} inet n - n - - smtpd -o smtpd_tls_security_level=encrypt
127.0.0.1:{self.tls_port} inet n - n - - smtpd -o smtpd_tls_wrappermode=yes
{extra_lines}pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
save      unix  -       n       n       -       -       pipe flags=Rq user=nobody argv={save}
""")

    def postfix(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["script", "-qc", " ".join(["postfix", "-c", str(self.confdir), *args]), "/dev/null"],
                              capture_output=True, text=True, timeout=60)

    def start(self) -> Postfix:
        r = self.postfix("start")
        try:
            wait_port(self.starttls_port, what="postfix")
            wait_port(self.tls_port, what="postfix")
            for port in self.ports.values():
                wait_port(port, what="postfix")
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}\n{r.stdout}{r.stderr}\n{self.maillog()}") from None
        return self

    def stop(self) -> None:
        self.postfix("stop")
        pidfile = self.dir / "queue" / "pid" / "master.pid"
        if pidfile.exists():
            try:
                pid = int(pidfile.read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
            except (ValueError, ProcessLookupError, IndexError):
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def maillog(self) -> str:
        p = self.dir / "maillog"
        return p.read_text(errors="replace") if p.exists() else ""

    def messages(self, n: int = 1, timeout: float = 20) -> list[bytes]:
        return [p.read_bytes() for p in wait_files(self.spool, n, timeout)]

    def __enter__(self) -> Postfix:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Process:
    """A foreground daemon started by a test, stopped by PID."""

    def __init__(self, argv: list[str], port: int, log: Path) -> None:
        self.log = log
        self.port = port
        self._fh = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._fh, stderr=subprocess.STDOUT)
        try:
            wait_port(port, what=argv[0])
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}\n{log.read_text(errors='replace')}") from None

    def wait_log(self, text: str, timeout: float = 15) -> str:
        """The log once it contains ``text`` (or as it is at the deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            content = self.log.read_text(errors="replace")
            if text in content or time.monotonic() > deadline:
                return content
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()


def smtp_sink(workdir: Path) -> tuple[Process, Path]:
    """Postfix's smtp-sink writing each message to a file under the returned directory."""
    require_tool("smtp-sink")
    # smtp-sink writes as nobody: pytest's tmp dirs (0700) are out of its reach.
    out = Path(tempfile.mkdtemp(prefix="certproxy-sink-"))
    out.chmod(0o777)
    port = free_port()
    sink = Process(["smtp-sink", "-u", "nobody", "-h", "sink.certproxy.test", "-d", f"{out}/%M%S.",
                    "-4", f"127.0.0.1:{port}", "256"], port, workdir / "sink.log")
    return sink, out


def stunnel(workdir: Path, name: str, config: str, port: int) -> Process:
    require_tool("stunnel4")
    conf = workdir / f"{name}.conf"
    conf.write_text("foreground = yes\npid =\ndebug = 4\n" + config)
    return Process(["stunnel4", str(conf)], port, workdir / f"{name}.log")
