"""`server.tls` in the config: what a valid section becomes, and what is wrong with bad files.

Every bad TLS file is a config error at the line of the key naming it
(`FILE:LINE: server.tls.KEY: message`), from `load_config`, `nbdcrypt check` and
`nbdcrypt serve` alike, one line and no traceback; a private key's contents never appear in it.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run
from tlscerts import Pki

from nbdcrypt.config.loader import ConfigError, load_config
from nbdcrypt.config.model import ClientCertificate, TlsConfig, TlsMode
from nbdcrypt.tls import TlsFileError, server_context

TAIL = "devices:\n  d: {memory: 1M}\nexports:\n  a: {device: d}\n"


def tls_yaml(**keys: object) -> str:
    """A config whose server.tls has `keys`, one per line from line 4 (mode on line 4)."""
    lines = "".join(f"    {k}: {v}\n" for k, v in keys.items())
    return f"server:\n  listen: tcp://127.0.0.1:10809\n  tls:\n{lines}{TAIL}"


def files(pki: Pki, **changes: object) -> dict[str, object]:
    keys: dict[str, object] = {
        "mode": "require",
        "certificate": pki.server_cert,
        "private_key": pki.server_key,
        "ca": pki.ca_cert,
    }
    keys.update(changes)
    return {k: v for k, v in keys.items() if v is not None}


def load(tmp_path: Path, text: str) -> TlsConfig:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(path).server.tls


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'c.yaml'}:")
    return message.removeprefix(f"{tmp_path / 'c.yaml'}:")


def copy(tmp_path: Path, source: Path, name: str, mode: int = 0o600) -> Path:
    target = tmp_path / name
    shutil.copyfile(source, target)
    target.chmod(mode)
    return target


# Valid sections -----------------------------------------------------------------------------


def test_tls_is_off_without_the_section(tmp_path: Path) -> None:
    text = f"server:\n  listen: tcp://127.0.0.1:10809\n{TAIL}"
    assert load(tmp_path, text) == TlsConfig()
    assert TlsConfig().mode is TlsMode.OFF


@pytest.mark.parametrize("mode", ["allow", "require", "Require"])
def test_enabled_modes(tmp_path: Path, pki: Pki, mode: str) -> None:
    cfg = load(tmp_path, tls_yaml(**files(pki, mode=mode)))
    assert cfg == TlsConfig(
        TlsMode(mode.lower()),
        pki.server_cert,
        pki.server_key,
        pki.ca_cert,
        ClientCertificate.REQUIRED,
    )


def test_relative_paths_are_relative_to_the_config(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "tls").mkdir()
    for source in (pki.server_cert, pki.server_key, pki.ca_cert):
        copy(tmp_path / "tls", source, source.name)
    text = tls_yaml(
        mode="allow",
        certificate="tls/server-cert.pem",
        private_key="tls/server-key.pem",
        ca="tls/ca-cert.pem",
        client_certificate="optional",
    )
    cfg = load(tmp_path, text)
    assert cfg.certificate == tmp_path / "tls/server-cert.pem"
    assert cfg.ca == tmp_path / "tls/ca-cert.pem"
    assert cfg.client_certificate is ClientCertificate.OPTIONAL


def test_client_certificate_none_needs_no_ca(tmp_path: Path, pki: Pki) -> None:
    cfg = load(tmp_path, tls_yaml(**files(pki, ca=None, client_certificate="none")))
    assert cfg.ca is None and cfg.client_certificate is ClientCertificate.NONE


def test_off_does_not_read_the_files(tmp_path: Path) -> None:
    """A server can keep its TLS paths while TLS is switched off, even if they are gone."""
    cfg = load(tmp_path, tls_yaml(mode="off", certificate="gone.pem", private_key="gone.key"))
    assert cfg.mode is TlsMode.OFF and cfg.certificate == tmp_path / "gone.pem"


def test_server_context_settings(pki: Pki) -> None:
    cfg = TlsConfig(TlsMode.REQUIRE, pki.server_cert, pki.server_key, pki.ca_cert)
    ctx, found = server_context(cfg)
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert found.subject == "CN=localhost,O=nbdcrypt tests"
    assert set(found.sans) == {"DNS:localhost", "IP:127.0.0.1"}
    assert found.ca_subjects == ("CN=nbdcrypt test CA,O=nbdcrypt tests",)


# Bad keys ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"mode": "on"}, "4: server.tls.mode: expected off, allow or require, got 'on'"),
        ({"mode": "true"}, "4: server.tls.mode: expected off, allow or require, got 'true'"),
        ({"mode": "[allow]"}, "4: server.tls.mode: expected off, allow or require, got a list"),
        (
            {"mode": "off", "client_certificate": "sometimes"},
            "5: server.tls.client_certificate: expected required, optional or none, "
            "got 'sometimes'",
        ),
        (
            {"mode": "off", "verify": "yes"},
            "5: server.tls.verify: unknown key (allowed: mode, certificate, private_key, ca, "
            "client_certificate)",
        ),
        ({"mode": "off", "certificate": "''"}, "5: server.tls.certificate: expected a file path"),
        ({"mode": "allow"}, "3: server.tls: missing key 'certificate' (mode allow needs"),
        (
            {"mode": "allow", "certificate": "c.pem"},
            "3: server.tls: missing key 'private_key' (mode allow needs",
        ),
        (
            {"mode": "require", "certificate": "c.pem", "private_key": "k.pem"},
            "3: server.tls: missing key 'ca' (client certificates are verified against it; or "
            "set client_certificate: none)",
        ),
    ],
)
def test_bad_keys(tmp_path: Path, keys: dict[str, object], expected: str) -> None:
    assert error(tmp_path, tls_yaml(**keys)).startswith(expected)


# Bad files ---------------------------------------------------------------------------------------


def test_missing_files(tmp_path: Path, pki: Pki) -> None:
    for key, line in (("certificate", 5), ("private_key", 6), ("ca", 7)):
        gone = tmp_path / "gone.pem"
        message = error(tmp_path, tls_yaml(**files(pki, **{key: gone})))
        assert message == f"{line}: server.tls.{key}: cannot read {gone}: No such file or directory"


def test_not_pem(tmp_path: Path, pki: Pki) -> None:
    junk = copy(tmp_path, pki.ca_cert, "junk.pem")
    junk.write_text("hello\n")
    assert error(tmp_path, tls_yaml(**files(pki, certificate=junk))) == (
        f"5: server.tls.certificate: {junk} holds no PEM certificate "
        "(expected -----BEGIN CERTIFICATE-----)"
    )
    assert error(tmp_path, tls_yaml(**files(pki, ca=junk))).startswith(
        f"7: server.tls.ca: {junk} holds no PEM certificate"
    )
    # a key where the certificate belongs, a certificate where the key belongs
    key_copy = copy(tmp_path, pki.server_key, "key-as-cert.pem")
    assert "holds no PEM certificate" in error(
        tmp_path, tls_yaml(**files(pki, certificate=key_copy))
    )
    cert_copy = copy(tmp_path, pki.server_cert, "cert-as-key.pem")
    assert error(tmp_path, tls_yaml(**files(pki, private_key=cert_copy))) == (
        f"6: server.tls.private_key: {cert_copy} holds no PEM private key "
        "(expected -----BEGIN PRIVATE KEY-----)"
    )


def test_empty_file_and_directory(tmp_path: Path, pki: Pki) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    assert error(tmp_path, tls_yaml(**files(pki, ca=empty))) == (
        f"7: server.tls.ca: {empty} is empty"
    )
    assert error(tmp_path, tls_yaml(**files(pki, certificate=tmp_path))) == (
        f"5: server.tls.certificate: {tmp_path} is not a regular file"
    )


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_private_key_readable_by_others_is_refused(tmp_path: Path, pki: Pki, mode: int) -> None:
    key = copy(tmp_path, pki.server_key, "open.key", mode)
    message = error(tmp_path, tls_yaml(**files(pki, private_key=key)))
    assert message == (
        f"6: server.tls.private_key: {key} is accessible by others (mode {mode:04o}); a private "
        f"key must be private: chmod 600 {key}"
    )


def test_private_key_of_another_certificate(tmp_path: Path, pki: Pki) -> None:
    other = pki.client_key("alice")
    message = error(tmp_path, tls_yaml(**files(pki, private_key=other)))
    assert message == (
        f"6: server.tls.private_key: {other} does not match the certificate in "
        f"{pki.server_cert} (CN=localhost,O=nbdcrypt tests)"
    )
    _no_key_material(message, other)


def test_encrypted_private_key(tmp_path: Path, pki: Pki) -> None:
    encrypted = tmp_path / "encrypted.key"
    run(
        [
            "openssl", "pkey", "-in", str(pki.server_key), "-aes256", "-passout", "pass:secret",
            "-out", str(encrypted),
        ]
    )  # fmt: skip
    encrypted.chmod(0o600)
    message = error(tmp_path, tls_yaml(**files(pki, private_key=encrypted)))
    assert message.startswith(f"6: server.tls.private_key: {encrypted} is encrypted; give the key")
    _no_key_material(message, encrypted)


def test_expired_certificate(tmp_path: Path, pki: Pki) -> None:
    assert error(tmp_path, tls_yaml(**files(pki, certificate=pki.expired_cert))) == (
        f"5: server.tls.certificate: {pki.expired_cert} (CN=localhost,O=nbdcrypt tests) "
        "expired on 2002-01-01"
    )


def test_server_context_rechecks_the_files(tmp_path: Path, pki: Pki) -> None:
    """What the loader checked is checked again when the server builds its context."""
    key = copy(tmp_path, pki.server_key, "k.pem")
    cfg = TlsConfig(TlsMode.ALLOW, pki.server_cert, key, pki.ca_cert)
    server_context(cfg)
    key.chmod(0o644)
    with pytest.raises(TlsFileError) as info:
        server_context(cfg)
    assert info.value.key == "private_key"
    assert str(info.value).startswith("server.tls.private_key: ")


def _no_key_material(message: str, key: Path) -> None:
    body = [line for line in key.read_text().splitlines() if line and not line.startswith("-")]
    assert body
    for line in body:
        if len(line) >= 16:
            assert line not in message


# The command line --------------------------------------------------------------------------------


def test_check_prints_tls(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(tls_yaml(**files(pki, client_certificate="optional")))
    out = run([sys.executable, "-m", "nbdcrypt", "check", "-c", str(path)], cwd=ROOT).stdout
    assert "tls: require (STARTTLS before any other option)\n" in out
    assert (
        f"  certificate: {pki.server_cert}: CN=localhost,O=nbdcrypt tests "
        "(DNS:localhost, IP:127.0.0.1), expires "
    ) in out
    assert f"  private key: {pki.server_key}\n" in out
    assert "  client certificates: optional (without one, a client is anonymous)\n" in out
    assert f"  ca: {pki.ca_cert}: CN=nbdcrypt test CA,O=nbdcrypt tests\n" in out
    path.write_text(tls_yaml(mode="off"))
    out = run([sys.executable, "-m", "nbdcrypt", "check", "-c", str(path)], cwd=ROOT).stdout
    assert "tls: off (STARTTLS is refused)\n" in out


@pytest.mark.parametrize("command", ["check", "serve"])
def test_bad_tls_file_is_one_line_from_the_cli(tmp_path: Path, pki: Pki, command: str) -> None:
    key = copy(tmp_path, pki.server_key, "open.key", 0o644)
    path = tmp_path / "c.yaml"
    path.write_text(tls_yaml(**files(pki, private_key=key)))
    proc = subprocess.run(
        [sys.executable, "-m", "nbdcrypt", command, "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        f"nbdcrypt: config error: {path}:6: server.tls.private_key: {key} is accessible by "
        f"others (mode 0644); a private key must be private: chmod 600 {key}\n"
    )
    assert proc.stdout == ""
