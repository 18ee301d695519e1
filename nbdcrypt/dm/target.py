"""What a device-mapper target is: a parsed table line (TargetSpec) and its running form (Target).

As in the kernel's `struct target_type`: each target type has a name, flags such as
`passes_crypto` (data on the class, never special cases in the core), a constructor from its
own table arguments whose errors say which argument is wrong and why, a map step (here: the
Device operations on offsets relative to the start of its line), and a status line.

Parsing is separate from building so that `nbdcrypt check` validates a config without opening
anything: `TargetSpec.parse` checks syntax and values and names the regions of other devices
the line uses (`refs`); `TargetSpec.build` makes the running Target once the devices below exist.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from nbdcrypt.blkcrypto.key import CryptoKey
from nbdcrypt.blkcrypto.profile import CryptoCaps
from nbdcrypt.device import Device, DeviceCaps

SECTOR = 512


class TargetError(ValueError):
    """A table line's arguments are wrong; the message names the argument and the reason."""


@dataclass(frozen=True, slots=True)
class DeviceRef:
    """A region of another device that a table line maps (bytes)."""

    device: str
    offset: int
    length: int


def shown(text: str, limit: int = 40) -> str:
    """`text` quoted for an error message, cut to `limit` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def is_number(text: str) -> bool:
    """Plain ASCII decimal digits, at most 20 of them (a 64-bit count)."""
    return text.isascii() and text.isdigit() and len(text) <= 20


def parse_sectors(text: str, what: str) -> int:
    """A non-negative decimal count of 512-byte sectors, as dmsetup takes it."""
    if not is_number(text):
        raise TargetError(f"{what} must be a number of 512-byte sectors, not {shown(text)}")
    return int(text)


def parse_uint(text: str, what: str, *, minimum: int = 0) -> int:
    if not is_number(text) or int(text) < minimum:
        raise TargetError(f"{what} must be an integer >= {minimum}, not {shown(text)}")
    return int(text)


def expect_args(args: Sequence[str], counts: Sequence[int], usage: str) -> None:
    if len(args) not in counts:
        expected = " or ".join(str(c) for c in counts)
        raise TargetError(f"takes {expected} arguments ({usage}), got {len(args)}")


class TargetSpec(abc.ABC):
    """A validated table line of one target type (frozen dataclasses in the subclasses)."""

    name: ClassVar[str]
    passes_crypto: ClassVar[bool] = False
    usage: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def parse(cls, args: Sequence[str], length: int) -> TargetSpec:
        """Validate a line's arguments; `length` is the line's length in bytes."""

    @abc.abstractmethod
    def refs(self, length: int) -> list[DeviceRef]:
        """The regions of other devices a line of `length` bytes maps."""

    @abc.abstractmethod
    def build(self, length: int, devices: Mapping[str, Device]) -> Target:
        """The running target; `devices` holds at least every device `refs` names."""

    @abc.abstractmethod
    def args_text(self) -> str:
        """The arguments as `dmsetup table` prints them (key material masked)."""


class Target(Device):
    """A running target: the Device operations with offsets relative to its line's start."""

    spec: TargetSpec

    def __init__(self, spec: TargetSpec, length: int) -> None:
        self.spec = spec
        self.name = spec.name
        self.size = length

    @property
    def lower(self) -> Sequence[Device]:
        """The devices below this target (for flush and capability checks)."""
        return ()

    @property
    def passes_crypto(self) -> bool:
        return self.spec.passes_crypto

    def status(self) -> str:
        """The target's part of `dmsetup status`."""
        return ""

    async def flush(self) -> None:
        for device in self.lower:
            await device.flush()

    @property
    def crypto_caps(self) -> CryptoCaps:  # type: ignore[override]
        """Passthrough: what every device below can do inline, if this target passes crypto."""
        if not self.passes_crypto:
            return CryptoCaps.none()
        caps = CryptoCaps.everything()
        for device in self.lower:
            caps &= device.crypto_caps
        return caps

    async def evict_key(self, key: CryptoKey) -> None:
        for device in self.lower:
            await device.evict_key(key)

    def combined_caps(self, *, block_size: int = 1, **overrides: bool) -> DeviceCaps:
        """The caps every device below shares, with target-specific overrides.

        The block size is the largest of the devices below and `block_size`.
        """
        lower = self.lower
        fields = {
            "can_trim": all(d.caps.can_trim for d in lower),
            "can_zero": True,
            "can_fast_zero": all(d.caps.can_fast_zero for d in lower),
            "can_cache": all(d.caps.can_cache for d in lower),
            "can_multi_conn": all(d.caps.can_multi_conn for d in lower),
            "can_extents": any(d.caps.can_extents for d in lower),
            "rotational": any(d.caps.rotational for d in lower),
        }
        block_size = max([block_size, *(d.caps.block_size for d in lower)])
        fields.update(overrides)
        return DeviceCaps(**fields, block_size=block_size)
