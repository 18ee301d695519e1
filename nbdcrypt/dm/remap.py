"""Sending each piece of a request to a region of a device below: for targets and tables.

A subclass says where the first piece of a range goes (`map_piece`); PieceMapper splits
requests at the boundaries that answer implies, joins read results and passes everything else
down. The common case, a request that maps to one piece, costs one remap and no copies. Mapped
devices use it over their table's lines; linear, striped and flakey over their devices.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable

from nbdcrypt.device import Device
from nbdcrypt.dm.target import Target
from nbdcrypt.request import Extent, Request

_Op = Callable[[Device, Request], Awaitable[None]]


class PieceMapper(Device):
    """A device whose data lives, piece by piece, on devices below."""

    @abc.abstractmethod
    def map_piece(self, offset: int, length: int) -> tuple[Device, int, int]:
        """(device, offset on it, bytes) for the first piece of [offset, offset + length)."""

    async def read(self, req: Request) -> bytes | bytearray | memoryview:
        device, where, n = self.map_piece(req.offset, req.length)
        if n == req.length:
            return await device.read(req.remapped(where))
        out = bytearray(req.length)
        at = 0
        while at < req.length:
            device, where, n = self.map_piece(req.offset + at, req.length - at)
            out[at : at + n] = await device.read(req.piece(at, n, where))
            at += n
        return out

    async def write(self, req: Request) -> None:
        await self._each(req, _write)

    async def trim(self, req: Request) -> None:
        await self._each(req, _trim)

    async def write_zeroes(self, req: Request) -> None:
        await self._each(req, _write_zeroes)

    async def cache(self, req: Request) -> None:
        await self._each(req, _cache)

    async def block_status(self, req: Request) -> list[Extent]:
        device, where, n = self.map_piece(req.offset, req.length)
        if not device.caps.can_extents:
            return [Extent(n, 0)]
        return await device.block_status(req.piece(0, n, where))

    async def _each(self, req: Request, op: _Op) -> None:
        device, where, n = self.map_piece(req.offset, req.length)
        if n == req.length:
            await op(device, req.remapped(where))
            return
        at = 0
        while at < req.length:
            device, where, n = self.map_piece(req.offset + at, req.length - at)
            await op(device, req.piece(at, n, where))
            at += n


async def _write(device: Device, req: Request) -> None:
    await device.write(req)


async def _trim(device: Device, req: Request) -> None:
    await device.trim(req)


async def _write_zeroes(device: Device, req: Request) -> None:
    await device.write_zeroes(req)


async def _cache(device: Device, req: Request) -> None:
    await device.cache(req)


class RemapTarget(Target, PieceMapper):
    """A target whose data lives, piece by piece, on devices below."""
