"""nbdcrypt.crypto.cbc: equality with cryptography's per-unit CBC, plain and ESSIV IVs."""

from __future__ import annotations

import hashlib
import os
from typing import NamedTuple
from unittest.mock import patch

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdcrypt.crypto import CbcCipher, libcrypto

FIRSTS = st.one_of(
    st.integers(0, 1000),
    st.integers(2**32 - 300, 2**32 + 300),
    st.integers(2**64 - 300, 2**64 - 1),
    st.integers(0, 2**64 - 1),
)


def reference_iv(key: bytes, number: int, essiv: bool) -> bytes:
    """dm-crypt: the sector number, little-endian, zero-padded; ESSIV: that under SHA-256(key)."""
    block = number.to_bytes(16, "little")
    if not essiv:
        return block
    salt = hashlib.sha256(key).digest()
    return Cipher(algorithms.AES(salt), modes.ECB()).encryptor().update(block)


class Case(NamedTuple):
    key: bytes
    data: bytes
    first: int
    unit: int
    step: int = 1
    bits: int = 64
    essiv: bool = True


def reference(case: Case) -> bytes:
    out = bytearray()
    unit = case.unit
    for i in range(len(case.data) // unit):
        number = (case.first + i * case.step) % (1 << case.bits)
        iv = reference_iv(case.key, number, case.essiv)
        ctx = Cipher(algorithms.AES(case.key), modes.CBC(iv)).encryptor()
        out += ctx.update(case.data[i * unit : (i + 1) * unit])
    return bytes(out)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    rng = np.random.default_rng(draw(st.integers(0, 2**64 - 1)))
    unit = draw(st.sampled_from([16, 32, 512, 4096]))
    return Case(
        key=rng.bytes(draw(st.sampled_from([16, 24, 32]))),
        data=rng.bytes(unit * draw(st.integers(1, 70))),
        first=draw(FIRSTS),
        unit=unit,
        step=draw(st.sampled_from([1, 8])),
        bits=draw(st.sampled_from([32, 64])),
        essiv=draw(st.booleans()),
    )


@settings(max_examples=150, deadline=None)
@given(case=cases())
def test_matches_per_unit_reference(case: Case) -> None:
    cipher = CbcCipher(case.key, essiv="sha256" if case.essiv else None, iv_bits=case.bits)
    ciphertext = bytes(cipher.encrypt(case.data, case.first, case.unit, step=case.step))
    assert ciphertext == reference(case)
    back = cipher.decrypt(ciphertext, case.first, case.unit, step=case.step)
    assert bytes(back) == case.data


@pytest.mark.parametrize("path", ["engine", "cryptography", "batched"])
@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_every_path_matches(path: str, case: Case) -> None:
    """Each implementation on its own (decryption: engine or batched)."""
    assert libcrypto.available(), "the system's libcrypto (libssl3) is missing"
    cipher = CbcCipher(case.key, essiv="sha256" if case.essiv else None, iv_bits=case.bits)
    decrypt_path = "batched" if path == "cryptography" else path
    with (
        patch.object(CbcCipher, "_encrypt_path", lambda self, units, blocks: path),
        patch.object(CbcCipher, "_decrypt_path", lambda self, units: decrypt_path),
    ):
        ciphertext = bytes(cipher.encrypt(case.data, case.first, case.unit, step=case.step))
        back = bytes(cipher.decrypt(ciphertext, case.first, case.unit, step=case.step))
    assert ciphertext == reference(case)
    assert back == case.data


@pytest.mark.parametrize("unit", [512, 4096])
def test_large_request_in_chunks(unit: int) -> None:
    key, data = os.urandom(32), os.urandom(2 * 1024 * 1024 + 3 * unit)
    cipher = CbcCipher(key, essiv="sha256")
    out = cipher.encrypt(data, 2**64 - 700, unit, step=unit // 512)
    assert bytes(out) == reference(Case(key, data, 2**64 - 700, unit, unit // 512))
    assert bytes(cipher.decrypt(out, 2**64 - 700, unit, step=unit // 512)) == data


def test_out_buffer_and_input_untouched() -> None:
    key, data = os.urandom(16), bytearray(os.urandom(512 * 40))
    original = bytes(data)
    out = bytearray(len(data))
    cipher = CbcCipher(key, essiv="sha256")
    result = cipher.encrypt(data, 3, 512, out=out)
    assert data == original
    assert bytes(result) == bytes(out) == reference(Case(key, original, 3, 512))
    back = bytearray(len(data))
    cipher.decrypt(out, 3, 512, out=back)
    assert back == original


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="16, 24 or 32"):
        CbcCipher(bytes(20))
    with pytest.raises(ValueError, match="only sha256"):
        CbcCipher(bytes(16), essiv="md5")
    cipher = CbcCipher(bytes(range(32)), essiv="sha256")
    assert repr(cipher) == "CbcCipher(AES-256-CBC, essiv:sha256)"
