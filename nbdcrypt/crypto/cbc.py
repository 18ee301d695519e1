"""AES-CBC per data unit with plain or ESSIV IVs, byte for byte what Linux writes.

Unit i of a request has the IV number v_i = first + i * step (modulo 2^iv_bits) as a 16-byte
little-endian block. With `essiv="sha256"` (dm-crypt `essiv:sha256`, blk-crypto
AES-128-CBC-ESSIV) the IV is AES_S(v_i) with S = SHA-256(key) as an AES-256 key, as the
kernel's essiv template does; otherwise (plain64, plain) the IV is v_i itself. Each unit is
one CBC chain from its IV: C_0 = AES_K(P_0 ^ IV), C_j = AES_K(P_j ^ C_{j-1}).

Decryption is one ECB pass over the request plus two XORs. Encryption is sequential inside a
unit, so the batched path runs block j of every unit at once (one ECB call per block position).
Large units, and few units, go one unit per libcrypto call pair instead (libcrypto.py), or
through one `cryptography` CBC context per unit where libcrypto is missing. With the built C
loop (libcrypto.native()) libcrypto takes requests of up to 256 units.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nbdcrypt.crypto import batch, libcrypto
from nbdcrypt.crypto.batch import BLOCK, SLACK_WORDS, U64, Buffer

CBC_KEY_SIZES = (16, 24, 32)
ENGINE_MIN_BLOCKS = 128  # encryption of units of 2 KiB and more: always libcrypto per unit
ENGINE_MAX_UNITS = 96  # encryption of smaller units: libcrypto up to this many units
ENGINE_MAX_DECRYPT_UNITS = 2  # decryption is cheap batched: libcrypto only for tiny requests
# With the C loop (libcrypto.native()) a unit costs ~0.1 us, but one CBC chain is serial in AES:
# the batched path's ECB calls across units still win on many units.
NATIVE_MAX_UNITS = 256
NATIVE_MAX_DECRYPT_UNITS = 256
ESSIV_HASHES = ("sha256",)


class CbcCipher:
    """AES-CBC with a fixed key; encrypt/decrypt whole requests of equal-sized data units."""

    __slots__ = ("_aes", "_ecb", "_engine", "_essiv", "essiv", "iv_bits", "key_bits")

    def __init__(self, key: bytes, *, essiv: str | None = None, iv_bits: int = 64) -> None:
        if len(key) not in CBC_KEY_SIZES:
            raise ValueError(f"an AES-CBC key is 16, 24 or 32 bytes, not {len(key)}")
        if iv_bits not in (32, 64, 128):
            raise ValueError(f"iv_bits must be 32, 64 or 128, not {iv_bits}")
        if essiv is not None and essiv not in ESSIV_HASHES:
            raise ValueError(f"ESSIV hash {essiv!r} is not supported (only sha256)")
        self._aes = algorithms.AES(key)
        self._ecb = batch.Ecb(key)
        self._engine = libcrypto.UnitEngine("cbc", key) if libcrypto.available() else None
        salt = hashlib.sha256(key).digest() if essiv else None
        self._essiv = batch.Ecb(salt) if salt is not None else None
        self.essiv = essiv
        self.iv_bits = iv_bits
        self.key_bits = len(key) * 8

    def __repr__(self) -> str:
        ivs = f"essiv:{self.essiv}" if self.essiv else f"plain, iv_bits={self.iv_bits}"
        return f"CbcCipher(AES-{self.key_bits}-CBC, {ivs})"

    def encrypt(
        self,
        data: Buffer,
        first: int,
        unit_size: int,
        *,
        step: int = 1,
        out: bytearray | memoryview | None = None,
    ) -> memoryview:
        """Encrypt whole units; unit i uses IV number first + i * step. Returns the ciphertext."""
        target, pieces = self._pieces(data, first, unit_size, step, out)
        for piece, out_piece, ivs, count in pieces:
            path = self._encrypt_path(count, unit_size // BLOCK)
            if path == "engine":
                assert self._engine is not None
                self._engine.run(piece, ivs, unit_size, out_piece, encrypt=True)
            elif path == "cryptography":
                self._encrypt_per_unit(piece, unit_size, ivs, out_piece)
            else:
                self._encrypt_batched(piece, unit_size, ivs, out_piece)
        return target

    def decrypt(
        self,
        data: Buffer,
        first: int,
        unit_size: int,
        *,
        step: int = 1,
        out: bytearray | memoryview | None = None,
    ) -> memoryview:
        """Decrypt whole units; unit i uses IV number first + i * step. Returns the plaintext."""
        target, pieces = self._pieces(data, first, unit_size, step, out)
        for piece, out_piece, ivs, count in pieces:
            if self._decrypt_path(count) == "engine":
                assert self._engine is not None
                self._engine.run(piece, ivs, unit_size, out_piece, encrypt=False)
            else:
                self._decrypt_batched(piece, unit_size, ivs, out_piece)
        return target

    def _pieces(
        self,
        data: Buffer,
        first: int,
        unit_size: int,
        step: int,
        out: bytearray | memoryview | None,
    ) -> tuple[memoryview, Iterator[tuple[memoryview, memoryview, U64, int]]]:
        """The output buffer, and the request cut into chunks: (input, output, IVs, units).

        The chunks come one at a time because the IVs live in a reused scratch buffer.
        """
        length = batch.check_sizes(data, unit_size, out)
        target = batch.output(out, length)
        source = memoryview(data)
        per_chunk = batch.chunk_units(unit_size)
        units = length // unit_size

        def chunks() -> Iterator[tuple[memoryview, memoryview, U64, int]]:
            for start in range(0, units, per_chunk):
                count = min(per_chunk, units - start)
                lo, hi = start * unit_size, (start + count) * unit_size
                ivs = self._ivs(first + start * step, count, step)
                yield source[lo:hi], target[lo:hi], ivs, count

        return target, chunks()

    def _encrypt_path(self, units: int, blocks: int) -> str:
        """engine | cryptography | batched: the fastest way to encrypt this shape."""
        engine = self._engine
        if engine is not None:
            most = NATIVE_MAX_UNITS if engine.native else ENGINE_MAX_UNITS
            if blocks >= ENGINE_MIN_BLOCKS or units <= most:
                return "engine"
        if engine is None and units < blocks:
            return "cryptography"
        return "batched"

    def _decrypt_path(self, units: int) -> str:
        """engine | batched (batched decryption is one ECB pass: libcrypto only for tiny ones)."""
        engine = self._engine
        if engine is not None:
            most = NATIVE_MAX_DECRYPT_UNITS if engine.native else ENGINE_MAX_DECRYPT_UNITS
            if units <= most:
                return "engine"
        return "batched"

    def _ivs(self, first: int, units: int, step: int) -> U64:
        """(units, 2) IV blocks, ESSIV-encrypted if configured."""
        ivs = batch.scratch("cbc.iv", 2 * units + SLACK_WORDS)
        batch.iv_blocks(first, units, step, self.iv_bits, ivs[: 2 * units].reshape(units, 2))
        if self._essiv is not None:
            self._essiv.encrypt_in_place(ivs, units * BLOCK)
        return ivs[: 2 * units].reshape(units, 2)

    def _encrypt_per_unit(
        self, data: memoryview, unit_size: int, ivs: U64, target: memoryview
    ) -> None:
        scratch = bytearray(unit_size + BLOCK)
        iv_bytes = ivs.tobytes()
        for i in range(len(ivs)):
            iv = iv_bytes[i * BLOCK : (i + 1) * BLOCK]
            ctx = Cipher(self._aes, modes.CBC(iv)).encryptor()
            at = i * unit_size
            ctx.update_into(data[at : at + unit_size], scratch)
            target[at : at + unit_size] = memoryview(scratch)[:unit_size]

    def _encrypt_batched(
        self, data: memoryview, unit_size: int, ivs: U64, target: memoryview
    ) -> None:
        """Block j of every unit in one ECB call, j = 0 .. blocks - 1."""
        nbytes = len(data)
        units, blocks = nbytes // unit_size, unit_size // BLOCK
        plain = batch.as_words(data, nbytes).reshape(units, blocks, 2)
        cipher = batch.as_words(target, nbytes).reshape(units, blocks, 2)
        cipher_blocks = cipher.view(np.complex128).reshape(units, blocks)
        work = batch.scratch("cbc.work", 2 * units + SLACK_WORDS)
        column = work[: 2 * units].reshape(units, 2)
        previous = ivs
        for j in range(blocks):
            np.bitwise_xor(plain[:, j, 0], previous[:, 0], out=column[:, 0])
            np.bitwise_xor(plain[:, j, 1], previous[:, 1], out=column[:, 1])
            self._ecb.encrypt_in_place(work, units * BLOCK)
            cipher_blocks[:, j] = column.view(np.complex128).reshape(units)
            previous = column

    def _decrypt_batched(
        self, data: memoryview, unit_size: int, ivs: U64, target: memoryview
    ) -> None:
        """P_j = D(C_j) ^ C_{j-1}: one ECB pass, one XOR with the ciphertext one block back."""
        nbytes = len(data)
        units, blocks = nbytes // unit_size, unit_size // BLOCK
        words = nbytes // 8
        cipher = batch.as_words(data, nbytes)
        work = batch.scratch("cbc.work", words + SLACK_WORDS)
        np.copyto(work[:words], cipher)
        self._ecb.decrypt_in_place(work, nbytes)
        plain = batch.as_words(target, nbytes)
        np.bitwise_xor(work[2:words], cipher[: words - 2], out=plain[2:])
        firsts = plain.reshape(units, blocks, 2)[:, 0]
        decrypted = work[:words].reshape(units, blocks, 2)[:, 0]
        np.bitwise_xor(decrypted[:, 0], ivs[:, 0], out=firsts[:, 0])
        np.bitwise_xor(decrypted[:, 1], ivs[:, 1], out=firsts[:, 1])
