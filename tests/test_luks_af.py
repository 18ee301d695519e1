"""The AF merger (nbdcrypt/luks/af.py) against a small independent splitter and real keyslots."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from luks_images import PASSPHRASE, luks_format, volume_key, write_secret

from nbdcrypt.luks.af import af_merge, diffuse
from nbdcrypt.luks.header import Pbkdf2, read_header

HASHES = ["sha1", "sha256", "sha512", "ripemd160"]


def ref_diffuse(block: bytes, name: str) -> bytes:
    """The LUKS1 spec's diffusion, written out: H(i || piece_i) per digest-sized piece."""
    size = hashlib.new(name).digest_size
    out = b""
    for i in range((len(block) + size - 1) // size):
        piece = block[i * size : (i + 1) * size]
        out += hashlib.new(name, i.to_bytes(4, "big") + piece).digest()[: len(piece)]
    return out


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def ref_split(key: bytes, randoms: list[bytes], name: str) -> bytes:
    """The splitter: random stripes, then the key XOR the diffused chain of them."""
    d = bytes(len(key))
    for stripe in randoms:
        d = ref_diffuse(xor(d, stripe), name)
    return b"".join(randoms) + xor(d, key)


def ref_merge(material: bytes, key_size: int, stripes: int, name: str) -> bytes:
    d = bytes(key_size)
    for i in range(stripes - 1):
        d = ref_diffuse(xor(d, material[i * key_size : (i + 1) * key_size]), name)
    return xor(d, material[(stripes - 1) * key_size : stripes * key_size])


@st.composite
def split_cases(draw: st.DrawFn) -> tuple[bytes, list[bytes], str]:
    key_size = draw(st.integers(1, 100))
    stripes = draw(st.integers(1, 12))
    key = draw(st.binary(min_size=key_size, max_size=key_size))
    randoms = [draw(st.binary(min_size=key_size, max_size=key_size)) for _ in range(stripes - 1)]
    return key, randoms, draw(st.sampled_from(HASHES))


@given(split_cases())
@settings(max_examples=150)
def test_split_then_merge_gives_the_key(case: tuple[bytes, list[bytes], str]) -> None:
    key, randoms, name = case
    material = ref_split(key, randoms, name)
    assert bytes(af_merge(material, len(key), len(randoms) + 1, name)) == key


@given(
    st.integers(1, 80).flatmap(
        lambda size: st.tuples(
            st.just(size),
            st.integers(1, 10),
            st.binary(min_size=size * 10, max_size=size * 10 + 64),
            st.sampled_from(HASHES),
        )
    )
)
@settings(max_examples=150)
def test_merge_equals_the_reference_on_any_material(case: tuple[int, int, bytes, str]) -> None:
    """Extra bytes after key_size * stripes (a keyslot area's sector padding) are ignored."""
    key_size, stripes, material, name = case
    expected = ref_merge(material, key_size, stripes, name)
    assert bytes(af_merge(material, key_size, stripes, name)) == expected


@pytest.mark.parametrize(
    ("size", "name"), [(64, "sha256"), (48, "sha256"), (20, "sha512"), (1, "sha1")]
)
def test_diffuse_whole_and_short_pieces(size: int, name: str) -> None:
    block = bytes(range(size))
    work = bytearray(block)
    diffuse(work, name)
    assert bytes(work) == ref_diffuse(block, name)


def test_merge_rejects_short_material_and_unknown_hashes() -> None:
    with pytest.raises(ValueError, match="needs 128 bytes"):
        af_merge(bytes(127), 32, 4, "sha256")
    with pytest.raises(ValueError, match="whirlpool"):
        af_merge(bytes(128), 32, 4, "whirlpool")


def test_merge_of_a_real_keyslot_gives_cryptsetups_volume_key(tmp_path: Path) -> None:
    """The stripes of a cryptsetup keyslot, decrypted with an independent KDF and XTS,
    merge into the key cryptsetup dumps."""
    passfile = write_secret(tmp_path / "pass", PASSPHRASE)
    image = luks_format(tmp_path / "img", passfile, version=1)
    slot = read_header(image).keyslots[0]
    assert isinstance(slot.kdf, Pbkdf2)
    derived = hashlib.pbkdf2_hmac(
        "sha256", PASSPHRASE, slot.kdf.salt, slot.kdf.iterations, slot.area_key_size
    )
    stored = image.read_bytes()[slot.area_offset : slot.area_offset + slot.material_size]
    material = b""
    for sector in range(slot.material_size // 512):
        ctx = Cipher(algorithms.AES(derived), modes.XTS(sector.to_bytes(16, "little"))).decryptor()
        material += ctx.update(stored[sector * 512 : (sector + 1) * 512]) + ctx.finalize()
    key = af_merge(material, slot.key_size, slot.stripes, slot.af_hash)
    assert bytes(key) == volume_key(image, passfile)
    assert ref_merge(material, slot.key_size, slot.stripes, "sha256") == bytes(key)
