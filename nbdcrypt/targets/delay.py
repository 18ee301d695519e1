"""delay `<dev> <offset> <ms> [<wdev> <woffset> <wms> [<fdev> <foffset> <fms>]]` (dm-delay.c).

Reads (and writes and flushes, unless given their own device) go to the first device after
`ms` milliseconds; writes to the second after `wms`; flushes to the third after `fms`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nbdcrypt.device import Device
from nbdcrypt.dm.target import (
    SECTOR,
    DeviceRef,
    Target,
    TargetSpec,
    expect_args,
    parse_sectors,
    parse_uint,
)
from nbdcrypt.request import Extent, Request


@dataclass(frozen=True, slots=True)
class Leg:
    device: str
    offset: int  # sectors
    ms: int


@dataclass(frozen=True, slots=True)
class DelaySpec(TargetSpec):
    name = "delay"
    usage = "<dev> <offset> <ms> [<wdev> <woffset> <wms> [<fdev> <foffset> <fms>]]"

    read_leg: Leg
    write_leg: Leg
    flush_leg: Leg

    @classmethod
    def parse(cls, args: Sequence[str], length: int) -> DelaySpec:
        expect_args(args, [3, 6, 9], cls.usage)
        names = ("", "write ", "flush ")
        legs = [
            Leg(
                args[i],
                parse_sectors(args[i + 1], f"{names[i // 3]}offset"),
                parse_uint(args[i + 2], f"{names[i // 3]}delay (ms)"),
            )
            for i in range(0, len(args), 3)
        ]
        while len(legs) < 3:
            legs.append(legs[-1])
        return cls(legs[0], legs[1], legs[2])

    def refs(self, length: int) -> list[DeviceRef]:
        legs = dict.fromkeys((self.read_leg, self.write_leg, self.flush_leg))  # ordered, unique
        return [DeviceRef(leg.device, leg.offset * SECTOR, length) for leg in legs]

    def build(self, length: int, devices: Mapping[str, Device]) -> DelayTarget:
        return DelayTarget(self, length, devices)

    def args_text(self) -> str:
        legs = [self.read_leg]
        if self.flush_leg != self.write_leg:
            legs += [self.write_leg, self.flush_leg]
        elif self.write_leg != self.read_leg:
            legs.append(self.write_leg)
        return " ".join(f"{leg.device} {leg.offset} {leg.ms}" for leg in legs)


class DelayTarget(Target):
    def __init__(self, spec: DelaySpec, length: int, devices: Mapping[str, Device]) -> None:
        super().__init__(spec, length)
        self.legs = [
            (devices[leg.device], leg.offset * SECTOR, leg.ms / 1000)
            for leg in (spec.read_leg, spec.write_leg, spec.flush_leg)
        ]
        self.caps = self.combined_caps()

    @property
    def lower(self) -> Sequence[Device]:
        return list(dict.fromkeys(device for device, _, _ in self.legs))

    async def _leg(self, index: int, req: Request) -> tuple[Device, Request]:
        device, base, seconds = self.legs[index]
        if seconds:
            await asyncio.sleep(seconds)
        return device, req.remapped(base + req.offset)

    async def read(self, req: Request) -> bytes | bytearray | memoryview:
        device, lower = await self._leg(0, req)
        return await device.read(lower)

    async def write(self, req: Request) -> None:
        device, lower = await self._leg(1, req)
        await device.write(lower)

    async def trim(self, req: Request) -> None:
        device, lower = await self._leg(1, req)
        await device.trim(lower)

    async def write_zeroes(self, req: Request) -> None:
        device, lower = await self._leg(1, req)
        await device.write_zeroes(lower)

    async def block_status(self, req: Request) -> list[Extent]:
        device, lower = await self._leg(0, req)
        if not device.caps.can_extents:
            return [Extent(req.length, 0)]
        return await device.block_status(lower)

    async def flush(self) -> None:
        device, _, seconds = self.legs[2]
        if seconds:
            await asyncio.sleep(seconds)
        await device.flush()
