"""Self-describing write data: every 8-byte word says which run, client and operation wrote it,
and for which offset.

A word is big-endian: the run's tag (8 bits, never 0), the client number (12 bits), the
operation's sequence number (20 bits) and the word's own export offset / 8 (24 bits), all taken
modulo their width. Data is a pure function of those, so the model never has to keep a copy of
what a shared cell was written with, and a mismatch report can say whose data was found instead:
another client's, a stale write of the same client, data meant for another offset, or zeroes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import numpy.typing as npt

WORD = 8
_POS_BITS = 24
_POS_MASK = (1 << _POS_BITS) - 1
_SEQ_MASK = (1 << 20) - 1
_CLIENT_MASK = (1 << 12) - 1
_BE64 = np.dtype(">u8")


def run_tag(seed: int) -> int:
    """The run's tag byte, 1..255, derived from the seed (same seed, same data)."""
    digest = hashlib.sha256(str(seed).encode()).digest()
    return 1 + digest[0] % 255


def _high(run: int, client: int, seq: int) -> int:
    return (run & 0xFF) << 56 | (client & _CLIENT_MASK) << 44 | (seq & _SEQ_MASK) << 24


def pattern(run: int, client: int, seq: int, offset: int, length: int) -> bytes:
    """The data client `client` writes with its operation `seq` at `offset`."""
    first = offset // WORD
    last = (offset + length + WORD - 1) // WORD
    words = np.arange(first, last, dtype=np.uint64)
    words &= np.uint64(_POS_MASK)
    words |= np.uint64(_high(run, client, seq))
    raw = words.astype(_BE64).tobytes()
    skip = offset % WORD
    return raw[skip : skip + length]


def pattern_array(
    run: int, client: int, seq: int, offset: int, length: int
) -> npt.NDArray[np.uint8]:
    """pattern() as a uint8 array, for comparisons."""
    return np.frombuffer(pattern(run, client, seq, offset, length), dtype=np.uint8)


def describe(
    run: int, data: bytes | bytearray | memoryview, offset: int, at: int, clients: int = 4096
) -> str:
    """Whose data the 8-byte word holding export offset `at` looks like, in `data` read from
    `offset` by a run of `clients` clients: 'zeroes', 'bytes of 0xee', 'client 3 op #57', ...,
    or '' when the word is not all there and the bytes there say nothing."""
    start = at - at % WORD
    rel = start - offset
    whole = rel >= 0 and rel + WORD <= len(data)
    raw = bytes(data[rel : rel + WORD] if whole else data[at - offset : at - offset + WORD])
    if raw and raw == raw[:1] * len(raw):
        return "zeroes" if raw[0] == 0 else f"bytes of {raw[0]:#04x}"
    if not whole:
        return ""
    word = int.from_bytes(raw, "big")
    client = word >> 44 & _CLIENT_MASK
    if word >> 56 != run or client >= clients:
        return "not data of this run"
    seq = word >> 24 & _SEQ_MASK
    who = f"client {client} op #{seq}"
    pos = word & _POS_MASK
    if pos != start // WORD & _POS_MASK:
        return f"{who}, meant for offset {pos * WORD:#x} (mod {WORD << _POS_BITS:#x})"
    return who
