"""zero and error: a device of zeroes that drops writes, and one that fails everything.

As in the kernel (dm-zero.c, dm-target.c's error target): neither has a device below; `error`
passes crypto (it never touches data), `zero` does not (it would hand out plaintext zeroes).
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nbdcrypt.device import Device, DeviceCaps
from nbdcrypt.dm.target import DeviceRef, Target, TargetSpec, expect_args
from nbdcrypt.request import EXTENT_HOLE, EXTENT_ZERO, Extent, Request


@dataclass(frozen=True, slots=True)
class ZeroSpec(TargetSpec):
    name = "zero"
    usage = "(no arguments)"

    @classmethod
    def parse(cls, args: Sequence[str], length: int) -> ZeroSpec:
        expect_args(args, [0], cls.usage)
        return cls()

    def refs(self, length: int) -> list[DeviceRef]:
        return []

    def build(self, length: int, devices: Mapping[str, Device]) -> ZeroTarget:
        return ZeroTarget(self, length)

    def args_text(self) -> str:
        return ""


class ZeroTarget(Target):
    caps = DeviceCaps(can_trim=True, can_fast_zero=True, can_multi_conn=True, can_extents=True)

    async def read(self, req: Request) -> bytes:
        return bytes(req.length)

    async def write(self, req: Request) -> None:
        return None

    async def trim(self, req: Request) -> None:
        return None

    async def write_zeroes(self, req: Request) -> None:
        return None

    async def block_status(self, req: Request) -> list[Extent]:
        return [Extent(req.length, EXTENT_HOLE | EXTENT_ZERO)]


@dataclass(frozen=True, slots=True)
class ErrorSpec(TargetSpec):
    name = "error"
    passes_crypto = True
    usage = "(no arguments)"

    @classmethod
    def parse(cls, args: Sequence[str], length: int) -> ErrorSpec:
        expect_args(args, [0], cls.usage)
        return cls()

    def refs(self, length: int) -> list[DeviceRef]:
        return []

    def build(self, length: int, devices: Mapping[str, Device]) -> ErrorTarget:
        return ErrorTarget(self, length)

    def args_text(self) -> str:
        return ""


def _eio() -> OSError:
    return OSError(errno.EIO, "I/O error (error target)")


class ErrorTarget(Target):
    caps = DeviceCaps(can_trim=True, can_fast_zero=True, can_multi_conn=True)

    async def read(self, req: Request) -> bytes:
        raise _eio()

    async def write(self, req: Request) -> None:
        raise _eio()

    async def trim(self, req: Request) -> None:
        raise _eio()

    async def write_zeroes(self, req: Request) -> None:
        raise _eio()

    async def block_status(self, req: Request) -> list[Extent]:
        return [Extent(req.length, 0)]
