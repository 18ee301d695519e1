"""AES-XTS (IEEE 1619) over many data units at once, byte for byte what Linux's xts(aes) writes.

Data unit i of a request has the IV number v_i = first + i * step (modulo 2^iv_bits), as the
16-byte little-endian block the kernel passes as the XTS IV (dm-crypt plain64: the sector
number, 64 bits; plain: its low 32 bits; blk-crypto: the DUN). The key is two AES keys of the
same size, K1 | K2 (AES-128-XTS: 32 bytes, AES-256-XTS: 64). Block j of unit i is

    C = AES_K1(P ^ T) ^ T   with   T = AES_K2(v_i) * x^j   in GF(2^128)

No ciphertext stealing: units are whole numbers of 16-byte blocks.

Four ways to run a request, picked by its shape (thresholds measured with
benchmarks/crypto_bench.py):
- native (libcrypto.XtsEngine, when the C module _units.c is built): the batched method below
  in C, two ECB contexts and no call per unit, the GIL released: ~3 GB/s, units under 2 KiB.
- libcrypto per unit (libcrypto.py): one keyed OpenSSL context, the IV reset per unit, about
  1-2 us a unit from Python, ~0.1 us in the C loop (4 GB/s with 4 KiB units); the fastest for
  units of 2 KiB and more, and (without the C module) for few small units.
- batched: one ECB pass over the IV blocks gives every unit's T, numpy makes the tweak chains
  (gf128.py), one ECB pass with K1 does every block of the request; the fastest for many
  small units (~60 numpy calls of fixed cost, then ~1 GB/s).
- `cryptography` per unit (~5 us a unit), only when libcrypto is missing.
Unlike OpenSSL, the kernel accepts K1 == K2 (outside FIPS mode): such keys take the native or
the batched path, which do not care.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nbdcrypt.crypto import batch, gf128, libcrypto
from nbdcrypt.crypto.batch import BLOCK, SLACK_WORDS, Buffer

XTS_KEY_SIZES = (32, 64)


ENGINE_MIN_BLOCKS = 128  # units of 2 KiB and more always go to libcrypto
ENGINE_MAX_UNITS = 24  # smaller units: libcrypto for requests of up to this many
CRYPTOGRAPHY_MAX_UNITS = 3  # without libcrypto: cryptography per unit below the batched cost
SMALL_UNITS = 32  # up to this many units, byte tables make the tweak chains (when they exist)


class _Job(NamedTuple):
    """A piece of a request: its data, the IV number of its first unit, how they advance."""

    data: memoryview
    first: int
    unit_size: int
    step: int
    encrypt: bool


def _native(key: bytes) -> libcrypto.XtsEngine | None:
    if not libcrypto.native():
        return None
    try:
        return libcrypto.XtsEngine(key)
    except ValueError:
        return None


def _engine(key: bytes) -> libcrypto.UnitEngine | None:
    try:
        return libcrypto.UnitEngine("xts", key)
    except ValueError:
        return None


class XtsCipher:
    """AES-XTS with a fixed key; encrypt/decrypt whole requests of equal-sized data units."""

    __slots__ = ("_data", "_engine", "_native", "_tweak", "_xts", "iv_bits", "key_bits")

    def __init__(self, key: bytes, *, iv_bits: int = 128) -> None:
        if len(key) not in XTS_KEY_SIZES:
            raise ValueError(f"an AES-XTS key is 32 or 64 bytes, not {len(key)}")
        if iv_bits not in (32, 64, 128):
            raise ValueError(f"iv_bits must be 32, 64 or 128, not {iv_bits}")
        half = len(key) // 2
        self._data = batch.Ecb(key[:half])
        self._tweak = batch.Ecb(key[half:])
        # OpenSSL refuses K1 == K2 for encryption; the batched path does not care.
        self._xts = algorithms.AES(key) if key[:half] != key[half:] else None
        self._engine = _engine(key) if self._xts is not None else None
        self._native = _native(key)
        self.iv_bits = iv_bits
        self.key_bits = half * 8

    def __repr__(self) -> str:
        return f"XtsCipher(AES-{self.key_bits}-XTS, iv_bits={self.iv_bits})"

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
        return self._run(data, first, unit_size, step, out, encrypt=True)

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
        return self._run(data, first, unit_size, step, out, encrypt=False)

    def _run(
        self,
        data: Buffer,
        first: int,
        unit_size: int,
        step: int,
        out: bytearray | memoryview | None,
        *,
        encrypt: bool,
    ) -> memoryview:
        length = batch.check_sizes(data, unit_size, out)
        target = batch.output(out, length)
        units = length // unit_size
        path = self._path(units, unit_size // BLOCK)
        if path == "native":
            assert self._native is not None
            ivs = batch.ivs_for(first, units, step, self.iv_bits, "xts.native")
            self._native.run(data, ivs, unit_size, target, encrypt=encrypt)
        elif path == "engine":
            assert self._engine is not None
            ivs = batch.ivs_for(first, units, step, self.iv_bits, "xts.engine")
            self._engine.run(data, ivs, unit_size, target, encrypt=encrypt)
        elif path == "cryptography":
            job = _Job(memoryview(data), first, unit_size, step, encrypt)
            self._per_unit(job, target)
        else:
            source = memoryview(data)
            per_chunk = batch.chunk_units(unit_size)
            for start in range(0, units, per_chunk):
                lo, hi = start * unit_size, min(units, start + per_chunk) * unit_size
                job = _Job(source[lo:hi], first + start * step, unit_size, step, encrypt)
                self._batched(job, target[lo:hi], table=path == "table")
        return target

    def in_place(
        self, first: int, unit_size: int, length: int, *, step: int = 1, encrypt: bool = True
    ) -> libcrypto.InPlace | None:
        """A request of `length` bytes from IV number `first` (unit i: first + i * step)
        prepared whole, to run later in place over its buffer with no server lock held (a
        connection thread that lands a write payload itself); None where it takes no single
        C call (then encrypt() must do it)."""
        if unit_size < BLOCK or unit_size % BLOCK or length % unit_size:
            return None
        units = length // unit_size
        path = self._path(units, unit_size // BLOCK)
        if path not in ("native", "engine"):
            return None
        ivs = batch.ivs_for(first, units, step, self.iv_bits, "xts.in_place")
        if not isinstance(ivs, bytes):  # built without the C module: no C loop either
            return None
        if path == "native":
            assert self._native is not None
            return self._native.in_place(ivs, unit_size, encrypt=encrypt)
        assert self._engine is not None
        return self._engine.in_place(ivs, unit_size, encrypt=encrypt)

    def _path(self, units: int, blocks: int) -> str:
        """native | engine | cryptography | table | chain: the fastest way for this shape."""
        engine = self._engine
        if engine is not None and blocks >= ENGINE_MIN_BLOCKS:
            return "engine"  # OpenSSL's XTS per unit: its tweak chain beats ours on big units
        if self._native is not None:
            return "native"
        if engine is not None and units <= ENGINE_MAX_UNITS:
            return "engine"
        if self._engine is None and self._xts is not None and units <= CRYPTOGRAPHY_MAX_UNITS:
            return "cryptography"
        if units <= SMALL_UNITS and blocks <= gf128.TABLE_MAX_BLOCKS:
            return "table"
        return "chain"

    def _per_unit(self, job: _Job, target: memoryview) -> None:
        """One cryptography XTS context per unit (when libcrypto is missing)."""
        assert self._xts is not None
        unit = job.unit_size
        scratch = bytearray(unit + BLOCK)
        numbers = batch.iv_numbers(job.first, len(job.data) // unit, job.step, self.iv_bits)
        for i, number in enumerate(numbers):
            cipher = Cipher(self._xts, modes.XTS(number.to_bytes(BLOCK, "little")))
            ctx = cipher.encryptor() if job.encrypt else cipher.decryptor()
            at = i * unit
            ctx.update_into(job.data[at : at + unit], scratch)
            target[at : at + unit] = memoryview(scratch)[:unit]

    def _batched(self, job: _Job, target: memoryview, *, table: bool) -> None:
        """ECB over the IVs, the tweak chains (byte tables or gf128.tweak_chain), ECB over all."""
        nbytes = len(job.data)
        units, blocks = nbytes // job.unit_size, job.unit_size // BLOCK
        words = nbytes // 8
        ivs = batch.scratch("xts.iv", 2 * units + SLACK_WORDS)
        first_tweaks = ivs[: 2 * units].reshape(units, 2)
        batch.iv_blocks(job.first, units, job.step, self.iv_bits, first_tweaks)
        self._tweak.encrypt_in_place(ivs, units * BLOCK)
        tweaks = batch.scratch("xts.tweaks", words)[:words]
        if table:
            gf128.tweak_chain_small(first_tweaks, blocks, tweaks.reshape(units, blocks, 2))
        else:
            scratch = batch.scratch("xts.chain", gf128.scratch_words(units, blocks))
            gf128.tweak_chain(first_tweaks, blocks, tweaks.reshape(units, blocks, 2), scratch)
        work = batch.scratch("xts.work", words + SLACK_WORDS)
        np.bitwise_xor(batch.as_words(job.data, nbytes), tweaks, out=work[:words])
        self._data.apply(job.encrypt)(work, nbytes)
        np.bitwise_xor(work[:words], tweaks, out=batch.as_words(target, nbytes))
