"""The one interface every block device in a stack implements: backends, mapped devices, targets.

Like nbdkit's plugin/filter interface: a small set of operations plus capability queries. All
operations are coroutines so a layer may wait (a suspended table, a keyslot, a delay target), but
the common path of a backend never awaits: the server runs such a request to completion without
scheduling a task (see server/eager.py). Errors are raised as OSError with an errno; the server
maps them to NBD errors. Requests reach a device already validated (in range, allowed flags).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from nbdcrypt.blkcrypto.profile import CryptoCaps
from nbdcrypt.request import Extent, Request

if TYPE_CHECKING:
    from nbdcrypt.blkcrypto.key import CryptoKey
    from nbdcrypt.crypto.libcrypto import InPlace


@dataclass(frozen=True, slots=True)
class DeviceCaps:
    """What a device can do; exports advertise exactly this."""

    can_trim: bool = False
    can_zero: bool = True  # WRITE_ZEROES (always possible by writing zeroes)
    can_fast_zero: bool = False  # some WRITE_ZEROES can be done without writing zeroes
    can_cache: bool = False
    can_multi_conn: bool = False  # a FLUSH on any connection covers every connection's writes
    can_extents: bool = False  # block_status says more than "all data"
    rotational: bool = False
    block_size: int = 1  # the smallest unit of I/O it accepts (logical block size), a power of 2


class Sealing(NamedTuple):
    """How one sealed write is encrypted (in place, with no server lock held), and what gives
    back what it holds (a keyslot): `done()` is called once, whatever became of the write."""

    encrypt: InPlace
    done: Callable[[], None]


class SealTarget(NamedTuple):
    """An encrypted write its caller finishes itself (server/threaded.py, "Sealed writes"):
    `begin()` (server lock held) gives its Sealing, or None if write() must take it after all
    (its keyslot only after a wait); the caller encrypts the payload and writes the
    ciphertext to `fd` at `offset`."""

    fd: int
    offset: int
    begin: Callable[[], Sealing | None]


def _nothing() -> None:
    pass


NOTHING_HELD = _nothing  # SealTarget.done for a write that held nothing


class Device(abc.ABC):
    """A block device of `size` bytes."""

    name: str
    size: int
    caps: DeviceCaps
    openers: int = 0  # client connections in transmission on an export of this device
    crypto_caps: CryptoCaps = CryptoCaps.none()  # what it encrypts inline (blk-crypto profile)
    fallback_bytes: int = 0  # bytes the software fallback en/decrypted for requests sent here
    splices = False  # whether splice_target may name a file (else it is always None)
    seals = False  # whether seal_target may give a target (else it is always None)
    inline_seals = False  # whether inline_seal_target may (else it is always None)

    @abc.abstractmethod
    async def read(self, req: Request) -> bytes | bytearray | memoryview:
        """Return exactly req.length bytes."""

    @abc.abstractmethod
    async def write(self, req: Request) -> None:
        """Write req.data; durable before returning when ReqFlag.FUA is set.

        The caller reuses req.data's buffer once this returns: keep no reference to it.
        """

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every write completed so far durable."""

    @abc.abstractmethod
    async def trim(self, req: Request) -> None:
        """Discard a range (advisory: reads afterwards may return old data or zeroes)."""

    @abc.abstractmethod
    async def write_zeroes(self, req: Request) -> None:
        """Make a range read as zeroes (may deallocate unless NO_HOLE).

        With FAST_ZERO, fail with ENOTSUP rather than write zeroes slowly.
        """

    @abc.abstractmethod
    async def block_status(self, req: Request) -> list[Extent]:
        """Allocation extents from req.offset, covering at least one byte and at most req.length."""

    def file_target(self, offset: int, length: int) -> tuple[int, int] | None:
        """(fd, file offset) where a write of `length` bytes at `offset` lands unchanged and
        whole, for a caller that puts the bytes there itself; None where this device's own
        code must see them. Such a write must count as any other for this device's flush."""
        return None

    def splice_target(self, offset: int, length: int) -> tuple[int, int] | None:
        """file_target() where the file takes splice(2) from a pipe (`splices`: the connection
        threads splice large payloads from the socket, server/splice.py); else None."""
        return self.file_target(offset, length) if self.splices else None

    def seal_target(self, offset: int, length: int) -> SealTarget | None:
        """How a write of `length` bytes at `offset` through this device's key context is
        encrypted and where it lands, for a caller that does both itself; None where the
        usual write() must run (then `seals` is False)."""
        return None

    def inline_seal_target(
        self, key: CryptoKey, dun: int, offset: int, length: int
    ) -> SealTarget | None:
        """seal_target() for a request that carries `key` at `dun` to this device, when its
        inline engine does the encryption (blkcrypto/engine.py); None to take write()."""
        return None

    async def cache(self, req: Request) -> None:  # noqa: B027 - optional operation
        """Prefetch a range; a no-op unless the device has something to warm."""

    async def evict_key(self, key: CryptoKey) -> None:  # noqa: B027 - optional operation
        """Remove `key` from every inline engine at or below this device (EBUSY if in use)."""

    def close(self) -> None:  # noqa: B027 - optional operation
        """Release resources (file descriptors); called once at shutdown."""
