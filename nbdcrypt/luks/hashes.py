"""The hash names LUKS headers use (cryptsetup's), mapped to hashlib and `cryptography`.

LUKS names hashes as cryptsetup's crypto backends do: sha1, sha256, sha512, ripemd160,
sha3-256, blake2b-512, ... A name nbdcrypt has no implementation of is refused by `check_hash`
with a message listing what is supported.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import hashes

# LUKS name -> hashlib name
HASHLIB_NAMES = {
    "sha1": "sha1",
    "sha224": "sha224",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
    "ripemd160": "ripemd160",
    "sha3-224": "sha3_224",
    "sha3-256": "sha3_256",
    "sha3-384": "sha3_384",
    "sha3-512": "sha3_512",
    "blake2b-512": "blake2b",
    "blake2s-256": "blake2s",
    "sm3": "sm3",
}

# LUKS name -> cryptography's hash, for PBKDF2 into a buffer that can be wiped
CRYPTOGRAPHY_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
    "sha3-224": hashes.SHA3_224,
    "sha3-256": hashes.SHA3_256,
    "sha3-384": hashes.SHA3_384,
    "sha3-512": hashes.SHA3_512,
    "sm3": hashes.SM3,
}


def supported() -> list[str]:
    return [name for name in HASHLIB_NAMES if _available(name)]


def _available(name: str) -> bool:
    return HASHLIB_NAMES.get(name.lower(), "") in hashlib.algorithms_available


def check_hash(name: str) -> str:
    """The hashlib name of a LUKS hash name; ValueError naming the supported ones."""
    if not _available(name):
        raise ValueError(f"hash {name!r} is not supported (supported: {', '.join(supported())})")
    return HASHLIB_NAMES[name.lower()]


def digest_size(name: str) -> int:
    return hashlib.new(check_hash(name)).digest_size


def new(name: str, data: bytes = b"") -> hashlib._Hash:
    return hashlib.new(check_hash(name), data)
