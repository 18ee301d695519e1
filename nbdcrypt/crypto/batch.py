"""What the batched ciphers share: IV blocks for many units, reusable ECB contexts, scratch.

`cryptography` costs ~4 us to set up a cipher object and little per byte, so the ciphers here
set up ECB contexts once per key and thread and push whole requests through them. ECB keeps no
state between calls on whole blocks, so one context serves every request of its thread; a
context is never shared between threads (cryptography releases the GIL inside update_into).
Scratch arrays are kept per thread as well: fresh large arrays cost page faults on every call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

try:
    from nbdcrypt.crypto._units import ivs as _c_ivs
except ImportError:  # installed without a compiler
    _c_ivs = None  # type: ignore[assignment]

U64 = npt.NDArray[np.uint64]
Buffer = bytes | bytearray | memoryview

BLOCK = 16
SLACK_WORDS = 2  # update_into wants room for one more block than it writes
CHUNK_BYTES = 1 << 20  # batched work is done in pieces of at most this much data
SMALL_IV_COUNT = 32  # up to this many IV blocks, Python ints beat numpy's per-call cost
_M64 = (1 << 64) - 1


class _Scratch(threading.local):
    arrays: dict[str, U64]

    def __init__(self) -> None:
        self.arrays = {}


_scratch = _Scratch()


def scratch(name: str, words: int) -> U64:
    """A flat uint64 array of at least `words` words, kept for this thread (contents undefined)."""
    arrays = _scratch.arrays
    array = arrays.get(name)
    if array is None or array.size < words:
        array = arrays[name] = np.empty(max(words, 1024), np.uint64)
    return array


class Ecb:
    """One AES key in ECB mode, with an encryptor and a decryptor per thread."""

    __slots__ = ("_algorithm", "_local")

    def __init__(self, key: bytes) -> None:
        self._algorithm = algorithms.AES(key)
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"Ecb(<AES-{len(self._algorithm.key) * 8} key>)"

    def _context(self, encrypt: bool) -> CipherContext:
        name = "enc" if encrypt else "dec"
        ctx: CipherContext | None = getattr(self._local, name, None)
        if ctx is None:
            cipher = Cipher(self._algorithm, modes.ECB())
            ctx = cipher.encryptor() if encrypt else cipher.decryptor()
            setattr(self._local, name, ctx)
        return ctx

    def encrypt_in_place(self, words: U64, nbytes: int) -> None:
        """Encrypt the first nbytes of `words` in place."""
        self._in_place(True, words, nbytes)

    def decrypt_in_place(self, words: U64, nbytes: int) -> None:
        self._in_place(False, words, nbytes)

    def _in_place(self, encrypt: bool, words: U64, nbytes: int) -> None:
        """Through this thread's scratch and back: cryptography 51 refuses an update_into
        whose output overlaps its input, as a truly in-place call would."""
        out = scratch("ecb.out", nbytes // 8 + SLACK_WORDS)
        view, out_view = words.view(np.uint8).data, out.view(np.uint8).data
        self._context(encrypt).update_into(view[:nbytes], out_view)
        view[:nbytes] = out_view[:nbytes]

    def apply(self, encrypt: bool) -> Callable[[U64, int], None]:
        return self.encrypt_in_place if encrypt else self.decrypt_in_place


def iv_numbers(first: int, count: int, step: int, iv_bits: int) -> list[int]:
    """The IV numbers of `count` units as Python ints (first + i * step, modulo 2^iv_bits)."""
    mask = (1 << iv_bits) - 1
    return [(first + i * step) & mask for i in range(count)]


def ivs_for(first: int, count: int, step: int, iv_bits: int, name: str) -> bytes | U64:
    """IV blocks as bytes (from the C module, or for few units), else in a (count, 2) scratch
    array called `name`."""
    if _c_ivs is not None:
        first &= (1 << iv_bits) - 1
        return _c_ivs(first & _M64, first >> 64, step, iv_bits, count)
    if count <= SMALL_IV_COUNT:
        return iv_bytes(first, count, step, iv_bits)
    ivs = scratch(name, 2 * count)[: 2 * count].reshape(count, 2)
    iv_blocks(first, count, step, iv_bits, ivs)
    return ivs


def iv_bytes(first: int, count: int, step: int, iv_bits: int) -> bytes:
    """The 16-byte little-endian IV blocks (first + i * step) mod 2^iv_bits, as bytes."""
    mask = (1 << iv_bits) - 1
    numbers = ((first + i * step) & mask for i in range(count))
    return b"".join(v.to_bytes(BLOCK, "little") for v in numbers)


def iv_blocks(first: int, count: int, step: int, iv_bits: int, out: U64) -> None:
    """out (count, 2): the 16-byte little-endian IV blocks (first + i * step) mod 2^iv_bits."""
    mask = (1 << iv_bits) - 1
    if count <= SMALL_IV_COUNT:
        blocks = iv_bytes(first, count, step, iv_bits)
        out[...] = np.frombuffer(blocks, np.uint64).reshape(count, 2)
        return
    first &= mask
    lo = out[:, 0]
    np.multiply(np.arange(count, dtype=np.uint64), np.uint64(step), out=lo)
    np.add(lo, np.uint64(first & _M64), out=lo)  # wraps modulo 2^64
    if iv_bits <= 64:
        if iv_bits < 64:
            np.bitwise_and(lo, np.uint64(mask), out=lo)
        out[:, 1] = 0
        return
    hi = out[:, 1]
    np.less(lo, np.uint64(first & _M64), out=hi, casting="unsafe")  # the carry out of lo
    np.add(hi, np.uint64((first >> 64) & _M64), out=hi)
    if iv_bits < 128:
        np.bitwise_and(hi, np.uint64(mask >> 64), out=hi)


def as_words(data: Buffer, nbytes: int) -> U64:
    """The first nbytes of a buffer as uint64 words (read-only for bytes)."""
    return np.frombuffer(data, dtype=np.uint64, count=nbytes // 8)


def check_sizes(data: Buffer, unit_size: int, out: bytearray | memoryview | None) -> int:
    """Validate a request: whole units of whole 16-byte blocks; returns its length."""
    if unit_size < BLOCK or unit_size % BLOCK:
        raise ValueError(f"data unit size {unit_size} is not a positive multiple of {BLOCK}")
    length = memoryview(data).nbytes
    if length % unit_size:
        raise ValueError(f"{length} bytes is not a whole number of {unit_size}-byte units")
    if out is not None and memoryview(out).nbytes < length:
        raise ValueError(f"output buffer of {memoryview(out).nbytes} bytes < {length}")
    return length


def output(out: bytearray | memoryview | None, length: int) -> memoryview:
    """The caller's output buffer, or a new one with a block of slack, cut to `length`."""
    if out is None:  # uninitialised: every byte is written before it is returned
        return np.empty(length + BLOCK, np.uint8).data[:length]
    return memoryview(out)[:length]


def chunk_units(unit_size: int) -> int:
    """How many units one batched piece holds."""
    return max(1, CHUNK_BYTES // unit_size)
