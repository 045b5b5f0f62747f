"""Running for years: config files, check, reload (SIGHUP), drain (SIGTERM), limits, JSON logs."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

import certproxy
from conftest import client_ctx, read_reply
from realpeers import Process, free_port

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "certproxy.py"), *args], capture_output=True, text=True,
                          timeout=timeout)


def server_table(certs, port: int, backend: int, name: str = "smtps", **extra) -> str:
    lines = [f"[server.{name}]", "tls = true", f'listen = "127.0.0.1:{port}"', f'backend = "127.0.0.1:{backend}"',
             f'cert = "{certs.server.cert}"', f'key = "{certs.server.key}"', f'allow = ["{certs.client.cert}"]',
             'hostname = "mx.certproxy.test"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


class TestConfigErrors:
    @pytest.mark.parametrize("body, expected", [
        ("[client.laptop]\nupstream = [\"mx:587\"]\ncert = \"{client}\"\n", "[client.laptop] --pin: give --pin"),
        ("[client.laptop]\nupstream = [\"mx:587\"]\ncert = \"{client}\"\npin = [\"zz\"]\n",
         "[client.laptop] --pin: 'zz' is not a SHA-256 fingerprint"),
        ("[client.laptop]\nupstream = [\"mx:587\"]\ncert = \"{client}\"\npin = [\"{fp}\"]\nfrobnicate = 1\n",
         "[client.laptop] --frobnicate: unknown key(s) frobnicate"),
        ("[server.mx]\ntls = true\nbackend = \"127.0.0.1:25\"\ncert = \"{client}\"\nalow = [\"{client}\"]\n",
         "[server.mx] --alow: unknown key(s) alow (did you mean: alow -> allow?)"),
        ("[client.laptop]\nupstream = [\"mx:587\"]\ncert = \"/nonexistent.pem\"\npin = [\"{fp}\"]\n",
         "[client.laptop] --cert: '/nonexistent.pem' does not exist"),
        ("[client.laptop]\nupstream = [\"mx:587\"]\ncert = \"{client}\"\nkey = \"{other_key}\"\npin = [\"{fp}\"]\n",
         "[client.laptop] --key: the key"),
        ("[server.mx]\ntls = true\nbackend = \"127.0.0.1:25\"\ncert = \"{server}\"\n",
         "[server.mx] --allow: give --allow"),
        ("[server.mx]\nbackend = \"127.0.0.1:25\"\ncert = \"{server}\"\nallow = [\"{client}\"]\n",
         "[server.mx] --tls: say --tls (implicit TLS), --starttls, or both"),
        ("[server.mx]\ntls = true\ncert = \"{server}\"\nallow = [\"{client}\"]\n",
         "[server.mx] --backend: is required (the MTA port for clients with an allowed certificate)"),
        ("[server.mx]\ntls = true\nbackend = \"127.0.0.1:25\"\ncert = \"{server}\"\nallow = [\"{client}\"]\n"
         "idle-timeout = -1\n", "[server.mx] --idle-timeout: must be a positive number"),
        ("[relay.x]\n", "unknown table(s) relay"),
        ("this is not toml", "not valid TOML"),
        ("", "defines no service"),
    ])
    def test_check_names_file_service_and_option(self, tmp_path, certs, body, expected):
        conf = tmp_path / "certproxy.toml"
        conf.write_text(body.format(client=certs.client.cert, server=certs.server.cert, fp=certs.server.fp,
                                    other_key=certs.other_client.key))
        r = cli("check", str(conf))
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"certproxy: error: {conf}" in r.stderr and expected in r.stderr, r.stderr
        assert "Traceback" not in r.stderr

    def test_port_in_use_is_a_note(self, tmp_path, certs):
        """check on the configuration of the running service (edit, check, reload) must not fail on
        the service's own port."""
        busy = socket.create_server(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        conf = tmp_path / "c.toml"
        conf.write_text(server_table(certs, port, 25, name="mx"))
        r = cli("check", str(conf))
        busy.close()
        assert r.returncode == 0, r.stderr
        assert f"certproxy: note: {conf} [mx] --listen: something listens on 127.0.0.1:{port} " \
            "already (fine if it is this service, running)" in r.stderr, r.stderr

    def test_an_address_of_another_machine_is_an_error(self, tmp_path, certs):
        conf = tmp_path / "c.toml"
        conf.write_text(server_table(certs, free_port(), 25, name="mx").replace("127.0.0.1:", "192.0.2.1:", 1))
        r = cli("check", str(conf))
        assert r.returncode == 2 and "[mx] --listen: cannot listen on 192.0.2.1:" in r.stderr \
            and "(not an address of this machine?)" in r.stderr, r.stderr

    def test_every_error_at_once(self, tmp_path, certs):
        conf = tmp_path / "c.toml"
        conf.write_text(server_table(certs, free_port(), 25, name="one", max_per_ip=-1)
                        + server_table(certs, free_port(), 25, name="two", max_connections=0))
        r = cli("check", str(conf))
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 2 and "[server.one] --max-per-ip: must be 0" in lines[0], lines
        assert "[server.two] --max-connections: must be at least 1" in lines[1], lines

    def test_expired_certificate(self, tmp_path, certs):
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(1).not_valid_before(now - datetime.timedelta(days=30))
                .not_valid_after(now - datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
        (tmp_path / "old.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp_path / "old.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
        conf = tmp_path / "c.toml"
        conf.write_text(server_table(certs, free_port(), 25, name="mx").replace(str(certs.server.cert), str(tmp_path / "old.pem"))
                        .replace(str(certs.server.key), str(tmp_path / "old.key")))
        r = cli("check", str(conf))
        assert r.returncode == 2 and f"[mx] --cert: {tmp_path / 'old.pem'} EXPIRED on" in r.stderr, r.stderr
        assert "renew it (certproxy gencert NAME --renew)" in r.stderr
        # One client's expired certificate in --allow never takes the service down: a note, exit 0.
        conf.write_text(server_table(certs, free_port(), 25, name="mx").replace(
            f'allow = ["{certs.client.cert}"]', f'allow = ["{certs.client.cert}", "{tmp_path / "old.pem"}"]'))
        r = cli("check", str(conf))
        assert r.returncode == 0, r.stderr
        assert f"certproxy: note: {conf} [mx] --allow: {tmp_path / 'old.pem'} (CN=expired) EXPIRED on" in r.stderr
        assert "it is refused until its owner sends a renewed one; everyone else is served" in r.stderr, r.stderr

    def test_good_config(self, tmp_path, certs):
        conf = tmp_path / "c.toml"
        conf.write_text(server_table(certs, free_port(), 25) + f"""
[client.laptop]
upstream = ["127.0.0.1:465"]
listen = "127.0.0.1:{free_port()}"
cert = "{certs.client.cert}"
key = "{certs.client.key}"
pin = ["{certs.server.fp}"]
""")
        r = cli("check", str(conf))
        assert r.returncode == 0, r.stderr
        assert "ok  [smtps] server" in r.stdout and "ok  [laptop] client" in r.stdout


def tls_greeting(port: int, certs, pair) -> bytes:
    ctx = client_ctx(certs, pair)
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost") as s:
        s.sendall(b"MAIL FROM:<a@b>\r\n")  # the cert-less / unknown answer comes to a command
        data = s.recv(4096)
        try:
            data += s.recv(4096)
        except (TimeoutError, OSError):
            pass
        return data


class TestReloadAndDrain:
    def test_reload_keeps_sessions_and_applies_new_allowlist(self, tmp_path, certs, sink_mta):
        port = free_port()
        conf = tmp_path / "c.toml"
        conf.write_text(server_table(certs, port, sink_mta.port))
        proc = Process([sys.executable, str(ROOT / "certproxy.py"), "run", str(conf)], port, tmp_path / "run.log")
        try:
            ctx = client_ctx(certs, certs.client)
            live = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")
            assert live.recv(1024).startswith(b"220 backend.test")
            # 1. a broken configuration is refused, the running one kept
            conf.write_text("[server.smtps]\ntls = true\n")
            proc.proc.send_signal(signal.SIGHUP)
            assert "reload outcome=refused" in proc.wait_log("reload outcome=refused")
            assert tls_greeting(port, certs, certs.client).startswith(b"220 backend.test")
            # 2. the laptop leaves the allowlist: the next connection is refused, the live one goes on
            conf.write_text(server_table(certs, port, sink_mta.port).replace(str(certs.client.cert),
                                                                                str(certs.other_client.cert)))
            proc.proc.send_signal(signal.SIGHUP)
            assert "reload outcome=ok" in proc.wait_log("reload outcome=ok")
            assert tls_greeting(port, certs, certs.client).startswith(b"554 5.7.1 certificate not authorised\r\n")
            assert tls_greeting(port, certs, certs.other_client).startswith(b"220 backend.test")
            live.sendall(b"NOOP\r\n")
            assert live.recv(1024).startswith(b"250")
            live.sendall(b"QUIT\r\n")
            assert live.recv(1024).startswith(b"221")
            live.close()
        finally:
            proc.stop()

    def test_reload_serves_a_renewed_certificate_to_the_next_connection(self, tmp_path, certs, sink_mta):
        import shutil

        port = free_port()
        cert, key = tmp_path / "mx.pem", tmp_path / "mx.key"
        shutil.copy(certs.server.cert, cert)
        shutil.copy(certs.server.key, key)
        conf = tmp_path / "c.toml"
        conf.write_text(server_table(certs, port, sink_mta.port).replace(str(certs.server.cert), str(cert))
                        .replace(str(certs.server.key), str(key)))
        proc = Process([sys.executable, str(ROOT / "certproxy.py"), "run", str(conf)], port, tmp_path / "run.log")

        def served_fp(sock: ssl.SSLSocket) -> str:
            return certproxy.format_fingerprint(certproxy.cert_fingerprint(sock.getpeercert(binary_form=True)))

        try:
            ctx = client_ctx(certs, certs.client)
            live = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
            assert live.recv(1024).startswith(b"220") and served_fp(live) == certs.server.fp
            shutil.copy(certs.other_server.cert, cert)  # the renewal: same paths, new certificate and key
            shutil.copy(certs.other_server.key, key)
            proc.proc.send_signal(signal.SIGHUP)
            assert "reload outcome=ok" in proc.wait_log("reload outcome=ok")
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as fresh:
                assert fresh.recv(1024).startswith(b"220") and served_fp(fresh) == certs.other_server.fp
            live.sendall(b"NOOP\r\n")  # the session from before the reload goes on, on the old certificate
            assert live.recv(1024).startswith(b"250")
            live.close()
        finally:
            proc.stop()

    def test_reload_to_a_taken_port_keeps_the_old_listener(self, tmp_path, certs, sink_mta):
        port, taken = free_port(), free_port()
        conf = tmp_path / "c.toml"
        conf.write_text(server_table(certs, port, sink_mta.port))
        proc = Process([sys.executable, str(ROOT / "certproxy.py"), "run", str(conf)], port, tmp_path / "run.log")
        blocker = socket.create_server(("127.0.0.1", taken))  # someone else listens on the new port
        try:
            conf.write_text(server_table(certs, taken, sink_mta.port))
            proc.proc.send_signal(signal.SIGHUP)
            log = proc.wait_log("reload outcome=")
            assert "reload outcome=partial failed=smtps" in log and "reload outcome=ok" not in log, log
            assert "the running service is kept" in log and f"cannot listen on 127.0.0.1:{taken}" in log, log
            assert tls_greeting(port, certs, certs.client).startswith(b"220 backend.test")  # still serving
        finally:
            blocker.close()
            proc.stop()

    def test_sighups_in_quick_succession_end_with_the_last_configuration(self, tmp_path, certs, sink_mta):
        port = free_port()
        conf = tmp_path / "c.toml"
        conf.write_text(server_table(certs, port, sink_mta.port))  # A: the laptop only
        proc = Process([sys.executable, str(ROOT / "certproxy.py"), "run", str(conf)], port, tmp_path / "run.log")
        laptop, stranger = str(certs.client.cert), str(certs.other_client.cert)
        try:
            conf.write_text(server_table(certs, port, sink_mta.port).replace(laptop, stranger))  # B: the stranger only
            proc.proc.send_signal(signal.SIGHUP)
            conf.write_text(server_table(certs, port, sink_mta.port).replace(  # C: both
                f'allow = ["{laptop}"]', f'allow = ["{laptop}", "{stranger}"]'))
            proc.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:  # the reloads take their time; C is the only one that lets both in
                both = [tls_greeting(port, certs, pair).startswith(b"220 backend.test")
                        for pair in (certs.client, certs.other_client)]
                if all(both):
                    break
            assert all(both), both
            log = (tmp_path / "run.log").read_text()
            assert 1 <= log.count("reload outcome=ok") <= 2 and "outcome=partial" not in log, log
        finally:
            proc.stop()

    def test_sigterm_lets_live_sessions_finish(self, tmp_path, certs, sink_mta):
        port = free_port()
        conf = tmp_path / "c.toml"
        conf.write_text(server_table(certs, port, sink_mta.port))
        proc = Process([sys.executable, str(ROOT / "certproxy.py"), "run", str(conf), "--grace", "20"], port,
                       tmp_path / "run.log")
        try:
            ctx = client_ctx(certs, certs.client)
            live = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")
            assert live.recv(1024).startswith(b"220")
            proc.proc.send_signal(signal.SIGTERM)
            assert "stopping sessions=1" in proc.wait_log("stopping")
            time.sleep(0.3)
            with pytest.raises(OSError):  # no longer accepting
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            live.sendall(b"EHLO x\r\nMAIL FROM:<a@laptop.test>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
            got = b""
            while b"354" not in got:
                got += live.recv(4096)
            live.sendall(b"Subject: drained\r\n\r\nfinished during shutdown\r\n.\r\nQUIT\r\n")
            while b"221" not in got:
                got += live.recv(4096)
            live.close()
            assert proc.proc.wait(15) == 0
        finally:
            proc.stop()
        assert any(b"finished during shutdown" in m[2] for m in sink_mta.messages)
        assert "outcome=ok" in (tmp_path / "run.log").read_text()


class TestLimits:
    async def test_connection_and_per_address_limits(self, certs):
        sink = certproxy._SinkMTA()
        await sink.start()
        base = dict(listen=certproxy.Endpoint(host="127.0.0.1", port=0),
                    backend=certproxy.Endpoint(host="127.0.0.1", port=sink.port), mode=certproxy.TLSMode.STARTTLS,
                    cert=str(certs.server.cert), key=str(certs.server.key), allow=(str(certs.client.cert),),
                    hostname="mx.certproxy.test")
        try:
            for limits in ({"max_connections": 2, "max_per_ip": 0}, {"max_connections": 100, "max_per_ip": 2}):
                svc = certproxy.ServerService(certproxy.ServerConfig(**base, **limits))
                await svc.start()
                try:
                    held = [await asyncio.open_connection("127.0.0.1", svc.port) for _ in range(2)]
                    for r, _ in held:
                        assert (await read_reply(r)).startswith(b"220 mx.certproxy.test")
                    r3, w3 = await asyncio.open_connection("127.0.0.1", svc.port)
                    assert (await read_reply(r3)) == b"421 4.7.0 mx.certproxy.test too busy, try again later\r\n"
                    w3.close()
                    for _, w in held:
                        w.close()
                finally:
                    await svc.stop()
        finally:
            await sink.stop()


class TestJsonLogs:
    def test_json_session_lines(self, tmp_path, certs, sink_mta):
        port = free_port()
        proc = Process([sys.executable, str(ROOT / "certproxy.py"), "--log-format", "json", "server", "--tls",
                        "--listen", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{sink_mta.port}",
                        "--cert", str(certs.server.cert), "--key", str(certs.server.key),
                        "--allow", str(certs.client.cert)], port, tmp_path / "run.log")
        try:
            tls_greeting(port, certs, certs.client)
            proc.wait_log('"event": "session", "id": 2')
        finally:
            proc.stop()
        events = [json.loads(line) for line in (tmp_path / "run.log").read_text().splitlines()]
        sessions = [e for e in events if e.get("event") == "session" and e.get("cert_fp")]
        assert sessions and sessions[-1]["cert_fp"] == certs.client.fp and sessions[-1]["service"] == "server"
        assert isinstance(sessions[-1]["bytes_in"], int) and "time" in sessions[-1]


class TestWorkers:
    def test_two_workers_serve_one_port_and_stop_together(self, tmp_path, certs, sink_mta):
        import re

        port = free_port()
        log = tmp_path / "workers.log"
        proc = Process([sys.executable, str(ROOT / "certproxy.py"), "server", "--tls", "--workers", "2",
                        "--listen", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{sink_mta.port}",
                        "--cert", str(certs.server.cert), "--key", str(certs.server.key),
                        "--allow", str(certs.client.cert), "--hostname", "mx.certproxy.test"], port, log)
        try:
            deadline = time.monotonic() + 20
            while log.read_text().count("listening ") < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            pids = re.search(r"workers count=2 pids=(\d+),(\d+)", log.read_text())
            assert pids, log.read_text()
            ctx = client_ctx(certs, certs.client)
            for _ in range(24):  # SO_REUSEPORT hashes each new connection to one of the two
                with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as s:
                    assert s.recv(1024).startswith(b"220 backend.test")
                    s.sendall(b"QUIT\r\n")
                    s.recv(1024)
            deadline = time.monotonic() + 20
            while log.read_text().count("session ") < 24 and time.monotonic() < deadline:
                time.sleep(0.05)
            served = set(re.findall(r"session id=\d+ service=server worker=(\d)", log.read_text()))
            assert served == {"1", "2"}, log.read_text()
            proc.proc.send_signal(signal.SIGHUP)  # forwarded: both workers reload
            deadline = time.monotonic() + 20
            while log.read_text().count("reload outcome=ok") < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert log.read_text().count("reload outcome=ok") == 2, log.read_text()
            # a second instance cannot join the port through SO_REUSEPORT (with an old allowlist, say)
            second = cli("server", "--tls", "--workers", "2", "--listen", f"127.0.0.1:{port}", "--backend",
                         f"127.0.0.1:{sink_mta.port}", "--cert", str(certs.server.cert), "--key",
                         str(certs.server.key), "--allow", str(certs.client.cert))
            assert second.returncode == 2 and "--listen: [server] cannot listen on" in second.stderr, second.stderr
            proc.proc.send_signal(signal.SIGTERM)
            assert proc.proc.wait(20) == 0
        finally:
            proc.stop()
        for pid in pids.groups():  # the workers went with the parent
            with pytest.raises(ProcessLookupError):
                import os
                os.kill(int(pid), 0)
        assert log.read_text().count("stopped") == 2

    def test_a_crashing_worker_is_restarted_with_backoff_and_the_configuration_the_others_run(
            self, tmp_path, certs, sink_mta):
        import os
        import re

        port = free_port()
        conf = tmp_path / "c.toml"
        conf.write_text(server_table(certs, port, sink_mta.port))  # the laptop allowed
        log = tmp_path / "run.log"
        proc = Process([sys.executable, str(ROOT / "certproxy.py"), "run", str(conf), "--workers", "2"], port, log)
        try:
            deadline = time.monotonic() + 20
            while log.read_text().count("listening ") < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            # The file changes, but nobody sends SIGHUP: the running workers keep the laptop allowed.
            conf.write_text(server_table(certs, port, sink_mta.port).replace(str(certs.client.cert),
                                                                                str(certs.other_client.cert)))
            for death in range(2):  # worker 1 dies twice in a row, soon after its start
                pid = int(re.findall(r"workers count=2 pids=(\d+),", log.read_text())[0]) if death == 0 else \
                    int(re.findall(r"worker worker=1 pid=(\d+) outcome=restarted", log.read_text())[-1])
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 20
                while log.read_text().count("outcome=died") < death + 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
                deadline = time.monotonic() + 20
                while log.read_text().count("listening ") < 3 + death and time.monotonic() < deadline:
                    time.sleep(0.05)
            text = log.read_text()
            assert "restarting it in 1 s" in text and "restarting it in 2 s" in text, text
            # Whichever worker the kernel picks, the laptop is served: the restarted one runs the old text.
            for _ in range(16):
                assert tls_greeting(port, certs, certs.client).startswith(b"220 backend.test")
        finally:
            proc.stop()

    def test_workers_need_a_fixed_port(self, certs):
        r = cli("server", "--tls", "--workers", "2", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:25",
                "--cert", str(certs.server.cert), "--key", str(certs.server.key), "--allow", str(certs.client.cert))
        assert r.returncode == 2 and "--workers: [server] needs a fixed --listen port" in r.stderr, r.stderr


class TestReadmeUnit:
    def test_systemd_unit_in_the_readme_verifies(self, tmp_path):
        from realpeers import require_tool

        require_tool("systemd-analyze")  # skips, or under CERTPROXY_REQUIRE_PEERS=1 (CI) fails
        text = (ROOT / "README.md").read_text()
        block = text.split("<!-- systemd-unit -->\n")[1].split("<!-- /systemd-unit -->")[0]
        unit = "\n".join(line[4:] for line in block.splitlines()) + "\n"
        assert "ExecStart=/usr/local/bin/certproxy run /etc/certproxy/%i.toml" in unit
        # verify checks that the executables exist: point them at one that does
        (tmp_path / "certproxy@mx.service").write_text(unit.replace("/usr/local/bin/certproxy", "/bin/true"))
        r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "certproxy@mx.service")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "certproxy@mx.service" not in r.stderr, r.stderr
