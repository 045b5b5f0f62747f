"""Every mistake answered with its fix (issue 14, the points done so far): each test shows the exact
message an operator meets."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

import certproxy

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "certproxy.py"), *args], capture_output=True, text=True,
                          timeout=timeout)


class TestPinSpellings:
    DIGEST = hashlib.sha256(b"a certificate").digest()
    B64 = base64.b64encode(DIGEST).decode()

    @pytest.mark.parametrize("text", [B64, B64.rstrip("="), f"sha256//{B64}", f'pin-sha256="{B64}"',
                                      f'pin-sha256="{B64}";', DIGEST.hex(), DIGEST.hex().upper(),
                                      certproxy.format_fingerprint(DIGEST), f"SHA256 Fingerprint={DIGEST.hex(':')}"])
    def test_every_spelling_people_paste(self, text):
        assert certproxy.parse_fingerprint(text) == self.DIGEST

    @pytest.mark.parametrize("text, name", [
        (hashlib.sha1(b"x").hexdigest(), "a SHA-1"), (hashlib.sha1(b"x").digest().hex(":").upper(), "a SHA-1"),
        (hashlib.md5(b"x").hexdigest(), "an MD5"), (hashlib.md5(b"x").digest().hex(":"), "an MD5")])
    def test_the_wrong_hash_is_named(self, text, name):
        with pytest.raises(ValueError) as e:
            certproxy.parse_fingerprint(text)
        assert str(e.value) == (f"{text!r} is {name} fingerprint; certproxy needs the SHA-256 one: "
                                "openssl x509 -in CERT -noout -fingerprint -sha256, or certproxy fingerprint CERT")

    def test_on_the_command_line(self, certs):
        r = cli("client", "--upstream", "mx.example.org:587", "--cert", str(certs.client.cert),
                "--key", str(certs.client.key), "--pin", hashlib.sha1(b"x").hexdigest())
        assert r.returncode == 2 and "--pin: " in r.stderr and "is a SHA-1 fingerprint" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


class TestLogOptionsWhereverTheyAre:
    """--log-format / --log-level before the command, after it, or at the top of the config file."""

    @pytest.mark.parametrize("where", ["before", "after", "file"])
    def test_json_lines_from_each_place(self, tmp_path, certs, where):
        import json

        from realpeers import Process, free_port
        from test_ops import server_table

        port = free_port()
        conf = tmp_path / "c.toml"
        conf.write_text(('log-format = "json"\nlog-level = "info"\n' if where == "file" else "")
                        + server_table(certs, port, 25))
        args = {"before": ["--log-format", "json", "run", str(conf)], "after": ["run", str(conf), "--log-format", "json"],
                "file": ["run", str(conf)]}[where]
        proc = Process([sys.executable, str(ROOT / "certproxy.py"), *args], port, tmp_path / "run.log")
        try:
            text = proc.wait_log("listening")
        finally:
            proc.stop()
        first = json.loads(text.splitlines()[0])
        assert first["event"] == "listening" and first["service"] == "smtps", text

    def test_inside_a_table_is_named(self, tmp_path, certs):
        from test_ops import server_table

        conf = tmp_path / "c.toml"
        conf.write_text(server_table(certs, 2465, 25) + 'log-format = "json"\n')
        r = cli("check", str(conf))
        assert r.returncode == 2 and f"[server.smtps] --log-format: applies to the whole process: give it at the " \
            f"top of {conf}, before any table" in r.stderr, r.stderr

    def test_a_wrong_value_in_the_file_is_named(self, tmp_path, certs):
        from test_ops import server_table

        conf = tmp_path / "c.toml"
        conf.write_text('log-format = "xml"\n' + server_table(certs, 2465, 25))
        r = cli("check", str(conf))
        assert r.returncode == 2 and f"{conf} log-format: 'xml': expected one of text, json" in r.stderr, r.stderr


class TestKeyAndCertificateErrors:
    """Each mistake with a key or certificate named, never '[SSL] PEM lib'."""

    @pytest.fixture
    def files(self, tmp_path, certs):
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(certs.client.key.read_bytes(), None)
        enc = tmp_path / "enc.key"
        enc.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.BestAvailableEncryption(b"secret")))
        return {"cert": str(certs.client.cert), "key": str(certs.client.key), "other_key": str(certs.other_client.key),
                "enc": str(enc), "missing": str(tmp_path / "nope.pem"), "dir": str(tmp_path)}

    @pytest.mark.parametrize("cert, key, expected", [
        ("cert", None, "--key: '{cert}' holds no private key: give the key with --key FILE"),
        ("key", "cert", "--cert: '{key}' holds a private key, not a certificate: are --cert and --key swapped?"),
        ("cert", "cert", "--key: '{cert}' holds a certificate, not a private key: are --cert and --key swapped?"),
        ("cert", "other_key", "--key: the key '{other_key}' does not belong to the certificate '{cert}'"),
        ("cert", "enc", "--key: the key in '{enc}' is encrypted (it has a passphrase) and certproxy runs unattended: "
                        "decrypt it once with  openssl pkey -in {enc} -out {enc}.plain  and use that (mode 0600)"),
        ("missing", "key", "--cert: '{missing}' does not exist"),
        ("dir", "key", "--cert: '{dir}' is a directory, not a PEM file"),
    ])
    def test_named(self, files, cert, key, expected):
        argv = ["client", "--upstream", "mx.example.org:587", "--pin", "AA" * 32, "--cert", files[cert]]
        r = cli(*argv, *(["--key", files[key]] if key else []))
        assert r.returncode == 2 and r.stderr == f"certproxy: error: {expected.format(**files)}\n", r.stderr

    def test_unreadable_message(self, monkeypatch, tmp_path):
        def denied(*a, **k):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr("builtins.open", denied)
        with pytest.raises(certproxy.ConfigError) as e:
            certproxy._read_file(str(tmp_path / "k.pem"), "--key")
        assert str(e.value).startswith(f"--key: cannot read '{tmp_path / 'k.pem'}': permission denied for user ")
