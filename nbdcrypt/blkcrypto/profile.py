"""Crypto capabilities: which modes, data unit sizes and DUN widths a device can do inline.

A plain immutable value, as the kernel's blk_crypto_profile minus its keyslots: intersection
(`&`) gives what a mapped device can pass through, `covers` says whether one set of
capabilities includes another, and `lacks` says what is missing in words, for errors such as a
table load that would drop a capability.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nbdcrypt.blkcrypto.key import DATA_UNIT_SIZES, CryptoKey, CryptoMode


@dataclass(frozen=True, slots=True)
class CryptoCaps:
    """modes -> set of supported data unit sizes, and the widest DUN supported (bytes)."""

    modes: frozenset[tuple[CryptoMode, int]]  # (mode, data unit size) pairs
    max_dun_bytes: int

    @classmethod
    def of(cls, modes: Mapping[CryptoMode, tuple[int, ...]], max_dun_bytes: int) -> CryptoCaps:
        return cls(frozenset((m, d) for m, sizes in modes.items() for d in sizes), max_dun_bytes)

    @classmethod
    def none(cls) -> CryptoCaps:
        return cls(frozenset(), 0)

    @classmethod
    def everything(cls) -> CryptoCaps:
        """The identity of `&`: what a target with no device below (error) passes."""
        return cls(frozenset((m, d) for m in CryptoMode for d in DATA_UNIT_SIZES), 8)

    def __bool__(self) -> bool:
        return bool(self.modes) and self.max_dun_bytes > 0

    def supports(self, key: CryptoKey) -> bool:
        return (key.mode, key.data_unit_size) in self.modes and key.dun_bytes <= self.max_dun_bytes

    def __and__(self, other: CryptoCaps) -> CryptoCaps:
        return CryptoCaps(self.modes & other.modes, min(self.max_dun_bytes, other.max_dun_bytes))

    def covers(self, other: CryptoCaps) -> bool:
        return other.modes <= self.modes and (
            not other.modes or other.max_dun_bytes <= self.max_dun_bytes
        )

    def lacks(self, other: CryptoCaps) -> list[str]:
        """What `other` has that this lacks, in words (empty if it covers it)."""
        missing = [
            f"{m.value} with {d}-byte data units"
            for m, d in sorted(other.modes - self.modes, key=lambda md: (md[0].value, md[1]))
        ]
        if other.modes and other.max_dun_bytes > self.max_dun_bytes:
            missing.append(f"{other.max_dun_bytes}-byte DUNs (has {self.max_dun_bytes})")
        return missing

    def describe(self) -> str:
        if not self:
            return "none"
        by_mode: dict[CryptoMode, list[int]] = {}
        for mode, dus in self.modes:
            by_mode.setdefault(mode, []).append(dus)
        modes = ", ".join(
            f"{m.value} [{' '.join(str(d) for d in sorted(s))}]"
            for m, s in sorted(by_mode.items(), key=lambda kv: kv[0].value)
        )
        return f"{modes}; DUN up to {self.max_dun_bytes} bytes"
