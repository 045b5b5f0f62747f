"""--metrics: the Prometheus text format, read back with Prometheus' own Python parser, holding the
counts a test produced; loopback only unless asked; bounded HTTP."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import certproxy
from conftest import client_ctx
from realpeers import Process, free_port
from test_server import smtplib_send

ROOT = Path(__file__).resolve().parent.parent


def scrape(port: int) -> dict[str, list]:
    """name -> [(labels, value)] of every sample, parsed as Prometheus parses the text format."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = r.read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(samples: dict, metric: str, /, **labels) -> float | None:
    found = [v for lab, v in samples.get(metric, []) if all(lab.get(k) == w for k, w in labels.items())]
    assert len(found) <= 1, (metric, labels, found)
    return found[0] if found else None


def server_argv(certs, port: int, backend: int, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "certproxy.py"), "server", "--tls", "--listen", f"127.0.0.1:{port}",
            "--backend", f"127.0.0.1:{backend}", "--cert", str(certs.server.cert), "--key", str(certs.server.key),
            "--allow", str(certs.client.cert), "--allow-fingerprint", f"{certs.client.fp} alice",
            "--hostname", "mx.certproxy.test", *extra]


def wait_for(check, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


class TestScrape:
    def test_counts_what_the_test_did(self, tmp_path, certs, sink_mta):
        port, mport = free_port(), free_port()
        proc = Process(server_argv(certs, port, sink_mta.port, "--metrics", str(mport)), port, tmp_path / "s.log")
        try:
            assert wait_for(lambda: "metrics listen=" in proc.log.read_text())
            before = scrape(mport)
            assert value(before, "certproxy_info", version=certproxy.__version__) == 1
            assert value(before, "certproxy_sessions_total", service="server", outcome="ok") is None
            smtplib_send(port, "tls", client_ctx(certs, certs.client))
            smtplib_send(port, "tls", client_ctx(certs, certs.client))
            with pytest.raises(smtplib.SMTPConnectError):
                smtplib_send(port, "tls", client_ctx(certs, certs.other_client))
            with pytest.raises(smtplib.SMTPConnectError):
                smtplib_send(port, "tls", client_ctx(certs))  # no certificate
            proc.wait_log("outcome=refused reason=\"no client certificate\"")
            m = wait_for(lambda: (lambda s: s if value(s, "certproxy_session_seconds_count", service="server") == 4
                                  else None)(scrape(mport)))
            assert m, scrape(mport)
        finally:
            proc.stop()
        assert value(m, "certproxy_sessions_total", service="server", outcome="ok") == 2
        assert value(m, "certproxy_sessions_total", service="server", outcome="refused") == 2
        assert value(m, "certproxy_refusals_total", service="server", reason="unknown") == 1
        assert value(m, "certproxy_refusals_total", service="server", reason="no_certificate") == 1
        assert value(m, "certproxy_sessions_active", service="server") == 0
        assert value(m, "certproxy_handshake_seconds_count", service="server") == 4
        assert value(m, "certproxy_handshake_seconds_bucket", service="server", le="+Inf") == 4
        received = sum(len(msg[2]) for msg in sink_mta.messages)
        assert value(m, "certproxy_bytes_total", service="server", direction="in") > received
        assert value(m, "certproxy_bytes_total", service="server", direction="out") > 0
        now = time.time()
        own = certproxy._not_after(certs.server.der) - now
        assert abs(value(m, "certproxy_certificate_expiry_seconds", role="own", sha256=certproxy.cert_fingerprint(
            certs.server.der).hex()) - own) < 60
        allowed = value(m, "certproxy_certificate_expiry_seconds", role="allowed", name="alice")
        assert abs(allowed - (certproxy._not_after(certs.client.der) - now)) < 60
        assert value(m, "certproxy_certificate_expiry_seconds", name="CN=stranger") is None  # refused: not watched


@pytest.fixture
def metrics(monkeypatch):
    m = certproxy._Metrics()
    monkeypatch.setattr(certproxy, "_METRICS", m)
    return m


async def test_client_service_watches_the_upstream_certificate(metrics, certs, server_service, client_service, sink):
    """The laptop side: its own certificate and the mail server's it met, by the upstream's name."""
    backend = await sink("backend.test")
    server = await server_service("tls", backend.endpoint)
    client = await client_service(f"127.0.0.1:{server.port}", mode="tls")
    with await asyncio.to_thread(smtplib.SMTP, "127.0.0.1", client.port, timeout=20) as s:
        await asyncio.to_thread(s.sendmail, "a@laptop.test", ["b@example.net"], b"Subject: m\r\n\r\nhi\r\n")
    async with asyncio.timeout(10):
        while sum(metrics.sessions.values()) < 2:
            await asyncio.sleep(0.02)
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(metrics.render({"laptop": client, "mx": server}).decode()):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    assert value(samples, "certproxy_sessions_total", service="client", outcome="ok") == 1
    assert value(samples, "certproxy_sessions_total", service="server", outcome="ok") == 1
    server_fp = certproxy.cert_fingerprint(certs.server.der).hex()
    assert value(samples, "certproxy_certificate_expiry_seconds", service="client", role="upstream",
                 name=f"127.0.0.1:{server.port}", sha256=server_fp) > 0
    assert value(samples, "certproxy_certificate_expiry_seconds", service="client", role="own") > 0
    assert value(samples, "certproxy_certificate_expiry_seconds", service="server", role="allowed", name="laptop") > 0


def test_label_values_are_escaped(metrics):
    metrics.refused('we"ird\\name\nx', "busy")
    text = metrics.render({}).decode()
    assert 'certproxy_refusals_total{service="we\\"ird\\\\name\\nx",reason="busy"} 1\n' in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["certproxy_refusals"].samples[0].labels["service"] == 'we"ird\\name\nx'


class TestExposure:
    @pytest.mark.parametrize("address", ["0.0.0.0", "192.0.2.1", "[::]"])
    def test_public_address_needs_the_flag(self, certs, address):
        r = subprocess.run(server_argv(certs, free_port(), 1, "--metrics", f"{address}:9464"), capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 2, r.stderr
        assert r.stderr == f"certproxy: error: --metrics: {address}:9464 is not a loopback address: the metrics " \
                           "name your clients' certificates; add --metrics-public to serve them there anyway " \
                           "(firewall it)\n"

    def test_public_with_the_flag(self, tmp_path, certs, sink_mta):
        port, mport = free_port(), free_port()
        proc = Process(server_argv(certs, port, sink_mta.port, "--metrics", f"0.0.0.0:{mport}", "--metrics-public"),
                       port, tmp_path / "s.log")
        try:
            assert value(scrape(mport), "certproxy_sessions_active", service="server") == 0
        finally:
            proc.stop()

    def test_metrics_in_a_config_file(self, tmp_path, certs, sink_mta):
        port, mport = free_port(), free_port()
        conf = tmp_path / "c.toml"
        service = (f'[server.mx]\ntls = true\nlisten = "127.0.0.1:{port}"\nbackend = "127.0.0.1:{sink_mta.port}"\n'
                   f'cert = "{certs.server.cert}"\nkey = "{certs.server.key}"\nallow = ["{certs.client.cert}"]\n')
        conf.write_text(f"metrics = {mport}\n" + service)
        proc = Process([sys.executable, str(ROOT / "certproxy.py"), "run", str(conf)], port, tmp_path / "r.log")
        try:
            assert value(scrape(mport), "certproxy_sessions_active", service="mx") == 0
        finally:
            proc.stop()
        conf.write_text(service + f'metrics = "127.0.0.1:{mport}"\n')
        r = subprocess.run([sys.executable, str(ROOT / "certproxy.py"), "check", str(conf)], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 2 and f"[server.mx] --metrics: applies to the whole process: give it at the top " \
                                     f"of {conf}" in r.stderr, r.stderr
        conf.write_text('metrics = "0.0.0.0:9464"\n' + service)
        r = subprocess.run([sys.executable, str(ROOT / "certproxy.py"), "check", str(conf)], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 2 and "--metrics: 0.0.0.0:9464 is not a loopback address" in r.stderr, r.stderr

    def test_not_with_workers(self, certs):
        r = subprocess.run(server_argv(certs, free_port(), 1, "--metrics", "9464", "--workers", "2"),
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and r.stderr.startswith("certproxy: error: --metrics: not with --workers"), r.stderr

    def test_http_is_bounded(self, tmp_path, certs, sink_mta):
        port, mport = free_port(), free_port()
        proc = Process(server_argv(certs, port, sink_mta.port, "--metrics", str(mport)), port, tmp_path / "s.log")
        try:
            assert wait_for(lambda: "metrics listen=" in proc.log.read_text())
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"http://127.0.0.1:{mport}/other", timeout=10)
            assert e.value.code == 404
            e.value.close()
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", data=b"x", timeout=10)
            assert e.value.code == 405
            e.value.close()
            with socket.create_connection(("127.0.0.1", mport), timeout=10) as s:  # an endless header: closed
                s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (certproxy.METRICS_MAX_REQUEST + 100))
                assert s.recv(100) == b""
            assert value(scrape(mport), "certproxy_sessions_active", service="server") == 0  # still serving
        finally:
            proc.stop()
