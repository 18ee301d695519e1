"""Key sources of the keyring: key files, environment variables, systemd credentials.

What is promised (docs/CONFIG.md, `keys`): raw bytes or hex from a private file or credential,
hex from an environment variable that is then gone from the environment (children do not
inherit it), a clear error naming the key and the source (never the bytes) for every bad one,
and keys wiped when they are removed. The end-to-end test serves data through keys from an
environment variable and a credential and checks the ciphertext on disk against those keys.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, StartServer, require_tool, run
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nbdcrypt.blkcrypto.key import CryptoMode
from nbdcrypt.config.model import KeyConfig, KeyCredential, KeyEnv, KeyFile, KeySource
from nbdcrypt.keyring import KeyFileError, load_key, wipe_keys

KEY = bytes(range(64))  # an AES-256-XTS key: two different halves
VAR = "NBDCRYPT_TEST_KEY"


def config(source: KeySource, mode: CryptoMode = CryptoMode.AES_256_XTS) -> KeyConfig:
    return KeyConfig("k", mode, 4096, 8, source)


def private(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def refused(source: KeySource, match: str) -> str:
    with pytest.raises(KeyFileError, match=match) as info:
        load_key(config(source))
    message = str(info.value)
    assert message.startswith("key k: ") and KEY.hex() not in message
    return message


# --- key files ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", [KEY, KEY.hex().encode(), b"  " + KEY.hex().upper().encode() + b"\n"]
)
def test_key_file_raw_or_hex(tmp_path: Path, text: bytes) -> None:
    key = load_key(config(KeyFile(private(tmp_path / "k.key", text))))
    assert bytes(key.raw) == KEY and KEY.hex() not in repr(key)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_key_file_readable_by_others(tmp_path: Path, mode: int) -> None:
    path = private(tmp_path / "k.key", KEY, mode)
    message = refused(KeyFile(path), "accessible by others")
    assert message == (
        f"key k: {path} is accessible by others (mode {mode:04o}); it must be private: "
        f"chmod 600 {path}"
    )


def test_key_file_problems(tmp_path: Path) -> None:
    refused(KeyFile(tmp_path / "missing.key"), "No such file or directory")
    (tmp_path / "dir.key").mkdir(mode=0o700)
    refused(KeyFile(tmp_path / "dir.key"), "is not a regular file")
    (tmp_path / "link.key").symlink_to(private(tmp_path / "real.key", KEY))
    refused(KeyFile(tmp_path / "link.key"), "Too many levels of symbolic links")
    path = private(tmp_path / "short.key", KEY[:32])
    assert refused(KeyFile(path), "holds") == (
        f"key k: file {path} holds 32 bytes; aes-256-xts needs 64 raw bytes or 128 hex digits"
    )
    path = private(tmp_path / "nothex.key", b"g" * 128)
    assert refused(KeyFile(path), "neither") == (
        f"key k: file {path} is neither 64 raw bytes nor 128 hex digits"
    )
    refused(KeyFile(private(tmp_path / "big.key", b"0" * 5000)), "too large for a key file")


def test_key_file_created(tmp_path: Path) -> None:
    path = tmp_path / "new" / "k.key"
    key = load_key(config(KeyFile(path, create=True)))
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_bytes() == bytes(key.raw)
    assert load_key(config(KeyFile(path, create=True))).raw == key.raw  # not made again


# --- environment variables ------------------------------------------------------------------------


def test_env_key_is_read_then_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VAR, KEY.hex())
    key = load_key(config(KeyEnv(VAR)))
    assert bytes(key.raw) == KEY
    assert VAR not in os.environ
    child = subprocess.run(["env"], capture_output=True, text=True, check=True).stdout
    assert VAR not in child and KEY.hex() not in child  # children do not inherit it


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (KEY.hex()[:-2], "does not hold 128 hex digits"),
        ("zz" * 64, "does not hold 128 hex digits"),
        ("é" * 64, "is not hex digits"),
        ("", "does not hold 128 hex digits"),
    ],
)
def test_env_key_bad(monkeypatch: pytest.MonkeyPatch, value: str, why: str) -> None:
    monkeypatch.setenv(VAR, value)
    message = refused(KeyEnv(VAR), why)
    assert message.startswith(f"key k: environment variable {VAR} ")
    assert VAR not in os.environ  # removed even when it is bad


def test_env_key_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VAR, raising=False)
    assert refused(KeyEnv(VAR), "is not set") == f"key k: environment variable {VAR} is not set"


def test_env_key_raw_bytes_are_not_hex(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VAR, "a" * 64)  # 64 characters: a raw key's length, but not hex
    refused(KeyEnv(VAR), "does not hold 128 hex digits")


# --- systemd credentials --------------------------------------------------------------------------


def test_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    private(tmp_path / "raw", KEY, 0o400)
    private(tmp_path / "hex", KEY.hex().encode() + b"\n", 0o400)
    assert bytes(load_key(config(KeyCredential("raw"))).raw) == KEY
    assert bytes(load_key(config(KeyCredential("hex"))).raw) == KEY
    private(tmp_path / "open", KEY, 0o444)
    refused(KeyCredential("open"), "accessible by others")
    assert refused(KeyCredential("nope"), "no credential") == (
        f"key k: systemd credential nope: no credential 'nope' in {tmp_path} "
        "(is LoadCredential=nope:... in the unit?)"
    )


def test_credential_without_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert refused(KeyCredential("vault"), "not set") == (
        "key k: systemd credential vault: $CREDENTIALS_DIRECTORY is not set (systemd sets it "
        "for a unit with LoadCredential=vault:PATH)"
    )


def test_wipe(tmp_path: Path) -> None:
    keys = [load_key(config(KeyFile(private(tmp_path / "k.key", KEY))))]
    wipe_keys(keys)
    assert bytes(keys[0].raw) == bytes(64)


# --- through a server -----------------------------------------------------------------------------

SOURCES = """\
keys:
  from-env: {mode: aes-256-xts, data_unit_size: 512, source: {env: NBDCRYPT_TEST_KEY}}
  from-credential: {mode: aes-256-xts, data_unit_size: 4096, source: {credential: vault.key}}
devices:
  a: {file: a.img, size: 4M}
  b: {file: b.img, size: 4M}
exports:
  env: {device: a, key: from-env}
  credential: {device: b, key: from-credential}
"""


def encrypt(key: bytes, unit: int, data: bytes) -> bytes:
    out = b""
    for at in range(0, len(data), unit):
        cipher = Cipher(algorithms.AES(key), modes.XTS((at // unit).to_bytes(16, "little")))
        out += cipher.encryptor().update(data[at : at + unit])
    return out


def test_served_through_env_and_credential_keys(
    tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_key, cred_key = os.urandom(64), os.urandom(64)
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    private(creds / "vault.key", cred_key, 0o400)
    monkeypatch.setenv(VAR, env_key.hex())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    server = start_server(SOURCES)
    data = os.urandom(64 * 1024)
    for export in ("env", "credential"):
        cmd = [require_tool("nbdcopy"), "-", server.uri(export)]
        subprocess.run(cmd, input=data, capture_output=True, timeout=120, check=True)
    assert (tmp_path / "a.img").read_bytes()[: len(data)] == encrypt(env_key, 512, data)
    assert (tmp_path / "b.img").read_bytes()[: len(data)] == encrypt(cred_key, 4096, data)
    assert server.stop() == 0
    assert env_key.hex() not in server.log and cred_key.hex() not in server.log


def test_serve_refuses_a_missing_env_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VAR, raising=False)
    (tmp_path / "c.yaml").write_text("server: {listen: tcp://127.0.0.1:0}\n" + SOURCES)
    out = run(
        [sys.executable, "-m", "nbdcrypt", "serve", "-c", str(tmp_path / "c.yaml")],
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 1
    assert out.stderr == f"nbdcrypt: key from-env: environment variable {VAR} is not set\n"
