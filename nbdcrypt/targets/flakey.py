"""flakey `<dev> <offset> <up> <down> [<#features> <features>...]` (drivers/md/dm-flakey.c).

Reliable for `up` seconds, then unreliable for `down` seconds, repeating from the moment the
table is built. While unreliable, with no features every I/O fails with EIO; otherwise:
`drop_writes` acknowledges writes without writing them, `error_writes` fails writes,
`error_reads` fails reads, and `corrupt_bio_byte <Nth> <r|w> <value> <flags>` sets the Nth byte
(from 1) of every read's or write's data to `value`.
"""

from __future__ import annotations

import errno
import time
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
from nbdcrypt.request import Request

_SIMPLE_FEATURES = ("drop_writes", "error_writes", "error_reads")
_WRITE_FAULTS = {"drop_writes", "error_writes"}
_MAX_FEATURE_ARGS = 11  # dm-flakey: drop_writes, error_writes/reads and corrupt_bio_byte + 4
_U32_MAX = 2**32 - 1


def _u32(text: str, what: str) -> int:
    value = parse_uint(text, what)
    if value > _U32_MAX:
        raise TargetError(f"{what} {value} does not fit in 32 bits")
    return value


def _parse_corrupt(words: list[str]) -> Corrupt:
    """`corrupt_bio_byte <Nth_byte> <r|w> <value> <flags>` (the words after the name)."""
    if len(words) < 4:
        raise TargetError("corrupt_bio_byte takes <Nth_byte> <r|w> <value> <flags>")
    nth, direction, value, flags = (words.pop(0) for _ in range(4))
    direction = direction.lower()
    if direction not in ("r", "w"):
        raise TargetError(f"corrupt_bio_byte direction must be r or w, not {direction!r}")
    byte_value = parse_uint(value, "corrupt_bio_byte value")
    if byte_value > 255:
        raise TargetError(f"corrupt_bio_byte value {byte_value} is not a byte")
    byte = _u32(nth, "corrupt_bio_byte Nth_byte")
    if byte < 1:
        raise TargetError("corrupt_bio_byte Nth_byte counts from 1")
    return Corrupt(byte, direction, byte_value, _u32(flags, "corrupt_bio_byte flags"))


@dataclass(frozen=True, slots=True)
class Corrupt:
    byte: int  # 1-based
    direction: str  # "r" | "w"
    value: int
    flags: int


@dataclass(frozen=True, slots=True)
class FlakeySpec(TargetSpec):
    name = "flakey"
    passes_crypto = True
    usage = "<dev> <offset> <up_interval> <down_interval> [<#features> <feature>...]"

    device: str
    offset: int
    up: int  # seconds
    down: int
    features: frozenset[str] = frozenset()
    corrupt: Corrupt | None = None

    @classmethod
    def parse(cls, args: Sequence[str], length: int) -> FlakeySpec:
        if len(args) < 4:
            raise TargetError(f"takes at least 4 arguments ({cls.usage}), got {len(args)}")
        up = _u32(args[2], "up_interval")
        down = _u32(args[3], "down_interval")
        if up + down == 0:
            raise TargetError("up_interval + down_interval is zero")
        if up + down > _U32_MAX:
            raise TargetError("up_interval + down_interval overflows 32 bits")
        features, corrupt = cls._parse_features(args[4:])
        return cls(args[0], parse_sectors(args[1], "offset"), up, down, features, corrupt)

    @staticmethod
    def _parse_features(rest: Sequence[str]) -> tuple[frozenset[str], Corrupt | None]:
        """dm-flakey's parse_features: names and r/w are case-insensitive; each feature at
        most once; at most 11 feature arguments."""
        if not rest:
            return frozenset(), None
        count = parse_uint(rest[0], "#features")
        words = list(rest[1:])
        if count > _MAX_FEATURE_ARGS:
            raise TargetError(f"#features is {count}; at most {_MAX_FEATURE_ARGS} are allowed")
        if len(words) != count:
            raise TargetError(f"#features is {count} but {len(words)} feature arguments follow")
        features: set[str] = set()
        corrupt = None
        while words:
            word = words.pop(0).lower()
            if word in features or (word == "corrupt_bio_byte" and corrupt is not None):
                raise TargetError(f"feature {word} given twice")
            if word in _SIMPLE_FEATURES:
                features.add(word)
            elif word == "corrupt_bio_byte":
                corrupt = _parse_corrupt(words)
            else:
                raise TargetError(f"unknown feature {word!r}")
        if {"drop_writes", "error_writes"} <= features:
            raise TargetError("drop_writes and error_writes are mutually exclusive")
        if corrupt is not None:
            clash = "error_reads" if corrupt.direction == "r" else "drop_writes/error_writes"
            if features & ({"error_reads"} if corrupt.direction == "r" else _WRITE_FAULTS):
                raise TargetError(f"corrupt_bio_byte on {corrupt.direction} conflicts with {clash}")
        return frozenset(features), corrupt

    def refs(self, length: int) -> list[DeviceRef]:
        return [DeviceRef(self.device, self.offset * SECTOR, length)]

    def build(self, length: int, devices: Mapping[str, Device]) -> FlakeyTarget:
        return FlakeyTarget(self, length, devices[self.device])

    def args_text(self) -> str:
        words = sorted(self.features)
        if self.corrupt is not None:
            c = self.corrupt
            words += ["corrupt_bio_byte", str(c.byte), c.direction, str(c.value), str(c.flags)]
        tail = f" {len(words)} {' '.join(words)}" if words else ""
        return f"{self.device} {self.offset} {self.up} {self.down}{tail}"


def _eio() -> OSError:
    return OSError(errno.EIO, "I/O error (flakey target, down interval)")


class FlakeyTarget(RemapTarget):
    def __init__(self, spec: FlakeySpec, length: int, device: Device) -> None:
        super().__init__(spec, length)
        self.flakey = spec
        self.device = device
        self.base = spec.offset * SECTOR
        self.started = time.monotonic()
        self.caps = self.combined_caps()

    @property
    def lower(self) -> Sequence[Device]:
        return (self.device,)

    def map_piece(self, offset: int, length: int) -> tuple[Device, int, int]:
        return self.device, self.base + offset, length

    def is_down(self) -> bool:
        spec = self.flakey
        elapsed = int(time.monotonic() - self.started)
        return elapsed % (spec.up + spec.down) >= spec.up

    async def read(self, req: Request) -> bytes | bytearray | memoryview:
        spec = self.flakey
        if self.is_down():
            if (not spec.features and spec.corrupt is None) or "error_reads" in spec.features:
                raise _eio()
            if spec.corrupt is not None and spec.corrupt.direction == "r":
                data = bytearray(await super().read(req))
                _corrupt(data, spec.corrupt)
                return data
        return await super().read(req)

    async def write(self, req: Request) -> None:
        spec = self.flakey
        if self.is_down():
            if (not spec.features and spec.corrupt is None) or "error_writes" in spec.features:
                raise _eio()
            if "drop_writes" in spec.features:
                return
            if spec.corrupt is not None and spec.corrupt.direction == "w" and req.data is not None:
                data = bytearray(req.data)
                _corrupt(data, spec.corrupt)
                req = Request(req.op, req.offset, req.length, req.flags, data)
        await super().write(req)

    async def trim(self, req: Request) -> None:
        if self._writes_fail():
            raise _eio()
        if not (self.is_down() and "drop_writes" in self.flakey.features):
            await super().trim(req)

    async def write_zeroes(self, req: Request) -> None:
        if self._writes_fail():
            raise _eio()
        if not (self.is_down() and "drop_writes" in self.flakey.features):
            await super().write_zeroes(req)

    def _writes_fail(self) -> bool:
        spec = self.flakey
        if not self.is_down():
            return False
        return (not spec.features and spec.corrupt is None) or "error_writes" in spec.features

    def status(self) -> str:
        return "down" if self.is_down() else "up"


def _corrupt(data: bytearray, corrupt: Corrupt) -> None:
    if len(data) >= corrupt.byte:
        data[corrupt.byte - 1] = corrupt.value
