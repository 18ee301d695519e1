"""nbdcrypt.crypto.xts: IEEE 1619 vectors, and equality with cryptography's per-unit XTS."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import cryptography_vectors
import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdcrypt.crypto import XtsCipher, libcrypto
from nbdcrypt.crypto.gf128 import mul_x_reference, scratch_words, tweak_chain

PATHS = ["native", "engine", "cryptography", "table", "chain"]
VECTORS = Path(cryptography_vectors.__file__).parent / "ciphers" / "AES" / "XTS"
FIRSTS = st.one_of(
    st.integers(0, 1000),
    st.integers(2**32 - 300, 2**32 + 300),
    st.integers(2**64 - 300, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(2**128 - 300, 2**128 - 1),
)


def read_rsp(path: Path) -> Iterator[dict[str, str]]:
    """The records of a NIST .rsp file, each with its section ('ENCRYPT' / 'DECRYPT')."""
    section = ""
    record: dict[str, str] = {}
    for raw in [*path.read_text().splitlines(), ""]:
        line = raw.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif " = " in line:
            key, value = line.split(" = ", 1)
            record[key] = value
        elif not line and record:
            yield record | {"section": section}
            record = {}


def whole_block_vectors(folder: str, name: str) -> list[dict[str, str]]:
    records = read_rsp(VECTORS / folder / name)
    return [r for r in records if int(r["DataUnitLen"]) % 128 == 0]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["XTSGenAES128.rsp", "XTSGenAES256.rsp"])
@pytest.mark.parametrize("folder", ["tweak-128hexstr", "tweak-dataunitseqno"])
def test_ieee1619_vectors(folder: str, name: str, path: str) -> None:
    """Each data-unit-sized vector through each implementation (128-bit IV numbers)."""
    vectors = whole_block_vectors(folder, name)
    assert len(vectors) >= 200
    for v in vectors:
        key, pt, ct = (bytes.fromhex(v[k]) for k in ("Key", "PT", "CT"))
        if "i" in v:
            number = int.from_bytes(bytes.fromhex(v["i"]), "little")
        else:
            number = int(v["DataUnitSeqNumber"])
        cipher = XtsCipher(key, iv_bits=128)
        unit = len(pt)
        with forced_path(cipher, path):
            if v["section"] == "ENCRYPT":
                assert bytes(cipher.encrypt(pt, number, unit)) == ct, v["COUNT"]
            else:
                assert bytes(cipher.decrypt(ct, number, unit)) == pt, v["COUNT"]


def test_vectors_as_one_batch() -> None:
    """Many vectors of one key size in one call each: the batched path (>= 16 units)."""
    vectors = [
        v
        for v in whole_block_vectors("tweak-dataunitseqno", "XTSGenAES256.rsp")
        if v["section"] == "ENCRYPT" and v["DataUnitLen"] == "256"
    ]
    for v in vectors[:40]:
        key = bytes.fromhex(v["Key"])
        number = int(v["DataUnitSeqNumber"])
        pt, ct = bytes.fromhex(v["PT"]), bytes.fromhex(v["CT"])
        # the vector as unit 20 of 40: the others are random, the IVs count up to it
        data = bytearray(os.urandom(40 * len(pt)))
        data[20 * len(pt) : 21 * len(pt)] = pt
        out = XtsCipher(key, iv_bits=128).encrypt(bytes(data), number - 20, len(pt))
        assert bytes(out[20 * len(pt) : 21 * len(pt)]) == ct


class Case(NamedTuple):
    key: bytes
    data: bytes
    first: int
    unit: int
    step: int = 1
    bits: int = 128


def reference(case: Case) -> bytes:
    """One cryptography XTS context per unit."""
    out = bytearray()
    unit = case.unit
    for i in range(len(case.data) // unit):
        number = (case.first + i * case.step) % (1 << case.bits)
        tweak = modes.XTS(number.to_bytes(16, "little"))
        ctx = Cipher(algorithms.AES(case.key), tweak).encryptor()
        out += ctx.update(case.data[i * unit : (i + 1) * unit])
    return bytes(out)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    rng = np.random.default_rng(draw(st.integers(0, 2**64 - 1)))
    unit = draw(st.sampled_from([16, 32, 48, 512, 1024, 4096]))
    return Case(
        key=rng.bytes(draw(st.sampled_from([32, 64]))),
        data=rng.bytes(unit * draw(st.integers(1, 40))),
        first=draw(FIRSTS),
        unit=unit,
        step=draw(st.sampled_from([1, 8])),
        bits=draw(st.sampled_from([32, 64, 128])),
    )


@settings(max_examples=150, deadline=None)
@given(case=cases())
def test_matches_per_unit_reference(case: Case) -> None:
    cipher = XtsCipher(case.key, iv_bits=case.bits)
    ciphertext = bytes(cipher.encrypt(case.data, case.first, case.unit, step=case.step))
    assert ciphertext == reference(case)
    back = cipher.decrypt(ciphertext, case.first, case.unit, step=case.step)
    assert bytes(back) == case.data


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_every_path_matches(path: str, case: Case) -> None:
    """Each implementation on its own, whatever the shape would choose."""
    cipher = XtsCipher(case.key, iv_bits=case.bits)
    assert libcrypto.available(), "the system's libcrypto (libssl3) is missing"
    with forced_path(cipher, path):
        ciphertext = bytes(cipher.encrypt(case.data, case.first, case.unit, step=case.step))
        back = bytes(cipher.decrypt(ciphertext, case.first, case.unit, step=case.step))
    assert ciphertext == reference(case)
    assert back == case.data


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_in_place_matches_the_reference(case: Case) -> None:
    """The prepared request a sealed write runs over its payload buffer (one C call, no
    lock): the same ciphertext, in the buffer itself; None where one call cannot do it."""
    cipher = XtsCipher(case.key, iv_bits=case.bits)
    run = cipher.in_place(case.first, case.unit, len(case.data), step=case.step)
    if case.unit < 2048 and not libcrypto.native():
        assert run is None
        return
    assert run is not None, case
    buffer = bytearray(case.data)
    run(buffer)
    assert bytes(buffer) == reference(case)
    undo = cipher.in_place(case.first, case.unit, len(case.data), step=case.step, encrypt=False)
    assert undo is not None
    undo(buffer)
    assert bytes(buffer) == case.data


@pytest.mark.parametrize("unit", [512, 4096])  # the two C paths: XtsEngine, UnitEngine
def test_a_prepared_request_outlives_its_cipher(unit: int) -> None:
    """A sealed write runs its prepared call with no lock held, while another thread may drop
    the cipher (a key evicted from a keyslot-less engine): the call keeps its OpenSSL
    contexts alive, so the bytes come out right rather than from freed memory."""
    key, data = os.urandom(64), os.urandom(4 * unit)
    cipher = XtsCipher(key)
    run = cipher.in_place(7, unit, len(data))
    assert run is not None
    del cipher
    gc.collect()
    buffer = bytearray(data)
    run(buffer)
    assert bytes(buffer) == reference(Case(key, data, 7, unit))


def test_in_place_refuses_what_is_not_whole_units() -> None:
    cipher = XtsCipher(bytes(range(64)))
    assert cipher.in_place(0, 4096, 4096 + 512) is None
    assert cipher.in_place(0, 24, 48) is None


@contextmanager
def forced_path(cipher: XtsCipher, path: str) -> Iterator[None]:
    original = XtsCipher._path
    XtsCipher._path = lambda self, units, blocks: path  # type: ignore[method-assign]
    try:
        yield
    finally:
        XtsCipher._path = original  # type: ignore[method-assign]


def test_large_request_in_chunks() -> None:
    """More than one batched piece (1 MiB each): IV numbers carry on across pieces."""
    key, data = os.urandom(64), os.urandom(3 * 1024 * 1024 + 4096)
    first = 2**64 - 1000
    out = XtsCipher(key, iv_bits=64).encrypt(data, first, 512)
    assert bytes(out) == reference(Case(key, data, first, 512, bits=64))


def test_out_buffer_and_input_untouched() -> None:
    key, data = os.urandom(32), bytearray(os.urandom(512 * 20))
    original = bytes(data)
    out = bytearray(len(data) + 100)
    result = XtsCipher(key).encrypt(data, 7, 512, out=out)
    assert data == original
    assert bytes(result) == bytes(out[: len(data)]) == reference(Case(key, original, 7, 512))


def test_equal_key_halves_are_accepted() -> None:
    """The kernel's xts accepts K1 == K2 (OpenSSL refuses it): the batched path serves it."""
    half = os.urandom(32)
    cipher = XtsCipher(half + half, iv_bits=64)
    data = os.urandom(4096)
    out = bytes(cipher.encrypt(data, 5, 512))
    assert bytes(cipher.decrypt(out, 5, 512)) == data
    # against a decryption by OpenSSL, which allows equal halves when decrypting
    for i in range(8):
        ctx = Cipher(algorithms.AES(half + half), modes.XTS((5 + i).to_bytes(16, "little")))
        unit = out[i * 512 : (i + 1) * 512]
        assert ctx.decryptor().update(unit) == data[i * 512 : (i + 1) * 512]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="32 or 64 bytes"):
        XtsCipher(bytes(48))
    cipher = XtsCipher(bytes(range(32)))
    with pytest.raises(ValueError, match="whole number"):
        cipher.encrypt(bytes(600), 0, 512)
    with pytest.raises(ValueError, match="multiple of 16"):
        cipher.encrypt(bytes(601), 0, 601)
    assert "00" not in repr(cipher) and "AES-128-XTS" in repr(cipher)


@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 15, 16, 31, 32, 63, 64, 65, 129, 256])
def test_tweak_chain(m: int) -> None:
    n = 3
    first = np.frombuffer(os.urandom(16 * n), np.uint64).reshape(n, 2).copy()
    out = np.empty((n, m, 2), np.uint64)
    tweak_chain(first, m, out, np.empty(scratch_words(n, m), np.uint64))
    for i in range(n):
        t = int(first[i, 0]) | int(first[i, 1]) << 64
        for j in range(m):
            assert int(out[i, j, 0]) | int(out[i, j, 1]) << 64 == mul_x_reference(t, j)
