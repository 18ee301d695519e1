"""linear `<dev> <offset>`: a region of one device (drivers/md/dm-linear.c)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nbdcrypt.device import Device
from nbdcrypt.dm.remap import RemapTarget
from nbdcrypt.dm.target import SECTOR, DeviceRef, TargetSpec, expect_args, parse_sectors


@dataclass(frozen=True, slots=True)
class LinearSpec(TargetSpec):
    name = "linear"
    passes_crypto = True
    usage = "<dev> <offset>"

    device: str
    offset: int  # sectors

    @classmethod
    def parse(cls, args: Sequence[str], length: int) -> LinearSpec:
        expect_args(args, [2], cls.usage)
        return cls(args[0], parse_sectors(args[1], "offset"))

    def refs(self, length: int) -> list[DeviceRef]:
        return [DeviceRef(self.device, self.offset * SECTOR, length)]

    def build(self, length: int, devices: Mapping[str, Device]) -> LinearTarget:
        return LinearTarget(self, length, devices[self.device])

    def args_text(self) -> str:
        return f"{self.device} {self.offset}"


class LinearTarget(RemapTarget):
    def __init__(self, spec: LinearSpec, length: int, device: Device) -> None:
        super().__init__(spec, length)
        self.device = device
        self.base = spec.offset * SECTOR
        self.caps = self.combined_caps()

    @property
    def lower(self) -> Sequence[Device]:
        return (self.device,)

    def map_piece(self, offset: int, length: int) -> tuple[Device, int, int]:
        return self.device, self.base + offset, length
