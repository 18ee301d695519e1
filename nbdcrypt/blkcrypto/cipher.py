"""The cipher work of blk-crypto: whole data units of one key, numbered by DUN.

The IV of a data unit is its DUN as a 16-byte little-endian number, as the kernel's blk-crypto
fallback makes it; for AES-128-CBC-ESSIV the IV is that number encrypted with SHA-256 of the
key (ESSIV). So AES-256-XTS at DUN n equals dm-crypt's aes-xts-plain64 at IV sector n, and
AES-128-CBC-ESSIV equals dm-crypt's aes-cbc-essiv:sha256. The inline engines and the software
fallback both use this class, which is why their ciphertext is identical.
"""

from __future__ import annotations

import errno

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nbdcrypt.blkcrypto.key import CryptoKey, CryptoMode

Buffer = bytes | bytearray | memoryview


class UnitCipher:
    """Encrypts and decrypts runs of whole data units of one key."""

    def __init__(self, key: CryptoKey) -> None:
        self.key_id = key.key_id
        self.unit = key.data_unit_size
        self._xts = key.mode is CryptoMode.AES_256_XTS
        raw = bytes(key.raw)
        self._aes = algorithms.AES(raw)
        self._essiv = None
        if not self._xts:
            digest = hashes.Hash(hashes.SHA256())
            digest.update(raw)
            self._essiv = Cipher(algorithms.AES(digest.finalize()), modes.ECB()).encryptor()

    def _iv(self, dun: int) -> bytes:
        iv = dun.to_bytes(16, "little")
        return iv if self._essiv is None else self._essiv.update(iv)

    def _run(self, dun: int, data: Buffer, encrypt: bool) -> bytearray:
        unit = self.unit
        if len(data) % unit:
            raise OSError(
                errno.EINVAL, f"{len(data)} bytes is not a whole number of {unit}-byte data units"
            )
        view = memoryview(data)
        out = bytearray(len(data) + 15)  # update_into wants a block of slack
        outview = memoryview(out)
        for i, at in enumerate(range(0, len(data), unit)):
            mode = modes.XTS(self._iv(dun + i)) if self._xts else modes.CBC(self._iv(dun + i))
            cipher = Cipher(self._aes, mode)
            ctx = cipher.encryptor() if encrypt else cipher.decryptor()
            ctx.update_into(view[at : at + unit], outview[at : at + unit + 15])
        del outview
        del out[len(data) :]
        return out

    def encrypt(self, dun: int, data: Buffer) -> bytearray:
        return self._run(dun, data, True)

    def decrypt(self, dun: int, data: Buffer) -> bytearray:
        return self._run(dun, data, False)
