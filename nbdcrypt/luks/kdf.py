"""The key derivation functions of LUKS keyslots and digests: PBKDF2-HMAC, Argon2i, Argon2id.

Each returns a new bytearray the caller wipes when done. PBKDF2 runs in `cryptography`
(derive_into writes into that bytearray) when it knows the hash, otherwise in hashlib (whose
result is an immutable copy; still equal output). Argon2 is `cryptography`'s (OpenSSL's):
cryptsetup's `time` is the iteration count, `memory` the cost in KiB and `cpus` the lanes;
there is no secret and no associated data.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.kdf import argon2
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from nbdcrypt.luks import LuksError, hashes
from nbdcrypt.luks.header import Argon2, Kdf, Pbkdf2

Buffer = bytes | bytearray | memoryview
ARGON2_CLASSES = {"argon2i": "Argon2i", "argon2id": "Argon2id"}


def pbkdf2(hash_name: str, secret: Buffer, salt: bytes, iterations: int, length: int) -> bytearray:
    """PBKDF2-HMAC-`hash_name` of `secret`, `length` bytes."""
    out = bytearray(length)
    algorithm = hashes.CRYPTOGRAPHY_HASHES.get(hash_name.lower())
    if algorithm is not None:
        kdf = PBKDF2HMAC(algorithm=algorithm(), length=length, salt=salt, iterations=iterations)
        kdf.derive_into(secret, out)
        return out
    out[:] = hashlib.pbkdf2_hmac(hashes.check_hash(hash_name), secret, salt, iterations, length)
    return out


def argon2_derive(params: Argon2, secret: Buffer, length: int) -> bytearray:
    """Argon2i or Argon2id of `secret` with a keyslot's parameters, `length` bytes."""
    cls = getattr(argon2, ARGON2_CLASSES[params.variant], None)
    if cls is None:
        raise LuksError(
            f"{params.variant} is not available in the installed cryptography package "
            "(it needs cryptography >= 44 built with OpenSSL >= 3.2)"
        )
    out = bytearray(length)
    try:
        kdf = cls(
            salt=params.salt,
            length=length,
            iterations=params.time,
            lanes=params.cpus,
            memory_cost=params.memory,
        )
        kdf.derive_into(secret, out)
    except UnsupportedAlgorithm:
        raise LuksError(f"{params.variant} is not supported by this OpenSSL") from None
    except ValueError as exc:
        raise LuksError(f"{params.variant} parameters refused: {exc}") from None
    return out


def derive(kdf: Kdf, secret: Buffer, length: int) -> bytearray:
    """The keyslot key a passphrase gives under `kdf`."""
    if isinstance(kdf, Pbkdf2):
        return pbkdf2(kdf.hash, secret, kdf.salt, kdf.iterations, length)
    return argon2_derive(kdf, secret, length)
