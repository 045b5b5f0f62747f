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


def listening(port: int) -> bool:
    """Whether a socket listens on ``port`` (any address), read from /proc/net: no connection is made,
    so the server logs no session for the check and a test's first session line is its own."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    local, state = line.split()[1], line.split()[3]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        return True
        except FileNotFoundError:
            continue
    return False


def wait_port(port: int, timeout: float = 20, what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listening(port):
            return
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
        end(self.proc)
        self._fh.close()


def end(proc: subprocess.Popen) -> None:
    """SIGTERM, 10 s to go, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


# ---------------------------------------------------------------------------------------------------
# Added for test_matrix.py: a second Postfix that relays through certproxy client, Exim run unpacked.


def unavailable(msg: str) -> None:
    """Skip (or fail under CERTPROXY_REQUIRE_PEERS=1) for a peer that cannot be set up here."""
    if os.environ.get("CERTPROXY_REQUIRE_PEERS") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


class PostfixRelayClient(Postfix):
    """A Postfix on the laptop: mail injected with its ``sendmail`` goes to ``relayhost`` in plain SMTP
    (``smtp_tls_security_level = none``), e.g. ``[127.0.0.1]:PORT`` of a certproxy client."""

    def __init__(self, workdir: Path, cert: Path, key: Path, relayhost: str) -> None:
        super().__init__(workdir, cert, key, {})
        main_cf = self.confdir / "main.cf"
        text = main_cf.read_text()
        for line in ("myhostname = mx.certproxy.test\n", "default_transport = save\n", "relay_transport = save\n"):
            text = text.replace(line, "")
        # Its own name: a Postfix SMTP client refuses a server that greets with its own myhostname (loop).
        main_cf.write_text(text + f"""\
myhostname = laptop.certproxy.test
relayhost = {relayhost}
default_transport = smtp
relay_transport = smtp
smtp_tls_security_level = none
smtp_dns_support_level = disabled
""")

    def sendmail(self, sender: str, message: bytes) -> subprocess.CompletedProcess:
        """Inject ``message`` (recipients from its headers) with this instance's sendmail."""
        return subprocess.run(["sendmail", "-C", str(self.confdir), "-f", sender, "-t", "-i"], input=message,
                              capture_output=True, timeout=60)

    def flush(self) -> subprocess.CompletedProcess:
        return self.postfix("flush")


EXIM_DIR = Path(os.environ.get("CERTPROXY_EXIM_DIR", "/tmp/certproxy-exim"))
EXIM_PACKAGES = ("exim4-daemon-light", "exim4-base", "exim4-config")
# Debian's light build has no PROXY protocol support (``exim -bV`` lists no PROXY; ``hosts_proxy`` is an unknown
# option): the heavy build has it, and needs two libraries a Postfix machine lacks, unpacked beside it.
EXIM_HEAVY_DIR = Path(os.environ.get("CERTPROXY_EXIM_HEAVY_DIR", "/tmp/certproxy-exim-heavy"))
EXIM_HEAVY_PACKAGES = ("exim4-daemon-heavy", "libmariadb3", "libspf2-2")


def unpack_packages(directory: Path, packages: tuple[str, ...]) -> None:
    """``apt-get download`` the packages and unpack them all into ``directory`` (atomically)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        unavailable(f"{directory} is missing and apt-get/dpkg-deb are not available to fetch {' '.join(packages)}")
    tmp = Path(tempfile.mkdtemp(prefix="certproxy-dl-"))
    try:
        r = subprocess.run(["apt-get", "download", *packages], cwd=tmp, capture_output=True, text=True, timeout=300)
        debs = sorted(tmp.glob("*.deb"))
        if r.returncode != 0 or len(debs) != len(packages):
            unavailable(f"apt-get download {' '.join(packages)} failed: {r.stdout}{r.stderr}")
        tree = tmp / "tree"
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True, timeout=120)
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            tree.rename(directory)  # atomic: a concurrent run either sees the whole tree or none
        except OSError:
            if not directory.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def exim_library_path(tree: Path) -> str:
    """LD_LIBRARY_PATH for a binary unpacked under ``tree``: every directory there holding a shared library."""
    dirs = sorted({str(p.parent) for p in (tree / "usr" / "lib").rglob("*.so.*") if "plugin" not in p.parts})
    return ":".join(dirs)


def exim_binary(proxy: bool = False) -> Path:
    """Exim 4 from Debian's packages, unpacked (not installed: it conflicts with postfix) under EXIM_DIR, or
    with ``proxy`` the heavy build (PROXY protocol) under EXIM_HEAVY_DIR (run it with ``exim_library_path``).
    Downloaded once with ``apt-get download``; later runs (and offline runs) use the cached tree."""
    directory, packages = (EXIM_HEAVY_DIR, EXIM_HEAVY_PACKAGES) if proxy else (EXIM_DIR, EXIM_PACKAGES)
    exim = directory / "usr" / "sbin" / "exim4"
    if not exim.exists():
        unpack_packages(directory, packages)
    if proxy:
        r = subprocess.run(["ldd", str(exim)], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "LD_LIBRARY_PATH": exim_library_path(directory)})
        if "not found" in r.stdout:
            unavailable(f"{exim} lacks libraries (add their packages to EXIM_HEAVY_PACKAGES):\n{r.stdout}")
    try:
        import pwd
        pwd.getpwnam("Debian-exim")
    except KeyError:
        # The Debian binary insists on this user (compiled in).
        r = subprocess.run(["adduser", "--system", "--group", "--no-create-home", "--disabled-login",
                            "--force-badname", "Debian-exim"], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            unavailable(f"Exim needs the user Debian-exim: adduser failed: {r.stdout}{r.stderr}")
    return exim


def _exited(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class Exim:
    """Exim 4.96 (unpacked Debian binary) with a STARTTLS port and an implicit-TLS port
    (tls_on_connect_ports). It asks every client for a certificate (``tls_try_verify_hosts = *``,
    ``tls_verify_certificates`` = the allowed client certificates) and accepts a recipient only when
    ``${sha256:$tls_in_peercert}`` is one of ``relay_fingerprints`` (upper hex, no colons); everything
    else gets ``550 relay not permitted``. Messages are queued (``queue_only``) and ``deliver()`` runs the
    queue into ``spool``, one file per message.

    Other Exim set-ups subclass it: ``_prepare()`` makes the directories, ``write_config(text)`` writes the
    settings every instance shares (paths, no lookups, ``queue_only``) followed by ``text``; ``ports``
    are the ones ``start()`` waits for (no ports: no daemon)."""

    def __init__(self, cert: Path, key: Path, client_certs: list[Path], relay_fingerprints: list[str]) -> None:
        require_tool("swaks")
        self._prepare()
        self.starttls_port = free_port()
        self.tls_port = free_port()
        self.ports = [self.starttls_port, self.tls_port]
        cert = Path(shutil.copy(cert, self.dir / "server.pem"))
        key_copy = self.private_copy(key, "server.key")  # read after dropping privileges
        trusted = self.dir / "clients.pem"
        trusted.write_text("".join(Path(c).read_text() for c in client_certs))
        fps = " : ".join(fp.replace(":", "").upper() for fp in relay_fingerprints) or "none"
        self.write_config(f"""\
primary_hostname = exim.certproxy.test
qualify_domain = certproxy.test
local_interfaces = 127.0.0.1
daemon_smtp_ports = {self.starttls_port} : {self.tls_port}
tls_on_connect_ports = {self.tls_port}
tls_advertise_hosts = *
tls_certificate = {cert}
tls_privatekey = {key_copy}
tls_verify_certificates = {trusted}
tls_try_verify_hosts = *
acl_smtp_rcpt = acl_check_rcpt

begin acl

acl_check_rcpt:
  accept condition = ${{if def:tls_in_peercert {{${{if inlist{{${{sha256:$tls_in_peercert}}}}{{{fps}}}}}}}{{no}}}}
  deny    message   = relay not permitted
{self.spool_delivery()}""")

    def spool_delivery(self) -> str:
        """Routers and transports that deliver every message as one file in ``spool``."""
        return f"""
begin routers

save:
  driver = accept
  transport = save

begin transports

save:
  driver = appendfile
  directory = {self.spool}
  user = nobody
  create_directory = false
"""

    def _prepare(self, proxy: bool = False) -> None:
        """The binary (``proxy``: the heavy build) and a directory of its own for Exim's spool and logs, and
        ``spool``, where messages are delivered."""
        self.exim = exim_binary(proxy)
        self.env = {**os.environ, "LD_LIBRARY_PATH": exim_library_path(EXIM_HEAVY_DIR)} if proxy else None
        # Exim drops to Debian-exim: pytest's tmp dirs (0700) are out of its reach.
        self.dir = Path(tempfile.mkdtemp(prefix="certproxy-exim-"))
        self.dir.chmod(0o755)
        self.spool = self.dir / "out"
        self.pidfile = self.dir / "exim.pid"
        self.conf = self.dir / "exim.conf"
        self.ports: list[int] = []
        for d in (self.dir / "spool", self.dir / "log"):
            d.mkdir()
            shutil.chown(d, "Debian-exim", "Debian-exim")
        self.spool.mkdir()
        self.spool.chmod(0o777)

    def private_copy(self, path: Path, name: str) -> Path:
        """A copy of ``path`` only Debian-exim (and root) can read: Exim reads keys after dropping privileges."""
        copy = self.dir / name
        shutil.copy(path, copy)
        shutil.chown(copy, "Debian-exim", "Debian-exim")
        copy.chmod(0o600)
        return copy

    def write_config(self, text: str) -> None:
        # exim_path: Exim re-executes itself to submit a bounce; its compiled-in /usr/sbin/exim4 is not there.
        self.conf.write_text(f"""\
exim_path = {self.exim}
keep_environment =
spool_directory = {self.dir}/spool
log_file_path = {self.dir}/log/%slog
host_lookup =
rfc1413_hosts =
queue_only = true
{text}""")
        self.conf.chmod(0o644)

    def run(self, *args: str, input: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.exim), "-C", str(self.conf), *args], input=input, capture_output=True,
                              timeout=timeout, env=self.env, text=input is None)

    def start(self) -> Exim:
        r = self.run("-bd", "-oP", str(self.pidfile))
        try:
            if r.returncode != 0:
                raise RuntimeError(f"exim -bd exited {r.returncode}")
            for port in self.ports:
                wait_port(port, what="exim")
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}\n{r.stdout}{r.stderr}\n{self.mainlog()}") from None
        return self

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        pid = self.pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                # The daemon is not our child: once it exits it stays a zombie until init reaps it (a second
                # or more in some containers), and a zombie is as good as gone.
                while time.monotonic() < deadline and not _exited(pid):
                    time.sleep(0.01)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def submit(self, sender: str, message: bytes) -> subprocess.CompletedProcess:
        """Queue ``message`` as a local user would (``exim -odq -i -t``: recipients from its headers; a line
        holding only ``.`` is content)."""
        return self.run("-odq", "-i", "-f", sender, "-t", input=message)

    def deliver(self) -> subprocess.CompletedProcess:
        """Run the queue once (``-qff``): it returns once every queued message had its delivery attempt."""
        return self.run("-qff")

    def queue(self) -> str:
        """``exim -bp``: what is still queued."""
        return self.run("-bp").stdout

    def mainlog(self, which: str = "*") -> str:
        """The logs (``which``: ``main``, ``reject`` or ``panic`` for one of them)."""
        return "".join(p.read_text(errors="replace") for p in sorted((self.dir / "log").glob(f"{which}log")))

    def messages(self, n: int = 1, timeout: float = 20) -> list[bytes]:
        """Deliver, then the files of the first ``n`` messages (fewer if they do not arrive in time)."""
        deadline = time.monotonic() + timeout
        while True:
            self.deliver()
            files = wait_files(self.spool, n, timeout=0)
            if len(files) >= n or time.monotonic() > deadline:
                return [p.read_bytes() for p in files]
            time.sleep(0.1)

    def __enter__(self) -> Exim:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
