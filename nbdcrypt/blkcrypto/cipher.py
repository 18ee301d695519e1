"""The cipher work of blk-crypto: whole data units of one key, numbered by DUN.

The IV of a data unit is its DUN as a 16-byte little-endian number, as the kernel's blk-crypto
fallback makes it; for AES-128-CBC-ESSIV the IV is that number encrypted with SHA-256 of the
key (ESSIV). So AES-256-XTS at DUN n equals dm-crypt's aes-xts-plain64 at IV sector n, and
AES-128-CBC-ESSIV equals dm-crypt's aes-cbc-essiv:sha256. The inline engines and the software
fallback both use this class, which is why their ciphertext is identical. The batched ciphers
of nbdcrypt.crypto do whole requests in a few calls, not one per data unit.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

from nbdcrypt.blkcrypto.key import CryptoKey, CryptoMode
from nbdcrypt.crypto import libcrypto
from nbdcrypt.crypto.cbc import CbcCipher
from nbdcrypt.crypto.libcrypto import InPlace
from nbdcrypt.crypto.xts import XtsCipher

Buffer = bytes | bytearray | memoryview
ZERO_CHUNK = 1024 * 1024


class UnitCipher:
    """Encrypts and decrypts runs of whole data units of one key."""

    __slots__ = ("_impl", "key_id", "unit")

    def __init__(self, key: CryptoKey) -> None:
        self.key_id = key.key_id
        self.unit = key.data_unit_size
        raw = bytes(key.raw)
        if key.mode is CryptoMode.AES_256_XTS:
            self._impl: XtsCipher | CbcCipher = XtsCipher(raw, iv_bits=128)
        else:
            self._impl = CbcCipher(raw, essiv="sha256", iv_bits=128)

    def _check(self, data: Buffer) -> None:
        if len(data) % self.unit:
            raise OSError(
                errno.EINVAL, f"{len(data)} bytes is not a whole number of {self.unit}-byte units"
            )

    def encrypt(self, dun: int, data: Buffer) -> memoryview:
        self._check(data)
        return self._impl.encrypt(data, dun, self.unit)

    def decrypt(self, dun: int, data: Buffer) -> memoryview:
        self._check(data)
        return self._impl.decrypt(data, dun, self.unit)

    @staticmethod
    def encrypts_in_place(key: CryptoKey) -> bool:
        """Whether encrypt_in_place can prepare requests of `key` (AES-XTS, the C module)."""
        return key.mode is CryptoMode.AES_256_XTS and libcrypto.native()

    def encrypt_in_place(self, dun: int, length: int) -> InPlace | None:
        """Encryption of `length` bytes from data unit `dun` prepared whole, to run later over
        the payload's own buffer with no server lock held (XtsCipher.in_place); None for
        AES-CBC-ESSIV or where it takes more than one C call."""
        if length % self.unit or not isinstance(self._impl, XtsCipher):
            return None
        return self._impl.in_place(dun, self.unit, length)

    def zeroes(self, dun: int, length: int) -> Iterator[tuple[int, memoryview]]:
        """Encrypted zeroes for `length` bytes from data unit `dun`, in pieces of at most
        1 MiB: (byte offset in the range, ciphertext). WRITE_ZEROES under a key writes these:
        a hole would decrypt to garbage."""
        step = max(ZERO_CHUNK - ZERO_CHUNK % self.unit, self.unit)
        zero = bytes(min(step, length))
        for at in range(0, length, step):
            n = min(step, length - at)
            yield at, self.encrypt(dun + at // self.unit, memoryview(zero)[:n])

    def __repr__(self) -> str:
        return f"UnitCipher({self.key_id!r}, {self.unit})"
