"""The unit of I/O that travels down a stack, like the kernel's bio.

A request is built once per NBD command by the server and handed to the export's top device.
Layers below may remap (`remapped`) or split (`split`) it; they never mutate a request they
did not create. Later issues attach a crypt context here, which travels with the request.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from nbdcrypt.blkcrypto.key import CryptContext


class Op(IntEnum):
    """What a request asks for (the values are NBD's command numbers)."""

    READ = 0
    WRITE = 1
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class ReqFlag(IntFlag):
    """Request modifiers. The values equal NBD's command flags, so the server passes them as is."""

    NONE = 0
    FUA = 1 << 0  # durable before the reply
    NO_HOLE = 1 << 1  # WRITE_ZEROES: keep the range allocated
    FAST_ZERO = 1 << 4  # WRITE_ZEROES: fail with ENOTSUP rather than write zeroes slowly


class Extent(NamedTuple):
    """A run of `length` bytes with the base:allocation state `flags` (HOLE=1, ZERO=2)."""

    length: int
    flags: int


EXTENT_DATA = 0
EXTENT_HOLE = 1
EXTENT_ZERO = 2


class Request:
    """One I/O: `op` on [offset, offset + length), with `data` for writes.

    `crypt` is the crypt context (key and data unit number) when the request is to be
    encrypted inline; remapping keeps it, taking a piece advances its DUN. `encrypted` marks
    data the blk-crypto fallback above already en/decrypts with a tenant's key (the kernel's
    skip-default-key mark): layers that add a default key leave such requests alone.
    """

    __slots__ = ("crypt", "data", "encrypted", "flags", "length", "offset", "op")

    def __init__(
        self,
        op: Op,
        offset: int,
        length: int,
        flags: ReqFlag = ReqFlag.NONE,
        data: bytes | bytearray | memoryview | None = None,
        *,
        crypt: CryptContext | None = None,
        encrypted: bool = False,
    ) -> None:
        self.op = op
        self.offset = offset
        self.length = length
        self.flags = flags
        self.data = data
        self.crypt = crypt
        self.encrypted = encrypted

    def remapped(self, offset: int) -> Request:
        """The same I/O addressed at `offset` of the device below (the DUN does not change)."""
        return Request(
            self.op,
            offset,
            self.length,
            self.flags,
            self.data,
            crypt=self.crypt,
            encrypted=self.encrypted,
        )

    def with_crypt(self, crypt: CryptContext) -> Request:
        """The same I/O carrying crypt context `crypt`."""
        return Request(self.op, self.offset, self.length, self.flags, self.data, crypt=crypt)

    def fallback_encrypted(self, data: bytes | bytearray | memoryview | None) -> Request:
        """The same I/O with `data` already en/decrypted above: marked `encrypted`."""
        return Request(self.op, self.offset, self.length, self.flags, data, encrypted=True)

    def piece(self, at: int, length: int, offset: int) -> Request:
        """The `length` bytes from `at` of this request, addressed at `offset` below."""
        data = self.data
        if data is not None:
            data = memoryview(data)[at : at + length]
        crypt = self.crypt
        if crypt is not None and at:
            crypt = crypt.advanced(at)
        return Request(
            self.op, offset, length, self.flags, data, crypt=crypt, encrypted=self.encrypted
        )

    def split(self, head: int) -> tuple[Request, Request]:
        """Cut into the first `head` bytes and the rest (0 < head < length)."""
        rest = self.length - head
        return self.piece(0, head, self.offset), self.piece(head, rest, self.offset + head)

    def __repr__(self) -> str:
        key = f", key={self.crypt.key.key_id}, dun={self.crypt.dun}" if self.crypt else ""
        return (
            f"Request({self.op.name}, offset={self.offset}, length={self.length}, "
            f"{self.flags!r}{key})"
        )
