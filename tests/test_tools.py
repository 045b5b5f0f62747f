"""gencert, ca, fingerprint, probe, expiry warnings: the certificate tools, checked against openssl and real peers."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import certproxy
from realpeers import Postfix, Process, free_port, require_tool

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "certproxy.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def openssl_fingerprints(cert: Path) -> tuple[str, str]:
    require_tool("openssl")
    fp = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-fingerprint", "-sha256"],
                        capture_output=True, text=True, check=True).stdout.strip().split("=", 1)[1]
    spki = subprocess.run(f"openssl x509 -in {cert} -pubkey -noout | openssl pkey -pubin -outform DER "
                          "| openssl dgst -sha256 -r", shell=True, capture_output=True, text=True, check=True)
    hexd = spki.stdout.split()[0].upper()
    return fp, ":".join(hexd[i:i + 2] for i in range(0, 64, 2))


class TestGencert:
    @pytest.mark.parametrize("rsa", [False, True])
    def test_files_modes_and_fingerprints_match_openssl(self, tmp_path, rsa):
        r = cli("gencert", "laptop", "--dir", str(tmp_path / "certs"), *(["--rsa"] if rsa else []))
        assert r.returncode == 0, r.stderr
        cert, key = tmp_path / "certs" / "laptop.pem", tmp_path / "certs" / "laptop.key"
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
        fp, spki = openssl_fingerprints(cert)
        assert f"sha256       {fp}" in r.stdout and f"spki sha256  {spki}" in r.stdout
        assert f"{fp} laptop" in r.stdout  # the Postfix relay_clientcerts line
        assert fp.replace(":", "") in r.stdout  # the Exim spelling
        f = cli("fingerprint", str(cert))
        assert f"sha256     {fp}" in f.stdout and f"spki       {spki}" in f.stdout and "subject    CN=laptop" in f.stdout
        text = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-text"], capture_output=True,
                              text=True, check=True).stdout
        assert "CA:FALSE" in text and "TLS Web Client Authentication" in text and "TLS Web Server Authentication" in text

    def test_never_overwrites_without_force(self, tmp_path):
        d = str(tmp_path / "certs")
        assert cli("gencert", "mx", "--dir", d).returncode == 0
        before = (tmp_path / "certs" / "mx.key").read_bytes()
        r = cli("gencert", "mx", "--dir", d)
        assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
        assert (tmp_path / "certs" / "mx.key").read_bytes() == before
        assert cli("gencert", "mx", "--dir", d, "--force").returncode == 0
        assert (tmp_path / "certs" / "mx.key").read_bytes() != before

    def test_fingerprint_warns_near_expiry(self, tmp_path):
        cert, key = certproxy.make_certificate("soon", days=10)
        (tmp_path / "soon.pem").write_bytes(cert)
        r = cli("fingerprint", str(tmp_path / "soon.pem"))
        assert "WARNING: expires in 9 days" in r.stdout or "WARNING: expires in 10 days" in r.stdout


class TestPrivateCA:
    async def test_ca_issued_laptops_pass_certproxy_server(self, tmp_path):
        d = tmp_path / "certs"
        assert cli("ca", "init", "--dir", str(d)).returncode == 0
        assert stat.S_IMODE(os.stat(d / "ca.key").st_mode) == 0o600
        r = cli("ca", "issue", "alice", "--dir", str(d))
        assert r.returncode == 0 and "issued by CN=certproxy private CA" in r.stdout, r.stderr
        assert cli("gencert", "mx.certproxy.test", "--dir", str(d), "--san", "localhost").returncode == 0
        assert cli("gencert", "mallory", "--dir", str(tmp_path / "other")).returncode == 0
        require_tool("openssl")
        v = subprocess.run(["openssl", "verify", "-CAfile", str(d / "ca.pem"), str(d / "alice.pem")],
                           capture_output=True, text=True)
        assert v.returncode == 0, v.stdout + v.stderr
        sink = certproxy._SinkMTA()
        await sink.start()
        srv = certproxy.ServerService(certproxy.ServerConfig(
            listen=certproxy.Endpoint(host="127.0.0.1", port=0), backend=certproxy.Endpoint(host="127.0.0.1", port=sink.port),
            mode=certproxy.TLSMode.IMPLICIT, cert=str(d / "mx.certproxy.test.pem"), key=str(d / "mx.certproxy.test.key"),
            client_ca=str(d / "ca.pem"), hostname="mx.certproxy.test"))
        await srv.start()
        server_fp = certproxy.format_fingerprint(certproxy.cert_fingerprint(certproxy._pem_to_der(str(d / "mx.certproxy.test.pem"))[0]))
        results = {}
        try:
            for who, base in (("alice", d), ("mallory", tmp_path / "other")):
                cl = certproxy.ClientService(certproxy.ClientConfig(
                    listen=certproxy.Endpoint(host="127.0.0.1", port=0),
                    upstreams=(certproxy.Upstream(endpoint=certproxy.Endpoint(host="127.0.0.1", port=srv.port),
                                                  mode=certproxy.TLSMode.IMPLICIT),),
                    cert=str(base / f"{who}.pem"), key=str(base / f"{who}.key"),
                    pins=certproxy.Pins.parse([server_fp], "--pin")))
                await cl.start()
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", cl.port)
                    results[who] = await asyncio.wait_for(reader.readline(), 20)
                    writer.close()
                finally:
                    await cl.stop()
        finally:
            await srv.stop()
            await sink.stop()
        assert results["alice"].startswith(b"220 sink.demo")
        assert results["mallory"].startswith(b"421 4.7.0")


class TestProbe:
    @pytest.mark.parametrize("mode", ["starttls", "tls"])
    def test_probe_prints_the_pin(self, aiosmtpd_upstream, certs, mode):
        up = aiosmtpd_upstream(mode)
        r = cli("probe", up.endpoint, f"--{mode}", "--cert", str(certs.client.cert), "--key", str(certs.client.key))
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"--pin {certs.server.fp}" in r.stdout and f"--pin {certs.server.spki}" in r.stdout
        assert "asked for a client certificate: yes" in r.stdout
        assert "TLSv1.3" in r.stdout and "subject  CN=mx.certproxy.test" in r.stdout

    def test_probe_of_a_closed_port_exits_1_with_connection_refused(self, tmp_path):
        r = cli("probe", f"127.0.0.1:{free_port()}")
        assert r.returncode == 1 and "connection refused" in r.stderr and "Traceback" not in r.stderr


class TestExpiryWatch:
    async def test_service_warns_at_start(self, tmp_path, caplog):
        caplog.set_level(logging.INFO, "certproxy")
        cert, key = certproxy.make_certificate("laptop", usage="client", days=5)
        (tmp_path / "c.pem").write_bytes(cert)
        (tmp_path / "c.key").write_bytes(key)
        svc = certproxy.ClientService(certproxy.ClientConfig(
            listen=certproxy.Endpoint(host="127.0.0.1", port=0),
            upstreams=(certproxy.Upstream(endpoint=certproxy.Endpoint(host="127.0.0.1", port=25),
                                          mode=certproxy.TLSMode.STARTTLS),),
            cert=str(tmp_path / "c.pem"), key=str(tmp_path / "c.key"), pins=certproxy.Pins.parse(["AB" * 32], "--pin")))
        await svc.start()
        try:  # the watch runs as a task of the service: wait for its first word, with a deadline
            async with asyncio.timeout(10):
                while not (lines := [r for r in caplog.records if r.getMessage().startswith("certificate ")]):
                    await asyncio.sleep(0.02)
        finally:
            await svc.stop()
        assert lines and lines[0].levelno == logging.WARNING and "option=--cert" in lines[0].getMessage()
        assert "expires in 4 days" in lines[0].getMessage() or "expires in 5 days" in lines[0].getMessage()


class TestGeneratedCertificatesWithPostfix:
    def test_gencert_pair_relays_through_real_postfix(self, tmp_path):
        d = tmp_path / "certs"
        assert cli("gencert", "mx.certproxy.test", "--dir", str(d), "--san", "localhost", "--san", "127.0.0.1").returncode == 0
        out = cli("gencert", "laptop", "--dir", str(d))
        postfix_line = [ln.strip() for ln in out.stdout.splitlines() if ln.strip().endswith(" laptop")][0]
        fp, name = postfix_line.split()
        server_pin = cli("fingerprint", str(d / "mx.certproxy.test.pem")).stdout.split("sha256", 1)[1].split()[0]
        with Postfix(tmp_path / "pf", d / "mx.certproxy.test.pem", d / "mx.certproxy.test.key", {fp: name}) as pf:
            port = free_port()
            proc = Process([sys.executable, str(ROOT / "certproxy.py"), "client", "--upstream",
                            f"127.0.0.1:{pf.starttls_port}", "--listen", f"127.0.0.1:{port}",
                            "--cert", str(d / "laptop.pem"), "--key", str(d / "laptop.key"), "--pin", server_pin],
                           port, tmp_path / "client.log")
            try:
                require_tool("swaks")
                r = subprocess.run(["swaks", "--server", f"127.0.0.1:{port}", "--from", "a@laptop.test",
                                    "--to", "b@example.net", "--body", "generated certs"], capture_output=True,
                                   text=True, timeout=60)
            finally:
                proc.stop()
            assert r.returncode == 0, r.stdout + (tmp_path / "client.log").read_text()
            assert b"generated certs" in pf.messages(1)[0]
