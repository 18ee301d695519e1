"""Crypto modes and keys: what a crypt context names (include/linux/blk-crypto.h).

A key is raw bytes plus the mode, data unit size and DUN width it is used with. Key bytes are
held in a bytearray so they can be wiped, and never appear in a repr, an error or a log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class CryptoMode(Enum):
    """The modes blk-crypto defines that nbdcrypt implements (value: the name used in configs)."""

    AES_256_XTS = "aes-256-xts"
    AES_128_CBC_ESSIV = "aes-128-cbc-essiv"

    @property
    def key_size(self) -> int:
        return _KEY_SIZES[self]

    @property
    def iv_size(self) -> int:
        return 16


_KEY_SIZES = {CryptoMode.AES_256_XTS: 64, CryptoMode.AES_128_CBC_ESSIV: 16}

UNSUPPORTED_MODES = {
    "adiantum": "Adiantum is not implemented (XChaCha12 + Poly1305 + AES in a wide-block mode)",
    "sm4-xts": "SM4-XTS is not implemented (OpenSSL's SM4 is not reachable through cryptography)",
}

DATA_UNIT_SIZES = (512, 1024, 2048, 4096)  # what the kernel's inline-crypto hardware offers


class CryptoKeyError(ValueError):
    """A key's description is wrong (mode, size, data unit size, DUN bytes)."""


def parse_mode(name: str) -> CryptoMode:
    try:
        return CryptoMode(name)
    except ValueError:
        pass
    if name in UNSUPPORTED_MODES:
        raise CryptoKeyError(f"mode {name!r} is not supported: {UNSUPPORTED_MODES[name]}")
    known = ", ".join(m.value for m in CryptoMode)
    raise CryptoKeyError(f"unknown mode {name!r} (supported: {known})")


@dataclass(eq=False, slots=True)
class CryptoKey:
    """A blk-crypto key. Identity is the object (two keys with equal bytes are two keys)."""

    key_id: str  # the keyring's name for it: safe to log
    mode: CryptoMode
    data_unit_size: int
    dun_bytes: int
    raw: bytearray = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.raw) != self.mode.key_size:
            raise CryptoKeyError(
                f"key {self.key_id}: {self.mode.value} takes a {self.mode.key_size}-byte key, "
                f"got {len(self.raw)} bytes"
            )
        if self.data_unit_size not in DATA_UNIT_SIZES:
            raise CryptoKeyError(
                f"key {self.key_id}: data unit size {self.data_unit_size} is not one of "
                f"{', '.join(map(str, DATA_UNIT_SIZES))}"
            )
        if not 1 <= self.dun_bytes <= 8:
            raise CryptoKeyError(f"key {self.key_id}: dun_bytes must be 1..8, got {self.dun_bytes}")

    def wipe(self) -> None:
        """Overwrite the key bytes (best effort: copies made by libraries are out of reach)."""
        self.raw[:] = bytes(len(self.raw))

    def __repr__(self) -> str:
        return (
            f"CryptoKey({self.key_id!r}, {self.mode.value}, dus={self.data_unit_size}, "
            f"dun_bytes={self.dun_bytes})"
        )


@dataclass(frozen=True, slots=True)
class CryptContext:
    """What travels with a request: the key and the data unit number of its first byte."""

    key: CryptoKey
    dun: int

    def advanced(self, nbytes: int) -> CryptContext:
        """The context of the request part that starts `nbytes` further on."""
        return CryptContext(self.key, self.dun + nbytes // self.key.data_unit_size)
