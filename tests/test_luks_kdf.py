"""KDFs and their parameters: PBKDF2 against hashlib, Argon2 parameters as cryptsetup wrote them."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from luks_images import PASSPHRASE, luks_dump, luks_format, volume_key, write_secret

from nbdcrypt.luks import LuksError
from nbdcrypt.luks.header import Argon2, Pbkdf2, read_header
from nbdcrypt.luks.kdf import argon2_derive, pbkdf2
from nbdcrypt.luks.unlock import unlock


@given(
    st.sampled_from(["sha1", "sha256", "sha512", "ripemd160", "sha3-256"]),
    st.binary(max_size=80),
    st.binary(min_size=1, max_size=64),
    st.integers(1, 50),
    st.integers(1, 130),
)
@settings(max_examples=100)
def test_pbkdf2_equals_hashlib(
    name: str, secret: bytes, salt: bytes, iterations: int, length: int
) -> None:
    """Through cryptography where it has the hash, through hashlib otherwise (ripemd160)."""
    expected = hashlib.pbkdf2_hmac(name.replace("-", "_"), secret, salt, iterations, length)
    got = pbkdf2(name, bytearray(secret), salt, iterations, length)
    assert isinstance(got, bytearray)
    assert bytes(got) == expected


def test_unknown_hash_names_the_supported_ones() -> None:
    with pytest.raises(ValueError, match=r"hash 'whirlpool' is not supported \(supported: sha1"):
        pbkdf2("whirlpool", b"x", b"salt", 1, 32)


def test_argon2_parameters_are_checked_by_openssl() -> None:
    params = Argon2("argon2id", time=1, memory=8, cpus=2, salt=bytes(16))
    with pytest.raises(LuksError, match="argon2id parameters refused"):
        argon2_derive(params, b"pw", 32)


@pytest.mark.parametrize(
    ("pbkdf", "memory", "parallel"),
    [("argon2id", 32768, 2), ("argon2i", 16384, 1), ("argon2id", 8192, 1)],
)
def test_argon2_keyslots_as_cryptsetup_wrote_them(
    tmp_path: Path, pbkdf: str, memory: int, parallel: int
) -> None:
    """time, memory (KiB) and cpus (lanes) are read as cryptsetup wrote them, and the keyslot
    opens to cryptsetup's volume key (cryptsetup caps cpus at the CPUs online: 2 here)."""
    passfile = write_secret(tmp_path / "pass", PASSPHRASE)
    image = luks_format(
        tmp_path / "img",
        passfile,
        pbkdf=pbkdf,
        extra=("--pbkdf-memory", str(memory), "--pbkdf-parallel", str(parallel)),
    )
    slot = read_header(image).keyslots[0]
    assert slot.kdf == Argon2(pbkdf, 4, memory, parallel, slot.kdf.salt)
    dump = luks_dump(image)
    assert re.search(rf"PBKDF:\s+{pbkdf}\b", dump)
    assert re.search(rf"Memory:\s+{memory}\b", dump)
    assert re.search(rf"Threads:\s+{parallel}\b", dump)
    key = unlock(read_header(image), passfile)
    assert bytes(key.key) == volume_key(image, passfile)


@pytest.mark.parametrize(("version", "hash_name"), [(1, "sha1"), (1, "sha512"), (2, "sha512")])
def test_pbkdf2_keyslots_with_other_hashes(tmp_path: Path, version: int, hash_name: str) -> None:
    passfile = write_secret(tmp_path / "pass", PASSPHRASE)
    image = luks_format(tmp_path / "img", passfile, version=version, extra=("--hash", hash_name))
    header = read_header(image)
    slot = header.keyslots[0]
    assert slot.kdf == Pbkdf2(hash_name, 1000, slot.kdf.salt)
    assert slot.af_hash == hash_name
    assert header.digest.hash == hash_name
    assert len(slot.kdf.salt) == 32
    key = unlock(header, passfile)
    assert bytes(key.key) == volume_key(image, passfile)
