#!/usr/bin/env python3
"""Soak: nothing lost. Postfix's smtp-source sends thousands of messages through the whole tunnel —
certproxy client → certproxy server → smtp-sink writing each message to its own file — with many
concurrent sessions; then every message is checked: the count matches and each one is byte for byte
the message smtp-source sends (compared with a control message sent straight to the sink).

    python3 bench/soak.py                 # 5000 messages, 20 sessions at a time, both TLS modes
    python3 bench/soak.py --quick         # a CI-sized run
    python3 bench/soak.py --messages 20000 --sessions 50 --mode starttls

Needs the Debian package postfix (for smtp-source and smtp-sink). Exit status 1 if anything was lost
or altered. Not a speed test: the rate is printed for orientation only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CERTPROXY = [sys.executable, str(ROOT / "certproxy.py")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if not path:
        sys.exit(f"soak: {name} not found (apt-get install postfix)")
    return path


class Daemons:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], log: Path, port: int, ready: str = "") -> subprocess.Popen:
        """Start a daemon; ready when ``ready`` appears in its log (certproxy: no probe connection to
        spoil the session counts), else when its port accepts."""
        with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
            p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(p)
        deadline = time.monotonic() + 20
        try:
            if not ready:
                wait_port(port)
            while ready and ready not in log.read_text(errors="replace"):
                if time.monotonic() > deadline or p.poll() is not None:
                    raise RuntimeError
                time.sleep(0.05)
        except RuntimeError:
            sys.exit(f"soak: {argv[0]} did not start:\n{log.read_text(errors='replace')}")
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def body_of(path: Path) -> bytes:
    """What smtp-source sent: the message without the headers smtp-sink adds in front of it."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    i = 0
    while i < len(lines) and (lines[i].startswith((b"X-Client-", b"X-Helo-", b"X-Mail-", b"X-Rcpt-", b"Received:"))
                              or lines[i].startswith(b"\t")):
        i += 1
    rest = lines[i:]
    # Date and Message-Id differ per message by design; everything else must be identical.
    return b"\n".join(ln for ln in rest if not ln.startswith((b"Date: ", b"Message-Id: ")))


def run(mode: str, messages: int, sessions: int, length: int, work: Path) -> bool:
    sink_bin, source_bin = tool("smtp-sink"), tool("smtp-source")
    for name in ("server", "laptop"):
        subprocess.run([*CERTPROXY, "gencert", name, "--dir", str(work), "--force"], check=True,
                       capture_output=True)
    fp = subprocess.run([*CERTPROXY, "fingerprint", str(work / "server.pem")], check=True, capture_output=True,
                        text=True).stdout
    pin = next(line.split()[-1] for line in fp.splitlines() if line.split()[:1] == ["sha256"])
    out, control = work / f"out-{mode}", work / f"control-{mode}"
    for d in (out, control):
        d.mkdir()
        d.chmod(0o777)
    sink_port, server_port, client_port = free_port(), free_port(), free_port()
    daemons = Daemons()
    try:
        sink_argv = [sink_bin, "-4", "-d", f"{out}/%M.", f"127.0.0.1:{sink_port}", "1024"]
        if os.geteuid() == 0:
            sink_argv[1:1] = ["-u", "nobody"]
        daemons.start(sink_argv, work / f"sink-{mode}.log", sink_port)
        daemons.start([*CERTPROXY, "--log-level", "info", "server", f"--{mode}", "--listen", f"127.0.0.1:{server_port}",
                       "--backend", f"127.0.0.1:{sink_port}", "--cert", str(work / "server.pem"),
                       "--key", str(work / "server.key"), "--allow", str(work / "laptop.pem"),
                       "--hostname", "soak.test", "--max-per-ip", "0"],
                      work / f"server-{mode}.log", server_port, ready="listening")
        daemons.start([*CERTPROXY, "--log-level", "info", "client", "--listen", f"127.0.0.1:{client_port}", "--upstream",
                       f"127.0.0.1:{server_port}", f"--{mode}", "--cert", str(work / "laptop.pem"),
                       "--key", str(work / "laptop.key"), "--pin", pin, "--max-connections", str(sessions * 2)],
                      work / f"client-{mode}.log", client_port, ready="listening")
        # The control: one message straight to the sink, for what every message must look like.
        subprocess.run([source_bin, "-4", "-m", "1", "-l", str(length), "-f", "a@laptop.test",
                        "-t", "b@example.net", f"127.0.0.1:{sink_port}"], check=True, timeout=60)
        deadline = time.monotonic() + 20
        while not any(out.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for f in out.iterdir():
            f.rename(control / f.name)
        expected = body_of(next(control.iterdir()))
        t0 = time.monotonic()
        r = subprocess.run([source_bin, "-4", "-s", str(sessions), "-m", str(messages), "-l", str(length),
                            "-f", "a@laptop.test", "-t", "b@example.net", f"127.0.0.1:{client_port}"],
                           capture_output=True, text=True, timeout=3600, check=False)
        elapsed = time.monotonic() - t0
        deadline = time.monotonic() + 30
        while len(os.listdir(out)) < messages and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        daemons.stop()
    files = list(out.iterdir())
    altered = [f.name for f in files if body_of(f) != expected]
    ids = {next((ln for ln in f.read_bytes().split(b"\n") if ln.startswith(b"Message-Id: ")), b"") for f in files}
    logs = [line for f in (work / f"server-{mode}.log", work / f"client-{mode}.log")
            for line in f.read_text(errors="replace").splitlines() if " session " in line]
    refused = sum(1 for line in logs if "outcome=ok" not in line)
    ok = r.returncode == 0 and len(files) == messages and not altered and len(ids) == messages and not refused
    print(f"{mode:9} sent={messages} arrived={len(files)} distinct={len(ids)} altered={len(altered)} "
          f"lost={messages - len(files)} sessions_logged={len(logs)} not_ok={refused} smtp-source-rc={r.returncode} "
          f"time={elapsed:.1f}s rate={messages / elapsed:.0f} msg/s  {'OK' if ok else 'FAILED'}")
    if r.returncode != 0:
        print(r.stdout[-2000:], r.stderr[-2000:])
    for line in [ln for ln in logs if "outcome=ok" not in ln][:5]:
        print("  ", line)
    if altered:
        print("altered:", altered[:5])
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--sessions", type=int, default=20, help="concurrent smtp-source sessions")
    ap.add_argument("--length", type=int, default=2000, help="body bytes per message")
    ap.add_argument("--mode", choices=("tls", "starttls", "both"), default="both")
    ap.add_argument("--quick", action="store_true", help="500 messages: a CI-sized run")
    args = ap.parse_args()
    if args.quick:
        args.messages = min(args.messages, 500)
    work = Path(tempfile.mkdtemp(prefix="certproxy-soak-"))
    work.chmod(0o755)  # smtp-sink drops privileges and must reach its output directory
    try:
        modes = ("tls", "starttls") if args.mode == "both" else (args.mode,)
        print(f"soak: {args.messages} messages of {args.length} bytes, {args.sessions} sessions at a time, "
              f"smtp-source -> certproxy client -> certproxy server -> smtp-sink (one file per message)")
        results = [run(mode, args.messages, args.sessions, args.length, work) for mode in modes]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
