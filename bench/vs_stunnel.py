#!/usr/bin/env python3
"""certproxy against stunnel, same certificates, same load, on one machine.

    python3 bench/vs_stunnel.py [--quick] [--rounds N] [--json FILE] [--loop auto|asyncio] [--keep]

Two tunnel pairs (client end + server end) in front of one smtp-sink: certproxy and stunnel, both in
pinned mutual TLS (implicit TLS, and STARTTLS for the STARTTLS row). Every measurement runs A/B
interleaved over R rounds (the order alternates per round); the table shows medians and the median of
the per-round certproxy/stunnel ratios. Before measuring, each server end is checked to refuse mail
from a client without a certificate and from one with an unknown certificate.

Needs Debian's postfix (smtp-source, smtp-sink) and stunnel4; stdlib only otherwise (plus certproxy).
Every process it starts is stopped by PID, and its temporary directory removed, on exit, error or ^C.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CERTPROXY = ROOT / "certproxy.py"
sys.path.insert(0, str(ROOT))
import certproxy

CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"
FROM, TO = "a@bench.test", "b@example.net"
READY_TIMEOUT_S = 15
IO_TIMEOUT_S = 30
SINK_MAX_SESSIONS = 20000  # smtp-sink -m: simultaneous sessions (its default, 256, would queue the idle test)
SINK_BACKLOG = 4096  # net.core.somaxconn here

FULL = {"rounds": 5, "sessions": 1000, "bulk_msgs": 10, "bulk_len": 10_000_000, "starttls_msgs": 200,
            "latency_n": 300, "idle": 2000}
QUICK = {"rounds": 2, "sessions": 300, "bulk_msgs": 4, "bulk_len": 5_000_000, "starttls_msgs": 60,
             "latency_n": 60, "idle": 300}
PARALLEL = 20  # smtp-source -s for the sessions/s runs


def log(msg: str) -> None:
    sys.stdout.flush()
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------------

class Procs:
    """Every long-running child, stopped by PID (SIGTERM, then SIGKILL) in reverse start order."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.live: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        with open(self.workdir / f"{name}.log", "ab") as out:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True, cwd=self.workdir)
        self.live.append((name, p))
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 5.0) -> None:
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGTERM)
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
            except ProcessLookupError:
                pass
        self.live = [(n, q) for n, q in self.live if q is not p]

    def stop_all(self) -> None:
        for _name, p in reversed(list(self.live)):
            try:
                self.stop(p)
            except (OSError, subprocess.SubprocessError) as e:  # keep stopping the others
                log(f"could not stop pid {p.pid}: {e}")

    def tail(self, name: str, n: int = 15) -> str:
        path = self.workdir / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        return any(parts[1] == want and parts[3] == "0A" for parts in (line.split() for line in f))


def wait_listening(procs: Procs, name: str, p: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not listening(port):
        if p.poll() is not None:
            raise RuntimeError(f"{name} exited with {p.returncode}:\n{procs.tail(name)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not listening on {port} after {READY_TIMEOUT_S} s:\n{procs.tail(name)}")
        time.sleep(0.02)


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # utime, stime: fields 14 and 15 of stat(5)


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:9]]
    idle = vals[3] + vals[4]  # idle, iowait
    return sum(vals) - idle, sum(vals)


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def event_loop_of(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return "uvloop" if "uvloop" in f.read() else "asyncio"


# ---------------------------------------------------------------------------------------------------
# the two tunnels
# ---------------------------------------------------------------------------------------------------

@dataclass
class Pair:
    kind: str  # certproxy | stunnel
    mode: str  # tls | starttls
    client_port: int
    server_port: int
    client: subprocess.Popen | None = None
    server: subprocess.Popen | None = None
    names: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.kind}-{self.mode}"

    def pids(self) -> dict[str, int]:
        return {"client": self.client.pid, "server": self.server.pid}

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids().values())

    def alive(self) -> bool:
        return self.client.poll() is None and self.server.poll() is None


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, procs: Procs) -> None:
        self.args = args
        self.dir = workdir
        self.procs = procs
        self.certs: dict[str, tuple[str, str]] = {}
        self.fp: dict[str, str] = {}
        self.sink_port = 0
        self.stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
        if not self.stunnel:
            raise SystemExit("stunnel not found: apt-get install stunnel4")
        for tool in ("smtp-source", "smtp-sink"):
            if not (shutil.which(tool) or Path("/usr/sbin", tool).exists()):
                raise SystemExit(f"{tool} not found: apt-get install postfix")
        self.seq = 0

    @staticmethod
    def tool(name: str) -> str:
        return shutil.which(name) or f"/usr/sbin/{name}"

    # --- set-up --------------------------------------------------------------------------------------

    def make_certs(self) -> None:
        for name in ("server", "laptop", "stranger"):
            cmd = [sys.executable, str(CERTPROXY), "gencert", name, "--dir", str(self.dir)]
            if name == "server":
                cmd += ["--san", "127.0.0.1", "--san", "localhost"]
            subprocess.run(cmd, check=True, capture_output=True, timeout=60)
            pem, key = self.dir / f"{name}.pem", self.dir / f"{name}.key"
            self.certs[name] = (str(pem), str(key))
            der = ssl.PEM_cert_to_DER_cert(pem.read_text())
            self.fp[name] = certproxy.format_fingerprint(certproxy.cert_fingerprint(der))
            print(f"{name:9s} sha256 {self.fp[name]}")

    def start_sink(self) -> None:
        self.sink_port = free_port()
        argv = [self.tool("smtp-sink"), "-4", "-h", "sink.bench", "-t", "300", "-m", str(SINK_MAX_SESSIONS)]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        argv += [f"{HOST}:{self.sink_port}", str(SINK_BACKLOG)]
        p = self.procs.start("smtp-sink", argv)
        wait_listening(self.procs, "smtp-sink", p, self.sink_port)

    def _certproxy_argv(self, *rest: str) -> list[str]:
        if self.args.loop == "asyncio":  # hide uvloop from certproxy's import
            boot = ("import sys; sys.modules['uvloop'] = None; sys.path.insert(0, sys.argv.pop(1)); "
                    "import certproxy; sys.exit(certproxy.main(sys.argv[1:]))")
            return [sys.executable, "-c", boot, str(ROOT), *rest]
        return [sys.executable, str(CERTPROXY), *rest]

    def start_pair(self, kind: str, mode: str) -> Pair:
        self.seq += 1
        pair = Pair(kind, mode, free_port(), free_port())
        sname, cname = f"{pair.label}-{self.seq}-server", f"{pair.label}-{self.seq}-client"
        pair.names = [sname, cname]
        scert, skey = self.certs["server"]
        ccert, ckey = self.certs["laptop"]
        flag = "--tls" if mode == "tls" else "--starttls"
        if kind == "certproxy":
            sargv = self._certproxy_argv(
                "server", flag, "--listen", f"{HOST}:{pair.server_port}", "--backend", f"{HOST}:{self.sink_port}",
                "--cert", scert, "--key", skey, "--allow", ccert, "--hostname", "bench",
                "--max-connections", "20000", "--max-per-ip", "0", "--grace", "1")
            cargv = self._certproxy_argv(
                "client", "--listen", f"{HOST}:{pair.client_port}", "--upstream", f"{HOST}:{pair.server_port}",
                flag, "--cert", ccert, "--key", ckey, "--pin", self.fp["server"],
                "--max-connections", "20000", "--grace", "1")
        else:
            proto = "protocol = smtp\n" if mode == "starttls" else ""
            common = "foreground = yes\npid =\nsyslog = no\ndebug = 3\n"
            sconf = self.dir / f"{sname}.conf"
            sconf.write_text(
                f"{common}output = {self.dir / (sname + '.out')}\n[in]\n"
                f"accept = {HOST}:{pair.server_port}\nconnect = {HOST}:{self.sink_port}\n"
                f"cert = {scert}\nkey = {skey}\nCAfile = {ccert}\nverifyPeer = yes\n{proto}")
            cconf = self.dir / f"{cname}.conf"
            cconf.write_text(
                f"{common}output = {self.dir / (cname + '.out')}\n[out]\nclient = yes\n"
                f"accept = {HOST}:{pair.client_port}\nconnect = {HOST}:{pair.server_port}\n"
                f"cert = {ccert}\nkey = {ckey}\nCAfile = {scert}\nverifyPeer = yes\nsessionResume = no\n{proto}")
            sargv, cargv = [self.stunnel, str(sconf)], [self.stunnel, str(cconf)]
        pair.server = self.procs.start(sname, sargv)
        wait_listening(self.procs, sname, pair.server, pair.server_port)
        pair.client = self.procs.start(cname, cargv)
        wait_listening(self.procs, cname, pair.client, pair.client_port)
        return pair

    def stop_pair(self, pair: Pair) -> None:
        for p in (pair.client, pair.server):
            if p is not None:
                self.procs.stop(p)

    def stunnel_version(self) -> str:
        r = subprocess.run([self.stunnel, "-version"], capture_output=True, text=True, timeout=10, check=False)
        lines = [ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        ver = next((ln for ln in lines if ln.startswith("stunnel ")), "?")
        ossl = next((ln for ln in lines if ln.startswith("Running")), "")
        return " ".join(f"{ver}; {ossl}".strip("; ").split())


# ---------------------------------------------------------------------------------------------------
# SMTP by hand (for the checks and the latency probe)
# ---------------------------------------------------------------------------------------------------

def _reply(f) -> tuple[int, bytes]:
    lines = []
    while True:
        line = f.readline(4096)
        if not line:
            raise EOFError("connection closed" + (f" after {b''.join(lines)!r}" if lines else ""))
        lines.append(line)
        if line[3:4] != b"-":
            return int(line[:3]), b"".join(lines)


def _expect(f, sock, cmd: bytes | None, ok: tuple[int, ...]) -> bytes:
    if cmd is not None:
        sock.sendall(cmd)
    code, text = _reply(f)
    if code not in ok:
        raise PermissionError(text.decode(errors="replace").strip().splitlines()[-1])
    return text


def smtp_transaction(f, sock, body: bytes = b"Subject: bench\r\n\r\nhello\r\n") -> None:
    _expect(f, sock, b"EHLO bench.test\r\n", (250,))
    _expect(f, sock, f"MAIL FROM:<{FROM}>\r\n".encode(), (250,))
    _expect(f, sock, f"RCPT TO:<{TO}>\r\n".encode(), (250,))
    _expect(f, sock, b"DATA\r\n", (354,))
    _expect(f, sock, body + b".\r\n", (250,))


def direct_attempt(port: int, mode: str, cert: tuple[str, str] | None) -> tuple[bool, str]:
    """Talk straight to a server end as a client that has `cert` (or none). (mail accepted?, what happened)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we test the server's check of us, not ours of it
    if cert:
        ctx.load_cert_chain(*cert)
    raw = socket.create_connection((HOST, port), timeout=IO_TIMEOUT_S)
    sock = raw
    try:
        if mode == "starttls":
            f = raw.makefile("rb")
            _expect(f, raw, None, (220,))
            _expect(f, raw, b"EHLO bench.test\r\n", (250,))
            _expect(f, raw, b"STARTTLS\r\n", (220,))
            f.close()
        sock = ctx.wrap_socket(raw, server_hostname="bench")
        f = sock.makefile("rb")
        if mode == "tls":  # after STARTTLS the client speaks first (EHLO)
            _expect(f, sock, None, (220,))
        smtp_transaction(f, sock)
        try:
            sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
        return True, "250 after DATA: MAIL ACCEPTED"
    except PermissionError as e:
        return False, f"refused: {e}"
    except (TimeoutError, ssl.SSLError, EOFError, ConnectionError) as e:
        return False, f"refused: {type(e).__name__}: {e}"
    finally:
        sock.close()


def one_message(port: int) -> float:
    """A whole small SMTP session through a client end: connect → 221. Seconds."""
    t0 = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=IO_TIMEOUT_S) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")
        _expect(f, s, None, (220,))
        smtp_transaction(f, s)
        _expect(f, s, b"QUIT\r\n", (221,))
        f.close()
    return time.perf_counter() - t0


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ---------------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------------

def smtp_source(port: int, *, sessions: int, messages: int, length: int) -> float:
    argv = [Bench.tool("smtp-source"), "-4", "-s", str(sessions), "-m", str(messages), "-l", str(length),
            "-f", FROM, "-t", TO, "-M", "bench.test", f"{HOST}:{port}"]
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"smtp-source to {port} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}")
    return wall


async def _open_idle(port: int, k: int, on_open, concurrency: int = 100) -> tuple[int, list[str]]:
    sem = asyncio.Semaphore(concurrency)
    writers: list[asyncio.StreamWriter] = []
    errors: list[str] = []

    async def one() -> None:
        async with sem:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), IO_TIMEOUT_S)
            except (OSError, TimeoutError) as e:
                errors.append(f"connect: {type(e).__name__}: {e}")
                return
            writers.append(writer)
            try:
                line = await asyncio.wait_for(reader.readline(), IO_TIMEOUT_S)
            except (OSError, TimeoutError, ValueError) as e:
                errors.append(f"greeting: {type(e).__name__}: {e}")
                return
            if not line.startswith(b"220"):
                errors.append(f"greeting: {line[:80]!r}")

    await asyncio.gather(*(one() for _ in range(k)))
    await asyncio.sleep(0.5)  # let both ends settle (buffers, timers) before reading RSS
    on_open()
    for w in writers:
        w.close()
    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
    return k - len(errors), errors


# ---------------------------------------------------------------------------------------------------
# the measurements
# ---------------------------------------------------------------------------------------------------

METRICS = [
    # key, label, unit, higher is better, target ratio (certproxy/stunnel) or absolute, kind
    # Targets of the TLS-engine issue (#12), full tunnel against the stunnel pair in the same run.
    ("tls_sps", "implicit TLS sessions/s", "1/s", True, ("ratio>=", 1.8)),
    ("tls_cpu_ms", "CPU per session, implicit (both ends)", "ms", False, ("ratio<=", 0.55)),
    ("tls_cpu_client_ms", "  of which client end", "ms", False, None),
    ("tls_cpu_server_ms", "  of which server end", "ms", False, None),
    ("tls_cpu_sys_ms", "  of which in the kernel (stime), both ends", "ms", False, None),
    ("tls_cpu_load_ms", "  context: smtp-source + smtp-sink CPU per session", "ms", False, None),
    ("tls_busy_pct", "  context: machine CPU busy during the run", "%", False, None),
    ("bulk_mbs", "bulk MB/s (implicit TLS)", "MB/s", True, ("ratio>=", 0.95)),
    ("bulk_cpu_ms_mb", "CPU per MB, bulk (both ends)", "ms", False, None),
    # stunnel's SMTP server waits 200 ms per connection, so a ratio against it says nothing: certproxy's
    # STARTTLS rate is judged against its own implicit-TLS rate in the same round.
    ("starttls_sps", "STARTTLS sessions/s", "1/s", True, None),
    ("starttls_own", "STARTTLS / implicit-TLS sessions/s, each against itself", "", True, ("abs>=", 0.9)),
    ("starttls_cpu_ms", "CPU per session, STARTTLS (both ends)", "ms", False, None),
    ("lat_p50_ms", "latency 1 message, p50 (implicit)", "ms", False, None),
    ("lat_p99_ms", "latency 1 message, p99 (implicit)", "ms", False, None),
    ("idle_rss_client_mb", "RSS at start, client end", "MB", False, None),
    ("idle_rss_server_mb", "RSS at start, server end", "MB", False, None),
    ("idle_kb_client", "KB per idle tunnel, client end", "KB", False, ("abs<=", 32)),
    ("idle_kb_server", "KB per idle tunnel, server end", "KB", False, ("abs<=", 32)),
    # With K idle tunnels the peak is start-up RSS + K x KB per tunnel: informative, not a target.
    ("peak_rss_client_mb", "peak RSS (VmHWM) with the idle tunnels, client end", "MB", False, None),
    ("peak_rss_server_mb", "peak RSS (VmHWM) with the idle tunnels, server end", "MB", False, None),
    ("load_peak_client_mb", "peak RSS (VmHWM) after all load runs, client end", "MB", False, ("abs<=", 64)),
    ("load_peak_server_mb", "peak RSS (VmHWM) after all load runs, server end", "MB", False, ("abs<=", 64)),
    ("idle_failed", "idle sessions that failed", "", False, ("abs<=", 0)),
]


def run(args: argparse.Namespace, workdir: Path, procs: Procs) -> dict:
    p = dict(QUICK if args.quick else FULL)
    if args.idle:
        p["idle"] = args.idle
    if args.rounds:
        p["rounds"] = args.rounds
    b = Bench(args, workdir, procs)
    b.make_certs()
    b.start_sink()
    pairs = {(k, m): b.start_pair(k, m) for k in ("certproxy", "stunnel") for m in ("tls", "starttls")}
    loops = {role: event_loop_of(pid) for role, pid in pairs["certproxy", "tls"].pids().items()}
    env = environment(b, loops, p)
    print_header(env)

    # --- 1. pinned mutual TLS, checked from outside ------------------------------------------------
    checks, ok = [], True
    print("\n## Check: a server end must refuse mail without an allowed client certificate\n")
    print("| server end | client presents | expected | result |\n|---|---|---|---|")
    for (kind, mode), pair in pairs.items():
        for who, cert, should_send in (("no certificate", None, False),
                                      ("unknown certificate", b.certs["stranger"], False),
                                      ("laptop.pem (control)", b.certs["laptop"], True)):
            sent, detail = direct_attempt(pair.server_port, mode, cert)
            good = sent == should_send
            ok &= good
            checks.append({"pair": pair.label, "client": who, "sent": sent, "detail": detail, "ok": good})
            print(f"| {pair.label} | {who} | {'accepted' if should_send else 'refused'} | "
                  f"{'ok' if good else 'FAIL'}: {detail} |")
    if not ok:
        raise RuntimeError("a tunnel does not enforce pinned mutual TLS as configured; not measuring")
    # and the pair end to end, with its own certificates
    for pair in pairs.values():
        one_message(pair.client_port)
    print("\nall four pairs carry a message end to end (client end -> server end -> smtp-sink)")

    # --- 2. throughput, CPU and latency, interleaved --------------------------------------------------
    rounds: dict[str, dict[str, list[float]]] = {k: {"certproxy": [], "stunnel": []} for k, *_ in METRICS}
    log(f"warm-up; then {p['rounds']} rounds")
    for kind in ("certproxy", "stunnel"):
        smtp_source(pairs[kind, "tls"].client_port, sessions=PARALLEL, messages=100, length=1000)
        smtp_source(pairs[kind, "tls"].client_port, sessions=1, messages=1, length=p["bulk_len"])
        smtp_source(pairs[kind, "starttls"].client_port, sessions=PARALLEL, messages=20, length=1000)
    mb = p["bulk_msgs"] * p["bulk_len"] / 1e6

    sink_pid = procs.live[0][1].pid  # smtp-sink, started first

    def timed(pair: Pair, fn) -> tuple[float, float, dict[str, float]]:
        """Run ``fn``; (wall seconds, CPU seconds of the pair, details: per end, kernel, load, machine busy)."""
        m0, s0, c0 = machine_ticks(), cpu_seconds(sink_pid), children_cpu()
        before = {r: cpu_split(pid) for r, pid in pair.pids().items()}
        wall = fn()
        after = {r: cpu_split(pid) for r, pid in pair.pids().items()}
        m1, s1, c1 = machine_ticks(), cpu_seconds(sink_pid), children_cpu()
        per = {r: sum(after[r]) - sum(before[r]) for r in after}  # client, server
        total = sum(per.values())
        per["sys"] = sum(after[r][1] - before[r][1] for r in after)
        per["load"] = (s1 - s0) + (c1 - c0)  # smtp-sink, and smtp-source (a waited-for child)
        per["busy_pct"] = 100 * (m1[0] - m0[0]) / max(1, m1[1] - m0[1])
        return wall, total, per

    for rnd in range(p["rounds"]):
        order = ("certproxy", "stunnel") if rnd % 2 == 0 else ("stunnel", "certproxy")
        for kind in order:
            pair = pairs[kind, "tls"]
            wall, cpu, per = timed(pair, lambda pair=pair: smtp_source(pair.client_port, sessions=PARALLEL,
                                                                       messages=p["sessions"], length=1000))
            rounds["tls_sps"][kind].append(p["sessions"] / wall)
            rounds["tls_cpu_ms"][kind].append(cpu / p["sessions"] * 1e3)
            rounds["tls_cpu_client_ms"][kind].append(per["client"] / p["sessions"] * 1e3)
            rounds["tls_cpu_server_ms"][kind].append(per["server"] / p["sessions"] * 1e3)
            rounds["tls_cpu_sys_ms"][kind].append(per["sys"] / p["sessions"] * 1e3)
            rounds["tls_cpu_load_ms"][kind].append(per["load"] / p["sessions"] * 1e3)
            rounds["tls_busy_pct"][kind].append(per["busy_pct"])
        for kind in order:
            pair = pairs[kind, "tls"]
            wall, cpu, _ = timed(pair, lambda pair=pair: smtp_source(pair.client_port, sessions=1,
                                                                     messages=p["bulk_msgs"], length=p["bulk_len"]))
            rounds["bulk_mbs"][kind].append(mb / wall)
            rounds["bulk_cpu_ms_mb"][kind].append(cpu / mb * 1e3)
        for kind in order:
            pair = pairs[kind, "starttls"]
            wall, cpu, _ = timed(pair, lambda pair=pair: smtp_source(pair.client_port, sessions=PARALLEL,
                                                                     messages=p["starttls_msgs"], length=1000))
            rounds["starttls_sps"][kind].append(p["starttls_msgs"] / wall)
            rounds["starttls_cpu_ms"][kind].append(cpu / p["starttls_msgs"] * 1e3)
        for kind in order:
            port = pairs[kind, "tls"].client_port
            lat = [one_message(port) for _ in range(p["latency_n"])]
            rounds["lat_p50_ms"][kind].append(percentile(lat, 0.50) * 1e3)
            rounds["lat_p99_ms"][kind].append(percentile(lat, 0.99) * 1e3)
        log(f"round {rnd + 1}/{p['rounds']}: " + " | ".join(
            f"{what} cp {rounds[key]['certproxy'][-1]:.{nd}f} st {rounds[key]['stunnel'][-1]:.{nd}f}"
            for what, key, nd in (("sessions/s", "tls_sps", 0), ("MB/s", "bulk_mbs", 0),
                                  ("STARTTLS/s", "starttls_sps", 0), ("p50 ms", "lat_p50_ms", 2))))
    dead = [pr.label for pr in pairs.values() if not pr.alive()]
    if dead:
        raise RuntimeError(f"died during the run: {dead}")
    long_running_peak = {pr.label: {r: status_kb(pid, "VmHWM") for r, pid in pr.pids().items()}
                         for pr in pairs.values()}
    for kind in ("certproxy", "stunnel"):  # one value: the processes lived through every round
        for role in ("client", "server"):
            rounds[f"load_peak_{role}_mb"][kind].append(
                max(long_running_peak[f"{kind}-{m}"][role] for m in ("tls", "starttls")) / 1024)
    for pr in pairs.values():
        b.stop_pair(pr)

    # --- 3. memory: fresh implicit-TLS pairs each round, K idle tunnels --------------------------------
    k = p["idle"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(hard, 2 * k + 1000)  # a client end holds two descriptors per tunnel
    try:  # root may raise the hard limit too; the pairs started below inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        hard = want
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < k + 100:
        log(f"RLIMIT_NOFILE hard limit {hard} < {k} idle sessions + margin: expect failures")
    idle_errors: dict[str, list[str]] = {"certproxy": [], "stunnel": []}
    log(f"memory: {k} idle tunnels per pair per round (RLIMIT_NOFILE {soft} -> {hard})")
    for rnd in range(p["rounds"]):
        order = ("certproxy", "stunnel") if rnd % 2 == 0 else ("stunnel", "certproxy")
        for kind in order:
            pair = b.start_pair(kind, "tls")
            try:
                for _ in range(5):  # warm: first-session allocations are not per-tunnel memory
                    one_message(pair.client_port)
                time.sleep(0.3)
                pids = pair.pids()
                before = {r: status_kb(pid, "VmRSS") for r, pid in pids.items()}
                seen: dict[str, int] = {}

                def snapshot(seen: dict[str, int] = seen, pids: dict[str, int] = pids) -> None:
                    seen.update({r: status_kb(pid, "VmRSS") for r, pid in pids.items()})

                opened, errs = asyncio.run(_open_idle(pair.client_port, k, snapshot))
                peak = {r: status_kb(pid, "VmHWM") for r, pid in pids.items()}
                if not pair.alive():
                    errs.append("a tunnel end died")
                idle_errors[kind] += errs
                rounds["idle_rss_client_mb"][kind].append(before["client"] / 1024)
                rounds["idle_rss_server_mb"][kind].append(before["server"] / 1024)
                rounds["idle_kb_client"][kind].append((seen["client"] - before["client"]) / k)
                rounds["idle_kb_server"][kind].append((seen["server"] - before["server"]) / k)
                rounds["peak_rss_client_mb"][kind].append(peak["client"] / 1024)
                rounds["peak_rss_server_mb"][kind].append(peak["server"] / 1024)
                rounds["idle_failed"][kind].append(k - opened)
            finally:
                b.stop_pair(pair)
        log(f"memory round {rnd + 1}/{p['rounds']}: KB/tunnel " + ", ".join(
            f"{role} cp {rounds['idle_kb_' + role]['certproxy'][-1]:.1f} st {rounds['idle_kb_' + role]['stunnel'][-1]:.1f}"
            for role in ("client", "server")))

    for kind in ("certproxy", "stunnel"):
        rounds["starttls_own"][kind] = [s / t for s, t in zip(rounds["starttls_sps"][kind], rounds["tls_sps"][kind]) if t]
    results = summarize(rounds)
    print_table(results)
    for kind, errs in idle_errors.items():
        if errs:
            uniq = sorted(set(errs))
            print(f"\n{kind}: {len(errs)} idle-session errors, e.g. {uniq[:3]}")
    return {"environment": env, "parameters": p, "checks": checks, "rounds": rounds, "results": results,
                "long_running_peak_kb": long_running_peak, "idle_errors": {k2: v[:20] for k2, v in idle_errors.items()}}


# ---------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------

def environment(b: Bench, loops: dict[str, str], p: dict) -> dict:
    m0 = machine_ticks()
    time.sleep(1)
    m1 = machine_ticks()
    busy_before = f"{100 * (m1[0] - m0[0]) / max(1, m1[1] - m0[1]):.0f}% of all CPUs in the 1 s before measuring"
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "certproxy.py"],
                           capture_output=True, text=True, check=False).stdout.strip()
    try:
        import uvloop
        uv = uvloop.__version__
    except ImportError:
        uv = "not installed"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()}, {cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}",
        "python": platform.python_version(),
        "openssl_python": ssl.OPENSSL_VERSION,
        "certproxy": f"{certproxy.__version__} ({commit}{', certproxy.py modified' if dirty else ''})",
        "loop": f"client {loops['client']}, server {loops['server']} (uvloop {uv}; --loop {b.args.loop})",
        "stunnel": b.stunnel_version(),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        "busy_before_start": busy_before,
        "params": p,
    }


def print_header(env: dict) -> None:
    print("# certproxy vs stunnel\n")
    for key in ("date", "machine", "busy_before_start", "python", "openssl_python", "certproxy", "loop", "stunnel"):
        print(f"- {key}: {env[key]}")
    p = env["params"]
    print(f"- load: {p['rounds']} rounds A/B interleaved (order alternating); sessions/s: smtp-source -s {PARALLEL} "
          f"-m {p['sessions']} -l 1000 (one connection per message); bulk: -s 1 -m {p['bulk_msgs']} -l {p['bulk_len']}; "
          f"STARTTLS: -s {PARALLEL} -m {p['starttls_msgs']}; latency: {p['latency_n']} sequential sessions; "
          f"memory: {p['idle']} idle tunnels on fresh pairs")


def summarize(rounds: dict) -> dict:
    out = {}
    for key, label, unit, higher, target in METRICS:
        cp, st = rounds[key]["certproxy"], rounds[key]["stunnel"]
        if not cp or not st:
            continue
        ratios = [a / c for a, c in zip(cp, st) if c]
        res = {"label": label, "unit": unit, "higher_is_better": higher, "certproxy": statistics.median(cp),
               "stunnel": statistics.median(st), "ratio": statistics.median(ratios) if ratios else None}
        if target:
            how, val = target
            got = res["ratio"] if how.startswith("ratio") else res["certproxy"]
            sign = "≥" if how.endswith(">=") else "≤"
            res["target"] = f"ratio {sign} {val:g}" if how.startswith("ratio") else f"{sign} {val:g} {unit}".strip()
            res["met"] = got is not None and (got >= val if how.endswith(">=") else got <= val)
        out[key] = res
    return out


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"


def print_table(results: dict) -> None:
    print("\n## Results (medians; ratio = median of per-round certproxy/stunnel)\n")
    print("| metric | unit | certproxy | stunnel | ratio | target | met |\n|---|---|--:|--:|--:|---|---|")
    for r in results.values():
        better = "↑" if r["higher_is_better"] else "↓"
        print(f"| {r['label']} {better} | {r['unit']} | {_fmt(r['certproxy'])} | {_fmt(r['stunnel'])} | "
              f"{_fmt(r['ratio'])} | {r.get('target', '')} | {('yes' if r['met'] else 'NO') if 'met' in r else ''} |")


# ---------------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds, smaller runs (well under 2 minutes)")
    ap.add_argument("--rounds", type=int, default=0, help="rounds (default 5, --quick 2)")
    ap.add_argument("--json", metavar="FILE", help="write all rounds and results as JSON here")
    ap.add_argument("--loop", choices=["auto", "asyncio"], default="auto",
                    help="auto: certproxy uses uvloop when importable; asyncio: hide uvloop from it")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    ap.add_argument("--idle", type=int, default=0, metavar="N",
                    help="idle tunnels per pair for the memory test (default 2000, --quick 300)")
    args = ap.parse_args()

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    workdir = Path(tempfile.mkdtemp(prefix="certproxy-bench-", dir="/tmp"))
    os.chmod(workdir, 0o755)  # smtp-sink drops to nobody
    procs = Procs(workdir)
    t0 = time.monotonic()
    code = 0
    try:
        data = run(args, workdir, procs)
        data["elapsed_s"] = round(time.monotonic() - t0, 1)
        print(f"\n(total {data['elapsed_s']} s)")
        if args.json:
            Path(args.json).write_text(json.dumps(data, indent=2, default=str) + "\n")
            log(f"JSON written to {args.json}")
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        code = 130
    except Exception as e:  # noqa: BLE001 -- report, then clean up below
        log(f"error: {type(e).__name__}: {e}")
        code = 1
    finally:
        procs.stop_all()
        if args.keep:
            log(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
