"""A mapped device: a live table of targets, an inactive one, and suspend / resume / swap.

As device-mapper does it: `load` validates and builds an inactive table beside the live one;
`suspend` makes new I/O wait at the door and returns once the I/O inside has drained; `resume`
swaps the inactive table in (if one was loaded) and opens the door. A client sees a pause,
never an error. `clear` drops the inactive table. The size follows the live table; exports
read it when a client connects, so growing a device shows to new connections.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable, Sequence
from functools import partial

from nbdcrypt.blkcrypto.key import CryptoKey
from nbdcrypt.blkcrypto.profile import CryptoCaps
from nbdcrypt.device import Device, DeviceCaps, Sealing, SealTarget
from nbdcrypt.dm.remap import PieceMapper
from nbdcrypt.dm.table import Table, TableError
from nbdcrypt.dm.target import Target
from nbdcrypt.request import Extent, Request


def table_crypto_caps(targets: Sequence[Target]) -> CryptoCaps:
    """The passthrough profile of a table: what all its targets pass (none if one does not)."""
    caps = CryptoCaps.everything()
    for target in targets:
        caps &= target.crypto_caps
    return caps if caps else CryptoCaps.none()


def table_caps(targets: Sequence[Target]) -> DeviceCaps:
    """What a device with these targets can do: what all of them can."""
    return DeviceCaps(
        can_trim=all(t.caps.can_trim for t in targets),
        can_zero=True,
        can_fast_zero=all(t.caps.can_fast_zero for t in targets),
        can_cache=all(t.caps.can_cache for t in targets),
        can_multi_conn=all(t.caps.can_multi_conn for t in targets),
        can_extents=any(t.caps.can_extents for t in targets),
        rotational=any(t.caps.rotational for t in targets),
        block_size=max(t.caps.block_size for t in targets),
    )


class MappedDevice(PieceMapper):
    """A named device built from a table, like /dev/mapper/NAME."""

    def __init__(self, name: str, table: Table) -> None:
        self.name = name
        self.live = table
        self.inactive: Table | None = None
        self.size = table.size
        self.caps = table_caps(table.targets)
        self.crypto_caps = table_crypto_caps(table.targets)
        self._suspended = False
        self._resumed: asyncio.Event | None = None
        self._inflight = 0
        self._drained: asyncio.Future[None] | None = None

    # Control ---------------------------------------------------------------------------------

    @property
    def suspended(self) -> bool:
        return self._suspended

    def load(self, table: Table) -> None:
        """Stage `table` as the inactive table (it replaces one staged before)."""
        if table.size < self.size and self.openers:
            raise TableError(
                f"device {self.name}: the new table is {table.size} bytes, smaller than the "
                f"live {self.size}, and {self.openers} client(s) have it open"
            )
        self._check_crypto(table)
        self.inactive = table

    def _check_crypto(self, table: Table) -> None:
        """Inline-crypto capabilities only grow: refuse a table that would drop one."""
        new = table_crypto_caps(table.targets)
        lost = new.lacks(self.crypto_caps)
        if not lost:
            return
        culprits = [
            f"{line.target} at sector {line.start}"
            + ("" if target.passes_crypto else " (does not pass inline crypto)")
            + "".join(
                f", device {d.name} lacks {', '.join(d.crypto_caps.lacks(self.crypto_caps))}"
                for d in target.lower
                if d.crypto_caps.lacks(self.crypto_caps)
            )
            for line, target in zip(table.lines, table.targets, strict=True)
            if target.crypto_caps.lacks(self.crypto_caps)
        ]
        raise TableError(
            f"device {self.name}: the new table would lose inline crypto capabilities "
            f"({'; '.join(lost)}): {'; '.join(culprits)}"
        )

    def clear(self) -> None:
        self.inactive = None

    async def suspend(self) -> None:
        """Hold new I/O and wait until the I/O already inside has finished."""
        if not self._suspended:
            self._suspended = True
            self._resumed = asyncio.Event()
        if self._inflight:
            if self._drained is None:
                self._drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drained)

    def resume(self) -> bool:
        """Swap in the inactive table, if any, and let I/O flow; True if tables were swapped."""
        swapped = self.inactive is not None
        if self.inactive is not None:
            if self.inactive.size < self.size and self.openers:
                raise TableError(
                    f"device {self.name}: cannot shrink from {self.size} to "
                    f"{self.inactive.size} bytes while {self.openers} client(s) have it open"
                )
            self.live, self.inactive = self.inactive, None
            self.size = self.live.size
            self.caps = table_caps(self.live.targets)
            self.crypto_caps = table_crypto_caps(self.live.targets)
        self._suspended = False
        if self._resumed is not None:
            self._resumed.set()
            self._resumed = None
        return swapped

    @property
    def lower(self) -> list[Device]:
        """Every device the live table's targets use, once each."""
        return list(dict.fromkeys(d for t in self.live.targets for d in t.lower))

    # I/O --------------------------------------------------------------------------------------

    def map_piece(self, offset: int, length: int) -> tuple[Device, int, int]:
        table = self.live
        i = bisect.bisect_right(table.starts, offset) - 1
        target = table.targets[i]
        within = offset - table.starts[i]
        return target, within, min(length, target.size - within)

    @property
    def seals(self) -> bool:  # type: ignore[override]
        return any(target.seals for target in self.live.targets)

    def seal_target(self, offset: int, length: int) -> SealTarget | None:
        """A write within one line of the table whose target lets its caller encrypt and
        land it; counted in flight from begin() to done(), so a suspend waits for it."""
        if self._suspended:
            return None
        target, within, n = self.map_piece(offset, length)
        if n != length or not target.seals:
            return None
        sealed = target.seal_target(within, length)
        if sealed is None:
            return None
        return SealTarget(sealed.fd, sealed.offset, partial(self._begin_seal, sealed.begin))

    def _begin_seal(self, begin: Callable[[], Sealing | None]) -> Sealing | None:
        """The target's begin(), unless the device was suspended meanwhile (then the
        ordinary write waits for the resume), with the write counted in flight."""
        if self._suspended:
            return None
        sealing = begin()
        if sealing is None:
            return None
        self._inflight += 1
        return Sealing(sealing.encrypt, partial(self._end_seal, sealing.done))

    def _end_seal(self, done: Callable[[], None]) -> None:
        done()
        self._leave()

    async def _enter(self) -> None:
        while self._resumed is not None:
            await self._resumed.wait()
        self._inflight += 1

    def _leave(self) -> None:
        self._inflight -= 1
        if not self._inflight and self._drained is not None:
            self._drained.set_result(None)
            self._drained = None

    async def read(self, req: Request) -> bytes | bytearray | memoryview:
        if self._suspended:
            await self._enter()
        else:
            self._inflight += 1
        try:
            return await super().read(req)
        finally:
            self._leave()

    async def write(self, req: Request) -> None:
        if self._suspended:
            await self._enter()
        else:
            self._inflight += 1
        try:
            await super().write(req)
        finally:
            self._leave()

    async def trim(self, req: Request) -> None:
        await self._enter()
        try:
            await super().trim(req)
        finally:
            self._leave()

    async def write_zeroes(self, req: Request) -> None:
        await self._enter()
        try:
            await super().write_zeroes(req)
        finally:
            self._leave()

    async def cache(self, req: Request) -> None:
        await self._enter()
        try:
            await super().cache(req)
        finally:
            self._leave()

    async def block_status(self, req: Request) -> list[Extent]:
        await self._enter()
        try:
            return await super().block_status(req)
        finally:
            self._leave()

    async def flush(self) -> None:
        await self._enter()
        try:
            targets = self.live.targets
            if len(targets) == 1:
                await targets[0].flush()
            else:
                await asyncio.gather(*(t.flush() for t in targets))
        finally:
            self._leave()

    async def evict_key(self, key: CryptoKey) -> None:
        for device in self.lower:
            await device.evict_key(key)

    def status(self) -> list[str]:
        """`dmsetup status` lines of the live table."""
        return [
            f"{line.start} {line.length} {line.target} {target.status()}".rstrip()
            for line, target in zip(self.live.lines, self.live.targets, strict=True)
        ]
