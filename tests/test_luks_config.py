"""The `luks` device kind in the config, `nbdcrypt check` on it, and `nbdcrypt luks dump`.

Config errors name FILE:LINE: key.path; `luks dump` is checked against `cryptsetup luksDump`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from luks_images import (
    PASSPHRASE,
    add_keyslot,
    luks_dump,
    luks_format,
    qemu_luks_create,
    volume_key,
    write_secret,
)

from nbdcrypt.blkcrypto.key import CryptoMode
from nbdcrypt.config.loader import ConfigError, load_config
from nbdcrypt.config.model import KeyConfig, KeyLuks, LuksDeviceConfig


def nbdcrypt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbdcrypt", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """tmp_path with pass (0600), l1.img (LUKS1), l2.img (LUKS2 argon2id, 4096-byte sectors)."""
    passfile = write_secret(tmp_path / "pass", PASSPHRASE)
    luks_format(tmp_path / "l1.img", passfile, version=1)
    luks_format(tmp_path / "l2.img", passfile, pbkdf="argon2id", sector_size=4096)
    return tmp_path


def config(directory: Path, devices: str, exports: str = "  e: {device: vault}\n") -> Path:
    path = directory / "c.yaml"
    path.write_text(
        "server: {listen: tcp://127.0.0.1:10809}\n"  # line 1
        f"devices:\n{devices}"  # devices from line 3
        f"exports:\n{exports}"
    )
    return path


def error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_a_luks_device_and_its_key(images: Path) -> None:
    path = config(
        images,
        "  vault: {luks: {file: l2.img, passphrase_file: pass}}\n"
        "  old:\n    luks: {file: l1.img, passphrase_file: pass, keyslot: 0}\n",
        "  e: {device: vault}\n  o: {device: old, key: vault}\n",
    )
    cfg = load_config(path)
    vault = cfg.devices["vault"]
    assert isinstance(vault, LuksDeviceConfig)
    assert vault.path == images / "l2.img"
    assert vault.passphrase_file == images / "pass"
    assert vault.keyslot is None
    assert vault.size == (20 << 20) - (16 << 20) == vault.header.payload_size
    old = cfg.devices["old"]
    assert isinstance(old, LuksDeviceConfig) and old.keyslot == 0
    assert cfg.keys["vault"] == KeyConfig(
        "vault", CryptoMode.AES_256_XTS, 4096, 8, KeyLuks("vault")
    )
    assert cfg.keys["old"] == KeyConfig("old", CryptoMode.AES_256_XTS, 512, 8, KeyLuks("old"))
    assert cfg.exports["o"].key == "vault"


def test_a_table_over_a_luks_device(images: Path) -> None:
    path = config(
        images,
        "  vault: {luks: {file: l1.img, passphrase_file: pass}}\n"
        "  part: {table: ['0 2048 linear vault 2048']}\n",
        "  e: {device: part}\n",
    )
    assert load_config(path).devices["part"].size == 2048 * 512
    bad = config(
        images,
        "  vault: {luks: {file: l1.img, passphrase_file: pass}}\n"
        "  part: {table: ['0 99999 linear vault 0']}\n",
    )
    assert "linear maps sectors 0..99999 of vault, which has only 36864 sectors" in error(bad)


@pytest.mark.parametrize(
    ("device", "where", "message"),
    [
        (
            "  vault: {luks: {file: nothere.img, passphrase_file: pass}}\n",
            "3: devices.vault.luks.file",
            "nothere.img: No such file or directory",
        ),
        (
            "  vault: {luks: {file: pass, passphrase_file: pass}}\n",
            "3: devices.vault.luks.file",
            "not a LUKS header",
        ),
        (
            "  vault: {luks: {file: l1.img, passphrase_file: open}}\n",
            "3: devices.vault.luks.passphrase_file",
            "accessible by others (mode 0644); it must be private: chmod 600",
        ),
        (
            "  vault: {luks: {file: l1.img, passphrase_file: missing}}\n",
            "3: devices.vault.luks.passphrase_file",
            "missing: No such file or directory",
        ),
        (
            "  vault:\n    luks:\n      file: l1.img\n      passphrase_file: pass\n"
            "      keyslot: 3\n",
            "7: devices.vault.luks.keyslot",
            "keyslot 3 is not active in",
        ),
        (
            "  vault: {luks: {file: l1.img, passphrase_file: pass, keyslot: x}}\n",
            "3: devices.vault.luks.keyslot",
            "expected an integer",
        ),
        (
            "  vault: {luks: {file: l1.img}}\n",
            "3: devices.vault.luks",
            "missing key 'passphrase_file'",
        ),
        (
            "  vault: {luks: {file: l1.img, passphrase_file: pass, key: x}}\n",
            "3: devices.vault.luks.key",
            "unknown key (allowed: file, passphrase_file, keyslot)",
        ),
        (
            "  vault: {luks: {file: l1.img, passphrase_file: pass}, size: 1M}\n",
            "3: devices.vault.size",
            "not for luks devices",
        ),
        (
            "  vault: {luks: {file: l1.img, passphrase_file: pass}, file: l1.img}\n",
            "3: devices.vault.luks",
            "a device has one kind; this one is already a file",
        ),
    ],
)
def test_config_errors_are_located(images: Path, device: str, where: str, message: str) -> None:
    write_secret(images / "open", PASSPHRASE, 0o644)
    path = config(images, device)
    text = error(path)
    assert text.startswith(f"{path}:{where}: "), text
    assert message in text


def test_a_key_of_the_same_name_is_refused(images: Path) -> None:
    path = images / "c.yaml"
    path.write_text(
        "server: {listen: tcp://127.0.0.1:10809}\n"
        "keys:\n  vault: {mode: aes-256-xts, data_unit_size: 512, source: {file: k}}\n"
        "devices:\n  vault: {luks: {file: l1.img, passphrase_file: pass}}\n"
        "exports:\n  e: {device: vault}\n"
    )
    assert f"{path}:5: devices.vault: keys.vault exists too" in error(path)


def test_check_shows_the_device_and_the_keyslot_never_the_key(images: Path) -> None:
    passfile = images / "pass"
    add_keyslot(
        images / "l1.img", passfile, write_secret(images / "pass2", b"two"), "--key-slot", "2"
    )
    path = config(
        images,
        "  vault: {luks: {file: l2.img, passphrase_file: pass}}\n"
        "  old: {luks: {file: l1.img, passphrase_file: pass2}}\n",
    )
    out = nbdcrypt("check", "-c", str(path))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    offset = 16 << 20
    assert f"vault: luks2 {images / 'l2.img'}, payload 4.0 MiB (4194304 bytes)" in text
    assert (
        f"aes-xts-plain64, 512-bit key, 4096-byte sectors, payload at byte {offset} "
        f"(sector {offset // 512}), iv_tweak 0" in text
    )
    assert f"passphrase file {passfile}: opens keyslot 0 (argon2id)" in text
    assert (
        f"0 8192 crypt aes-xts-plain64 {'0' * 128} 0 vault:image 32768 1 sector_size:4096" in text
    )
    assert f"passphrase file {images / 'pass2'}: opens keyslot 2 (pbkdf2)" in text
    assert (
        "vault: aes-256-xts, 4096-byte data units, 8-byte DUNs, volume key of luks device vault"
        in text
    )
    for image in ("l1.img", "l2.img"):
        key = volume_key(images / image, passfile).hex()
        assert key not in text and key not in out.stderr


def test_check_with_a_wrong_passphrase_is_one_line(images: Path) -> None:
    write_secret(images / "wrong", b"nope")
    path = config(images, "  vault: {luks: {file: l1.img, passphrase_file: wrong}}\n")
    out = nbdcrypt("check", "-c", str(path))
    assert out.returncode == 1
    assert out.stderr == (
        f"nbdcrypt: vault: no keyslot of {images / 'l1.img'} opens with the passphrase in "
        f"{images / 'wrong'}\n"
    )


# --- nbdcrypt luks dump -----------------------------------------------------------------------


def field(text: str, name: str) -> str:
    match = re.search(rf"^\s*{re.escape(name)}:\s*(.*)$", text, re.MULTILINE)
    assert match, f"{name} not in\n{text}"
    return match[1].strip()


def test_dump_matches_cryptsetup_luks2(images: Path) -> None:
    image = images / "l2.img"
    out = nbdcrypt("luks", "dump", str(image))
    assert out.returncode == 0, out.stderr
    ours, theirs = out.stdout, luks_dump(image)
    for name in ("Version", "UUID", "Keyslots area"):
        assert field(ours, name).split()[0] == field(theirs, name).split()[0]
    assert field(ours, "Cipher") == field(theirs, "cipher") == "aes-xts-plain64"
    assert field(ours, "Sector size").split()[0] == field(theirs, "sector").split()[0] == "4096"
    assert field(ours, "Payload offset").split()[0] == field(theirs, "offset").split()[0]
    assert field(ours, "PBKDF").startswith("argon2id, time 4, memory 32768 KiB, cpus 2")
    assert field(theirs, "Time cost") == "4" and field(theirs, "Memory") == "32768"
    assert field(ours, "Area").startswith(f"offset {field(theirs, 'Area offset').split()[0]} ")
    assert f"pbkdf2 sha256, {field(theirs, 'Iterations')} iterations" in ours
    assert "Salt" not in ours and "MK" not in ours


def test_dump_matches_cryptsetup_luks1_and_qemu(images: Path) -> None:
    passfile = images / "pass"
    for image in (images / "l1.img", qemu_luks_create(images / "q.img", passfile, "2M")):
        out = nbdcrypt("luks", "dump", str(image))
        assert out.returncode == 0, out.stderr
        ours, theirs = out.stdout, luks_dump(image)
        assert field(ours, "UUID") == field(theirs, "UUID")
        cipher = f"{field(theirs, 'Cipher name')}-{field(theirs, 'Cipher mode')}"
        assert field(ours, "Cipher") == cipher
        sectors = int(field(theirs, "Payload offset"))
        assert field(ours, "Payload offset") == f"{sectors * 512} bytes ({sectors} sectors)"
        assert field(ours, "Key size") == f"{field(theirs, 'MK bits')} bits"
        assert f"pbkdf2 sha256, {field(theirs, 'MK iterations')} iterations" in ours


def test_dump_with_a_passphrase_says_which_keyslot(images: Path) -> None:
    image = images / "l1.img"
    passfile = images / "pass"
    add_keyslot(image, passfile, write_secret(images / "pass4", b"four"), "--key-slot", "4")
    out = nbdcrypt("luks", "dump", "--passphrase-file", str(images / "pass4"), str(image))
    assert out.returncode == 0, out.stderr
    assert f"keyslot 4 opens with {images / 'pass4'}" in out.stdout
    assert volume_key(image, passfile).hex() not in out.stdout
    wrong = nbdcrypt(
        "luks", "dump", "--passphrase-file", str(images / "pass4"), "--key-slot", "0", str(image)
    )
    assert wrong.returncode == 1
    assert wrong.stderr == (
        f"nbdcrypt: keyslot 0 of {image} does not open with the passphrase in {images / 'pass4'}\n"
    )


def test_dump_of_what_is_not_luks_is_one_line(tmp_path: Path) -> None:
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(4096))
    out = nbdcrypt("luks", "dump", str(plain))
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr == f"nbdcrypt: {plain}: not a LUKS header (no LUKS magic at the start)\n"
    missing = nbdcrypt("luks", "dump", str(tmp_path / "none"))
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "No such file or directory" in missing.stderr


def test_luks_help() -> None:
    for args in (["luks"], ["luks", "dump"]):
        out = nbdcrypt(*args, "--help")
        assert out.returncode == 0
        assert "usage: nbdcrypt luks" in out.stdout
    assert "--passphrase-file" in nbdcrypt("luks", "dump", "--help").stdout
    assert "luks" in nbdcrypt("--help").stdout
