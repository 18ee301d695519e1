"""striped `<#devs> <chunk_sectors> (<dev> <offset>)+`: RAID-0 (drivers/md/dm-stripe.c).

Chunk c of the target lives on stripe c mod #devs, as that stripe's chunk c div #devs. As the
kernel requires, the target length is a multiple of #devs and each stripe's share a multiple of
the chunk size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nbdcrypt.device import Device
from nbdcrypt.dm.remap import RemapTarget
from nbdcrypt.dm.target import (
    SECTOR,
    DeviceRef,
    TargetError,
    TargetSpec,
    parse_sectors,
    parse_uint,
)


@dataclass(frozen=True, slots=True)
class StripedSpec(TargetSpec):
    name = "striped"
    passes_crypto = True
    usage = "<#devs> <chunk_sectors> (<dev> <offset>)+"

    chunk: int  # sectors
    stripes: tuple[tuple[str, int], ...]  # (device, offset in sectors)

    @classmethod
    def parse(cls, args: Sequence[str], length: int) -> StripedSpec:
        if len(args) < 2:
            raise TargetError(f"takes at least 4 arguments ({cls.usage}), got {len(args)}")
        count = parse_uint(args[0], "#devs", minimum=1)
        chunk = parse_uint(args[1], "chunk_sectors", minimum=1)
        if len(args) != 2 + 2 * count:
            raise TargetError(
                f"#devs is {count}, so it takes {2 + 2 * count} arguments, got {len(args)}"
            )
        stripes = tuple(
            (args[2 + 2 * i], parse_sectors(args[3 + 2 * i], f"offset of stripe {i}"))
            for i in range(count)
        )
        sectors = length // SECTOR
        if sectors % count:
            raise TargetError(f"target length {sectors} is not divisible by #devs {count}")
        if (sectors // count) % chunk:
            raise TargetError(
                f"each stripe's share ({sectors // count} sectors) is not a multiple "
                f"of chunk_sectors {chunk}"
            )
        return cls(chunk, stripes)

    def refs(self, length: int) -> list[DeviceRef]:
        share = length // len(self.stripes)
        return [DeviceRef(dev, offset * SECTOR, share) for dev, offset in self.stripes]

    def build(self, length: int, devices: Mapping[str, Device]) -> StripedTarget:
        return StripedTarget(self, length, [devices[dev] for dev, _ in self.stripes])

    def args_text(self) -> str:
        pairs = " ".join(f"{dev} {offset}" for dev, offset in self.stripes)
        return f"{len(self.stripes)} {self.chunk} {pairs}"


class StripedTarget(RemapTarget):
    def __init__(self, spec: StripedSpec, length: int, devices: list[Device]) -> None:
        super().__init__(spec, length)
        self.devices = devices
        self.bases = [offset * SECTOR for _, offset in spec.stripes]
        self.chunk = spec.chunk * SECTOR
        self.caps = self.combined_caps()

    @property
    def lower(self) -> Sequence[Device]:
        return self.devices

    def map_piece(self, offset: int, length: int) -> tuple[Device, int, int]:
        chunk, within = divmod(offset, self.chunk)
        row, stripe = divmod(chunk, len(self.devices))
        where = self.bases[stripe] + row * self.chunk + within
        return self.devices[stripe], where, min(length, self.chunk - within)

    def status(self) -> str:
        names = " ".join(d.name for d in self.devices)
        return f"{len(self.devices)} {names} 1 {'A' * len(self.devices)}"  # as dm-stripe prints
