"""XTS tweak chains in GF(2^128), vectorised with numpy.

A block is two little-endian uint64 words (lo, hi): the 16 bytes of an XTS tweak read as a
128-bit little-endian integer, as IEEE 1619 and the kernel's xts template do. Multiplying by x
is a left shift by one bit, folding bit 128 back as 0x87 (x^128 = x^7 + x^2 + x + 1).

`tweak_chain` computes T_i * x^j for every unit i and block j < m. It works on planes of shape
(m, n) (block-major, lo and hi apart) so that every numpy call runs over one long contiguous
range, and computes whole groups of columns per call: columns 1..7 from column 0, then columns
8a+b from columns b (shifts of 8..56 bits), then 64 columns at a time by x^64. That is about 24
numpy calls for 32 blocks a unit and 60 for 256, whatever the number of units; one
transposition at the end puts the blocks in the order of the data.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]

if sys.byteorder != "little":  # the uint64 views of tweak bytes below assume it
    raise ImportError("nbdcrypt.crypto needs a little-endian machine")

TABLE_MAX_BLOCKS = 64  # byte tables for units of up to 1 KiB (4 MiB of table at most)
_tables: dict[int, U64] = {}
_tables_lock = threading.Lock()

_ONE = np.uint64(1)
_FIVE = np.uint64(5)
_SIXTY_FOUR = np.uint64(64)


def scratch_words(n: int, m: int) -> int:
    """uint64 words of scratch `tweak_chain` needs for n units of m blocks."""
    return 5 * n * m + 8 * n


def _fold_into(dst_lo: U64, o: U64) -> None:
    """dst_lo ^= o * (x^7 + x^2 + x + 1) mod 2^64 (o is clobbered)."""
    np.bitwise_xor(dst_lo, o, out=dst_lo)
    np.left_shift(o, _ONE, out=o)
    np.bitwise_xor(dst_lo, o, out=dst_lo)
    np.left_shift(o, _ONE, out=o)
    np.bitwise_xor(dst_lo, o, out=dst_lo)
    np.left_shift(o, _FIVE, out=o)
    np.bitwise_xor(dst_lo, o, out=dst_lo)


def _mul_shift(
    src: tuple[U64, U64], dst: tuple[U64, U64], shift: U64 | np.uint64, tmp: U64
) -> None:
    """dst = src * x^shift for shifts in 1..56 (arrays broadcast against dst)."""
    slo, shi = src
    dlo, dhi = dst
    back = _SIXTY_FOUR - shift
    np.right_shift(slo, back, out=tmp)
    np.left_shift(shi, shift, out=dhi)
    np.bitwise_or(dhi, tmp, out=dhi)
    np.left_shift(slo, shift, out=dlo)
    np.right_shift(shi, back, out=tmp)
    _fold_into(dlo, tmp)


def _mul_x64(src: tuple[U64, U64], dst: tuple[U64, U64], tmp: U64) -> None:
    """dst = src * x^64: hi * (x^7 + x^2 + x + 1) lands in both words."""
    slo, shi = src
    dlo, dhi = dst
    np.right_shift(shi, np.uint64(63), out=dhi)
    np.bitwise_xor(dhi, slo, out=dhi)
    np.right_shift(shi, np.uint64(62), out=tmp)
    np.bitwise_xor(dhi, tmp, out=dhi)
    np.right_shift(shi, np.uint64(57), out=tmp)
    np.bitwise_xor(dhi, tmp, out=dhi)
    np.copyto(dlo, shi)
    np.left_shift(shi, _ONE, out=tmp)
    np.bitwise_xor(dlo, tmp, out=dlo)
    np.left_shift(tmp, _ONE, out=tmp)
    np.bitwise_xor(dlo, tmp, out=dlo)
    np.left_shift(tmp, _FIVE, out=tmp)
    np.bitwise_xor(dlo, tmp, out=dlo)


def _fill_planes(lo: U64, hi: U64, tmp: U64) -> None:
    """Given row 0 of the (m, n) planes, fill row j with row 0 * x^j (tmp: >= m*n words)."""
    m, n = lo.shape
    first = min(m, 8)
    if first > 1:
        shifts = np.arange(1, first, dtype=np.uint64).reshape(-1, 1)
        t = tmp[: (first - 1) * n].reshape(first - 1, n)
        _mul_shift((lo[0:1], hi[0:1]), (lo[1:first], hi[1:first]), shifts, t)
    top = min(m, 64)
    groups = top // 8  # rows 8a + b = rows b * x^(8a), b < 8, for whole groups of 8
    if groups > 1:
        group_shifts = (np.arange(1, groups, dtype=np.uint64) * np.uint64(8)).reshape(-1, 1, 1)
        dst_lo = lo[8 : 8 * groups].reshape(groups - 1, 8, n)
        dst_hi = hi[8 : 8 * groups].reshape(groups - 1, 8, n)
        t3 = tmp[: (groups - 1) * 8 * n].reshape(groups - 1, 8, n)
        _mul_shift((lo[None, 0:8], hi[None, 0:8]), (dst_lo, dst_hi), group_shifts, t3)
    rest = top - 8 * groups  # a last partial group (m not a multiple of 8)
    if rest and groups:
        start = 8 * groups
        t = tmp[: rest * n].reshape(rest, n)
        dst = (lo[start:top], hi[start:top])
        _mul_shift((lo[:rest], hi[:rest]), dst, np.uint64(start), t)
    for start in range(64, m, 64):  # 64 rows at a time by x^64
        count = min(64, m - start)
        t = tmp[: count * n].reshape(count, n)
        src = (lo[start - 64 : start - 64 + count], hi[start - 64 : start - 64 + count])
        _mul_x64(src, (lo[start : start + count], hi[start : start + count]), t)


def tweak_chain(first: U64, m: int, out: U64, scratch: U64) -> None:
    """out[i, j] = first[i] * x^j: first (n, 2), out (n, m, 2).

    `scratch` is a flat uint64 array of at least scratch_words(n, m) words.
    """
    n = first.shape[0]
    if m == 1:
        out[:, 0] = first
        return
    size = n * m
    planes = scratch[: 2 * size].reshape(2, m, n)
    lo, hi = planes[0], planes[1]
    lo[0] = first[:, 0]
    hi[0] = first[:, 1]
    _fill_planes(lo, hi, scratch[4 * size :])
    if n == 1:
        out[0, :, 0] = lo[:, 0]
        out[0, :, 1] = hi[:, 0]
        return
    by_block = scratch[2 * size : 4 * size].reshape(m, n, 2)
    by_block[..., 0] = lo
    by_block[..., 1] = hi
    out.view(np.complex128).reshape(n, m)[...] = by_block.view(np.complex128).reshape(m, n).T


def byte_table(m: int) -> U64:
    """(16 * 256, 2 * m): row 256 * b + v holds (v * x^(8b)) * x^j for j < m (built once)."""
    table = _tables.get(m)
    if table is None:
        with _tables_lock:
            table = _tables.get(m)
            if table is None:
                table = _build_table(m)
                _tables[m] = table
    return table


def _build_table(m: int) -> U64:
    rows = 16 * 256
    seeds = np.zeros((rows, 2), np.uint64)
    values = np.arange(256, dtype=np.uint64)
    for b in range(16):
        seeds[256 * b : 256 * (b + 1), b // 8] = values << np.uint64(8 * (b % 8))
    table = np.empty((rows, m, 2), np.uint64)
    tweak_chain(seeds, m, table, np.empty(scratch_words(rows, m), np.uint64))
    return table.reshape(rows, 2 * m)


_BYTE_ROWS = (np.arange(16, dtype=np.intp) * 256).reshape(1, 16)


def tweak_chain_small(first: U64, m: int, out: U64) -> None:
    """tweak_chain for few units and m <= TABLE_MAX_BLOCKS: the tweak is linear in its bytes,
    so each unit's chain is the XOR of 16 rows of byte_table(m) (4 numpy calls in all)."""
    n = first.shape[0]
    rows = first.view(np.uint8).reshape(n, 16) + _BYTE_ROWS
    gathered = byte_table(m)[rows]
    np.bitwise_xor.reduce(gathered, axis=1, out=out.reshape(n, 2 * m))


def mul_x_reference(tweak: int, power: int) -> int:
    """tweak * x^power on Python ints, one bit at a time (for tests)."""
    for _ in range(power):
        carry = tweak >> 127
        tweak = ((tweak << 1) & ((1 << 128) - 1)) ^ (0x87 if carry else 0)
    return tweak
