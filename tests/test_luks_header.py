"""LUKS1/LUKS2 header parsing and unlocking, against images cryptsetup and qemu-img made.

Fields are compared with what `cryptsetup luksDump` prints (its JSON for LUKS2); the volume
key with `luksDump --dump-volume-key`. Headers the tools cannot make here (reencryption,
integrity, tokens only, OPAL) are made by editing a real LUKS2 header's JSON and rewriting both
copies with valid checksums. Garbage and truncated files must give a LuksError, never another
exception.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tool, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from luks_images import (
    PASSPHRASE,
    add_keyslot,
    luks2_hdr_size,
    luks_dump,
    luks_format,
    qemu_luks_create,
    rewrite_luks2,
    volume_key,
    write_secret,
)

from nbdcrypt.crypto.secret import SecretBytes
from nbdcrypt.luks import LuksError
from nbdcrypt.luks.header import Argon2, LuksHeader, Pbkdf2, read_header
from nbdcrypt.luks.mapping import crypt_line
from nbdcrypt.luks.unlock import read_passphrase, unlock


def dump_field(dump: str, name: str) -> str:
    match = re.search(rf"^\s*{re.escape(name)}:\s*(.*)$", dump, re.MULTILINE)
    assert match, f"{name} not in\n{dump}"
    return match[1].strip()


@pytest.fixture
def passfile(tmp_path: Path) -> Path:
    return write_secret(tmp_path / "pass", PASSPHRASE)


def json_metadata(image: Path) -> dict[str, Any]:
    out = run([require_tool("cryptsetup"), "luksDump", "--dump-json-metadata", str(image)]).stdout
    doc: dict[str, Any] = json.loads(out)
    return doc


# --- fields, as cryptsetup sees them ------------------------------------------------------------


def test_luks1_fields_match_luksdump(tmp_path: Path, passfile: Path) -> None:
    image = luks_format(tmp_path / "l1", passfile, version=1, extra=("--hash", "sha1"))
    second = write_secret(tmp_path / "pass2", b"another one")
    add_keyslot(image, passfile, second, "--key-slot", "5")
    header = read_header(image)
    dump = luks_dump(image)
    assert header.version == 1
    assert header.uuid == dump_field(dump, "UUID")
    cipher = f"{dump_field(dump, 'Cipher name')}-{dump_field(dump, 'Cipher mode')}"
    assert header.segment.cipher == cipher == "aes-xts-plain64"
    assert header.hash_spec == dump_field(dump, "Hash spec") == "sha1"
    assert header.segment.offset == int(dump_field(dump, "Payload offset")) * 512
    assert header.key_size * 8 == int(dump_field(dump, "MK bits"))
    assert header.digest.iterations == int(dump_field(dump, "MK iterations"))
    assert (header.segment.sector_size, header.segment.iv_tweak) == (512, 0)
    assert header.payload_size == 20 * 2**20 - header.segment.offset
    assert [k.number for k in header.keyslots] == [0, 5]
    offsets = re.findall(r"Key material offset:\s*(\d+)", dump)
    stripes = re.findall(r"AF stripes:\s*(\d+)", dump)
    iterations = re.findall(r"Iterations:\s*(\d+)", dump)
    for slot, offset, count, iters in zip(
        header.keyslots, offsets, stripes, iterations, strict=True
    ):
        assert slot.area_offset == int(offset) * 512
        assert slot.stripes == int(count) == 4000
        assert slot.kdf == Pbkdf2("sha1", int(iters), slot.kdf.salt)


@pytest.mark.parametrize(("pbkdf", "sector_size"), [("pbkdf2", 512), ("argon2id", 4096)])
def test_luks2_fields_match_the_json_metadata(
    tmp_path: Path, passfile: Path, pbkdf: str, sector_size: int
) -> None:
    image = luks_format(tmp_path / "l2", passfile, pbkdf=pbkdf, sector_size=sector_size)
    header = read_header(image)
    doc = json_metadata(image)
    segment = doc["segments"]["0"]
    assert header.version == 2
    assert header.uuid == dump_field(luks_dump(image), "UUID")
    assert header.segment.offset == int(segment["offset"])
    assert header.segment.size is None and segment["size"] == "dynamic"
    assert header.segment.iv_tweak == int(segment["iv_tweak"])
    assert header.segment.cipher == segment["encryption"] == "aes-xts-plain64"
    assert header.segment.sector_size == segment["sector_size"] == sector_size
    assert header.payload_size == image.stat().st_size - header.segment.offset
    assert header.header_size == int(doc["config"]["json_size"]) + 4096
    assert header.keyslots_size == int(doc["config"]["keyslots_size"])
    (slot,) = header.keyslots
    raw = doc["keyslots"]["0"]
    assert slot.key_size == header.key_size == raw["key_size"] == 64
    assert (slot.stripes, slot.af_hash) == (raw["af"]["stripes"], raw["af"]["hash"])
    assert slot.area_cipher == raw["area"]["encryption"]
    assert slot.area_key_size == raw["area"]["key_size"]
    assert (slot.area_offset, slot.area_size) == (
        int(raw["area"]["offset"]),
        int(raw["area"]["size"]),
    )
    kdf = raw["kdf"]
    if pbkdf == "pbkdf2":
        assert slot.kdf == Pbkdf2(kdf["hash"], kdf["iterations"], slot.kdf.salt)
    else:
        assert slot.kdf == Argon2(
            "argon2id", kdf["time"], kdf["memory"], kdf["cpus"], slot.kdf.salt
        )
    digest = doc["digests"]["0"]
    assert (header.digest.hash, header.digest.iterations) == (digest["hash"], digest["iterations"])
    assert header.digest.keyslots == (0,) and header.digest.segments == (0,)


def test_qemu_img_image(tmp_path: Path, passfile: Path) -> None:
    image = qemu_luks_create(tmp_path / "q", passfile, "4M")
    header = read_header(image)
    dump = luks_dump(image)
    assert header.version == 1
    assert header.uuid == dump_field(dump, "UUID")
    assert header.segment.offset == int(dump_field(dump, "Payload offset")) * 512
    assert header.payload_size == 4 * 2**20
    assert header.hash_spec == "sha256"
    assert bytes(unlock(header, passfile).key) == volume_key(image, passfile)


# --- unlocking ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "pbkdf", "sector_size"),
    [(1, "pbkdf2", 512), (2, "pbkdf2", 512), (2, "argon2id", 4096), (2, "argon2i", 1024)],
)
def test_unlock_gives_cryptsetups_volume_key(
    tmp_path: Path, passfile: Path, version: int, pbkdf: str, sector_size: int
) -> None:
    image = luks_format(
        tmp_path / "img", passfile, version=version, pbkdf=pbkdf, sector_size=sector_size
    )
    key = unlock(read_header(image), passfile)
    assert key.keyslot == 0
    assert bytes(key.key) == volume_key(image, passfile)
    assert "key=" not in repr(key) and key.key.hex() not in repr(key)
    key.wipe()
    assert key.key == bytearray(64)


def test_wrong_passphrase_is_one_clear_line(tmp_path: Path, passfile: Path) -> None:
    image = luks_format(tmp_path / "img", passfile)
    wrong = write_secret(tmp_path / "wrong", b"not it")
    with pytest.raises(LuksError) as info:
        unlock(read_header(image), wrong, label="vault")
    assert str(info.value) == f"vault: no keyslot of {image} opens with the passphrase in {wrong}"


def test_the_passphrase_file_is_used_whole_like_cryptsetup_key_file(
    tmp_path: Path, passfile: Path
) -> None:
    """The trailing newline is part of the passphrase: without it, nothing opens."""
    image = luks_format(tmp_path / "img", passfile, version=1)
    stripped = write_secret(tmp_path / "stripped", PASSPHRASE.rstrip(b"\n"))
    with pytest.raises(LuksError, match="no keyslot"):
        unlock(read_header(image), stripped)
    assert bytearray(PASSPHRASE) == read_passphrase(passfile)


def test_keyslots_named_tried_and_skipped(tmp_path: Path, passfile: Path) -> None:
    image = luks_format(tmp_path / "img", passfile)
    other = write_secret(tmp_path / "other", b"second passphrase")
    add_keyslot(image, passfile, other, "--key-slot", "3")
    header = read_header(image)
    assert [k.number for k in header.openers()] == [0, 3]
    assert unlock(header, other).keyslot == 3
    assert unlock(header, passfile, keyslot=0).keyslot == 0
    with pytest.raises(LuksError) as info:
        unlock(header, passfile, keyslot=3, label="vault")
    assert str(info.value) == (
        f"vault: keyslot 3 of {image} does not open with the passphrase in {passfile}"
    )
    with pytest.raises(
        LuksError, match=r"keyslot 7 does not open the data segment \(keyslots that do: 0, 3\)"
    ):
        unlock(header, passfile, keyslot=7)
    run(
        [
            require_tool("cryptsetup"),
            "config",
            "--priority",
            "ignore",
            "--key-slot",
            "3",
            str(image),
        ]
    )
    ignored = read_header(image)
    assert [k.number for k in ignored.openers()] == [0]
    with pytest.raises(LuksError, match="no keyslot"):
        unlock(ignored, other)
    assert unlock(ignored, other, keyslot=3).keyslot == 3  # named: tried all the same


@pytest.mark.parametrize(
    ("mode", "content", "problem"),
    [
        (0o644, PASSPHRASE, "accessible by others (mode 0644)"),
        (0o640, PASSPHRASE, "accessible by others (mode 0640)"),
        (0o600, b"", "is empty"),
    ],
)
def test_passphrase_files_refused(tmp_path: Path, mode: int, content: bytes, problem: str) -> None:
    path = write_secret(tmp_path / "pass", content, mode)
    with pytest.raises(LuksError, match=re.escape(problem)):
        read_passphrase(path)


def test_passphrase_file_symlink_and_missing(tmp_path: Path, passfile: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(passfile)
    with pytest.raises(LuksError, match=r"passphrase file .*link"):
        read_passphrase(link)
    with pytest.raises(LuksError, match="No such file"):
        read_passphrase(tmp_path / "missing")


# --- damaged, truncated, garbage ---------------------------------------------------------------


def test_not_luks(tmp_path: Path) -> None:
    zeroes = tmp_path / "zeroes"
    zeroes.write_bytes(bytes(8192))
    with pytest.raises(LuksError, match="not a LUKS header"):
        read_header(zeroes)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(LuksError, match="not a LUKS header"):
        read_header(empty)
    with pytest.raises(LuksError, match="No such file"):
        read_header(tmp_path / "missing")
    with pytest.raises(LuksError, match="not a regular file"):
        read_header(tmp_path)


@given(
    st.binary(max_size=2048),
    st.sampled_from([b"", b"LUKS\xba\xbe\x00\x01", b"LUKS\xba\xbe\x00\x02"]),
)
@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_garbage_gives_a_luks_error(tmp_path: Path, garbage: bytes, prefix: bytes) -> None:
    path = tmp_path / "garbage"
    path.write_bytes(prefix + garbage)
    with pytest.raises(LuksError):
        read_header(path)


@pytest.mark.parametrize("version", [1, 2])
def test_truncated_files(tmp_path: Path, passfile: Path, version: int) -> None:
    image = luks_format(tmp_path / "img", passfile, version=version)
    header = read_header(image)
    data = image.read_bytes()
    slot_end = header.keyslots[0].area_offset + 1000
    for size in (300, 600, 5000, 20000, slot_end, header.segment.offset):
        cut = tmp_path / f"cut{size}"
        cut.write_bytes(data[:size])
        with pytest.raises(LuksError, match="truncated") as info:
            read_header(cut)
        assert str(info.value).startswith(f"{cut}: ")


def test_damaged_primary_luks2_copy_falls_back_to_the_secondary(
    tmp_path: Path, passfile: Path
) -> None:
    """(cryptsetup itself would repair the primary copy as it reads: run it before damaging.)"""
    image = luks_format(tmp_path / "img", passfile)
    good = read_header(image)
    expected_key = volume_key(image, passfile)
    with image.open("r+b") as f:
        f.seek(4096 + 10)
        byte = f.read(1)
        f.seek(4096 + 10)
        f.write(bytes([byte[0] ^ 0x20]))
    header = read_header(image)
    assert header.uuid == good.uuid and header.keyslots == good.keyslots
    assert len(header.notes) == 1 and "primary header copy is unusable" in header.notes[0]
    assert "checksum (sha256) mismatch" in header.notes[0]
    assert bytes(unlock(header, passfile).key) == expected_key
    hdr_size = luks2_hdr_size(image)
    with image.open("r+b") as f:  # now the secondary too
        f.seek(hdr_size + 4096 + 10)
        f.write(b"#")
    with pytest.raises(LuksError, match="corrupt LUKS2 header: primary copy: checksum"):
        read_header(image)


def test_garbage_primary_magic_finds_the_secondary(tmp_path: Path, passfile: Path) -> None:
    image = luks_format(tmp_path / "img", passfile)
    with image.open("r+b") as f:
        f.write(os.urandom(512))
    header = read_header(image)
    assert "primary header copy is unusable (no LUKS2 magic)" in header.notes[0]


def test_luks1_unknown_cipher_and_bad_keyslot_state(tmp_path: Path, passfile: Path) -> None:
    image = luks_format(tmp_path / "img", passfile, version=1)
    data = bytearray(image.read_bytes())
    twofish = bytearray(data)
    twofish[8:40] = b"twofish".ljust(32, b"\0")
    (tmp_path / "twofish").write_bytes(twofish)
    with pytest.raises(LuksError, match="block cipher 'twofish'"):
        read_header(tmp_path / "twofish")
    state = bytearray(data)
    struct.pack_into(">I", state, 208 + 48, 0x12345678)  # keyslot 1's marker
    (tmp_path / "state").write_bytes(state)
    with pytest.raises(LuksError, match="keyslot 1 has the unknown state 0x12345678"):
        read_header(tmp_path / "state")


def _edit(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for part in parents:
            node = node[part]
        if value is None:
            del node[last]
        else:
            node[last] = value

    return mutate


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            "config.requirements",
            {"mandatory": ["online-reencrypt-v2"]},
            "reencryption is in progress",
        ),
        (
            "config.requirements",
            {"mandatory": ["something-new"]},
            "unmet mandatory LUKS2 requirements: something-new",
        ),
        ("segments.0.integrity", {"type": "hmac(sha256)"}, "integrity protection"),
        ("segments.0.encryption", "serpent-xts-plain64", "block cipher 'serpent'"),
        ("segments.0.type", "hw-opal", "OPAL hardware encryption"),
        ("segments.0.flags", ["in-reencryption"], "is being reencrypted"),
        ("segments.1", {"type": "linear", "offset": "0", "size": "dynamic"}, "2 data segments"),
        ("digests.0.keyslots", [], "keyslots opened only through tokens are not supported"),
        ("keyslots.0.kdf.type", "argon2d", "KDF 'argon2d' is not supported"),
        ("keyslots.0.type", "reencrypt", "reencryption keyslot"),
        ("keyslots.0.area.encryption", "aes-ecb", "chaining mode 'ecb'"),
        ("digests.0.type", "sha-magic", "only pbkdf2 is supported"),
        ("segments.0.sector_size", 8192, "8192 is not 512, 1024, 2048 or 4096"),
        ("segments.0.offset", "16", "segments.0.offset: 16 is not a multiple of 512"),
        ("keyslots.0.af.stripes", "4000", "keyslots.0.af.stripes: expected an integer"),
        ("keyslots.0.kdf", None, "keyslots.0: missing 'kdf'"),
    ],
)
def test_unsupported_luks2_headers_are_refused(
    tmp_path: Path, passfile: Path, path: str, value: Any, message: str
) -> None:
    image = luks_format(tmp_path / "img", passfile)
    rewrite_luks2(image, _edit(path, value))
    with pytest.raises(LuksError, match=re.escape(message)) as info:
        read_header(image)
    assert str(info.value).startswith(f"{image}: ")


def test_luks2_flags_and_tokens_are_kept(tmp_path: Path, passfile: Path) -> None:
    image = luks_format(tmp_path / "img", passfile)
    token = {"type": "example", "keyslots": ["0"]}

    def mutate(doc: dict[str, Any]) -> None:
        doc["config"]["flags"] = ["allow-discards", "no-read-workqueue", "bogus-flag"]
        doc["tokens"]["0"] = token

    rewrite_luks2(image, mutate)
    header: LuksHeader = read_header(image)
    assert header.flags == ("allow-discards", "no-read-workqueue", "bogus-flag")
    assert header.notes == ("unknown LUKS2 flags ignored, as cryptsetup ignores them: bogus-flag",)
    assert header.tokens == ("0: example",)
    line = crypt_line(header, SecretBytes(bytes(64)), "img").text()
    assert line.endswith(
        f" 0 img {header.segment.offset // 512} 2 allow_discards no_read_workqueue"
    )
    assert "Flags:" in luks_dump(image)  # cryptsetup still reads what we wrote
