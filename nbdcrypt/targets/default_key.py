"""default-key `<cipher> <key> <iv_offset> <dev> <start> [<#opt_params> <opt_params>...]`.

Android's dm-default-key (drivers/md/dm-default-key.c in the Android common kernel): every
request that arrives without a crypt context gets the target's own key, with the data unit
number dm-crypt would use as the IV of that sector (same cipher, key, iv_offset, sector_size and
iv_large_sectors), so the device below holds dm-crypt-compatible ciphertext. A request that
already carries a crypt context (a tenant's key) goes down with that context unchanged: it is
encrypted once, with the tenant key. Either way nothing reaches the device below in plaintext.

The target attaches its context through a CryptSubmitter over the device below seen in "IV
space" (`_IvSpace`): the submitter numbers data units from byte 0 of the device it talks to,
so addressing that device at iv_offset * 512 + (offset in the line) makes its DUN the dm-crypt
IV. The submitter then sends the request down with the context when the device below can do
the key inline, and does the blk-crypto fallback in software otherwise (counted in this
target's `fallback_bytes`).

Only aes-xts-plain64 is implemented (a 64-byte AES-256-XTS key, 128 hex digits); the kernel's
other cipher, xchacha12,aes-adiantum-plain64, is refused with a clear error, as is
wrappedkey_v0 (hardware-wrapped keys). The key never appears in args_text (the kernel prints
`-` in its place), reprs or errors. docs/DEFAULT-KEY.md describes what lands below and why.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from nbdcrypt.blkcrypto.key import UNSUPPORTED_MODES, CryptoKey, CryptoMode
from nbdcrypt.blkcrypto.profile import CryptoCaps
from nbdcrypt.blkcrypto.submit import CryptSubmitter
from nbdcrypt.crypto.secret import SecretBytes
from nbdcrypt.device import Device
from nbdcrypt.dm.target import (
    SECTOR,
    DeviceRef,
    Target,
    TargetError,
    TargetSpec,
    parse_sectors,
)
from nbdcrypt.request import Extent, Request
from nbdcrypt.targets.crypt import CipherName, Options, parse_key, parse_options

USAGE = "<cipher> <key> <iv_offset> <dev> <start> [<#opt_params> <opt_params>...]"
CIPHER = "aes-xts-plain64"
ADIANTUM = "xchacha12,aes-adiantum-plain64"
KEY_BYTES = CryptoMode.AES_256_XTS.key_size  # 64: dm-default-key's aes-xts-plain64 key
OPTIONS = ("allow_discards", "sector_size:<bytes>", "iv_large_sectors")
MAX_OPT_PARAMS = 4  # dm_read_arg_group's limit in dm-default-key
_XTS = CipherName("xts", "plain64", None)
_U64 = 1 << 64


def _safe(text: str) -> str:
    """An argument quoted for an error, unless it looks like key material (long hex)."""
    if len(text) >= 16 and all(c in string.hexdigits for c in text):
        return f"an argument of {len(text)} hex digits (not shown)"
    return repr(text) if len(text) <= 40 else repr(text[:40]) + "..."


def _sectors(text: str, what: str) -> int:
    """parse_sectors, except that a long argument (a misplaced key?) is never quoted."""
    if len(text) > 20:  # longer than any 64-bit number
        raise TargetError(f"{what} must be a number of 512-byte sectors, not {_safe(text)}")
    return parse_sectors(text, what)


def parse_cipher(text: str) -> str:
    """Exactly one of the kernel's two names (it compares with strcmp; no capi: forms)."""
    if text == CIPHER:
        return text
    if text == ADIANTUM:
        raise TargetError(f"cipher {text!r} is not supported: {UNSUPPORTED_MODES['adiantum']}")
    if text == "AES-256-XTS":
        raise TargetError(
            "cipher 'AES-256-XTS': the first default-key syntax (<mode> <key> <dev> <start>) "
            f"is not supported; write {CIPHER} <key> <iv_offset> <dev> <start> ..."
        )
    raise TargetError(
        f"cipher {_safe(text)} is not supported: default-key takes {CIPHER} "
        f"({ADIANTUM} is not implemented)"
    )


def parse_default_key(text: str) -> SecretBytes:
    """A 64-byte AES-256-XTS key in hex; messages never quote the key."""
    if text == "-":
        raise TargetError(
            f"key: '-' is how dmsetup table shows a hidden key; give the {2 * KEY_BYTES}-hex-"
            "digit key"
        )
    if text.startswith(":"):
        raise TargetError("key: kernel keyring keys are not supported by default-key; use hex")
    if len(text) != 2 * KEY_BYTES:
        raise TargetError(
            f"key: {len(text)} hex digits; {CIPHER} in default-key takes exactly "
            f"{2 * KEY_BYTES} ({KEY_BYTES} bytes, AES-256-XTS)"
        )
    return parse_key(text, _XTS)  # the hex decoding and its error, as crypt does them


def parse_default_key_options(args: Sequence[str], length: int) -> Options:
    """[<#opt_params> <opt_params>...] with dm-default-key's words; `length` in bytes.

    The words are compared exactly (the kernel uses strcmp: no dm-crypt performance flags, no
    other case); crypt's parse_options then checks the count, sector_size and the line length.
    sector_size other than 512 needs iv_large_sectors (dm-default-key does not implement IVs
    counted in 512-byte sectors); with 512, iv_large_sectors changes nothing and is dropped.
    """
    if not args:
        return Options()
    for word in args[1:]:
        if word in ("allow_discards", "iv_large_sectors") or word.startswith("sector_size:"):
            continue
        if word == "wrappedkey_v0":
            raise TargetError("wrappedkey_v0: hardware-wrapped keys are not supported")
        raise TargetError(
            f"unknown optional parameter {_safe(word)} (default-key takes {', '.join(OPTIONS)})"
        )
    options = parse_options(args, length)
    if len(args) - 1 > MAX_OPT_PARAMS:
        raise TargetError(f"at most {MAX_OPT_PARAMS} optional parameters, got {len(args) - 1}")
    if options.sector_size != SECTOR and not options.iv_large_sectors:
        raise TargetError(
            f"sector_size:{options.sector_size} needs iv_large_sectors: default-key numbers "
            "its data units in sector_size units only"
        )
    if options.sector_size == SECTOR and options.iv_large_sectors:
        return Options(options.allow_discards)
    return options


@dataclass(frozen=True, slots=True)
class DefaultKeySpec(TargetSpec):
    name = "default-key"
    passes_crypto = True
    usage = USAGE

    cipher: str
    key: SecretBytes = field(repr=False)
    iv_offset: int  # 512-byte sectors
    device: str
    start: int  # sectors
    options: Options

    @classmethod
    def parse(cls, args: Sequence[str], length: int) -> DefaultKeySpec:
        if len(args) < 5:
            raise TargetError(f"takes at least 5 arguments ({USAGE}), got {len(args)}")
        cipher = parse_cipher(args[0])
        key = parse_default_key(args[1])
        iv_offset = _sectors(args[2], "iv_offset")
        start = _sectors(args[4], "start")
        options = parse_default_key_options(args[5:], length)
        step = options.sector_size // SECTOR
        if iv_offset % step:
            raise TargetError(
                f"iv_offset {iv_offset} is not a multiple of sector_size {options.sector_size} "
                f"({step} sectors): every request would fail"
            )
        if iv_offset + length // SECTOR > _U64:
            raise TargetError(
                f"iv_offset {iv_offset} plus the line's {length // SECTOR} sectors passes 2^64"
            )
        return cls(cipher, key, iv_offset, args[3], start, options)

    def refs(self, length: int) -> list[DeviceRef]:
        return [DeviceRef(self.device, self.start * SECTOR, length)]

    def build(self, length: int, devices: Mapping[str, Device]) -> DefaultKeyTarget:
        return DefaultKeyTarget(self, length, devices[self.device])

    def args_text(self) -> str:
        """As the kernel's table status prints it: the key as `-`."""
        text = f"{self.cipher} - {self.iv_offset} {self.device} {self.start}"
        words = self.options.words()
        return f"{text} {len(words)} {' '.join(words)}" if words else text


def key_dun_bytes(iv_offset: int, length: int, sector_size: int) -> int:
    """The fewest bytes that hold the line's largest DUN, as dm-default-key computes them.

    max_dun = (iv_offset + length in sectors - 1) >> log2(sector_size / 512); DUN bytes =
    ceil(bits of max_dun / 8). The kernel refuses 0 (a line of one data unit at DUN 0);
    nbdcrypt takes 1.
    """
    shift = (sector_size // SECTOR).bit_length() - 1
    max_dun = (iv_offset + length // SECTOR - 1) >> shift
    return max(1, (max_dun.bit_length() + 7) // 8)


class _IvSpace(Device):
    """The device below, addressed so that byte iv_offset * 512 + o is byte o of the line.

    A CryptSubmitter over it gives a request at line offset o the DUN (iv_offset * 512 + o) /
    sector_size: dm-crypt's IV for that sector with iv_large_sectors (or sector_size 512).
    """

    def __init__(self, target: DefaultKeyTarget) -> None:
        self.target = target
        self.lower = target.device
        self.name = target.device.name
        self.size = target.size
        self.caps = target.caps
        self.shift = target.base - target.iv_base  # IV-space offset + shift = offset below

    @property
    def crypto_caps(self) -> CryptoCaps:  # type: ignore[override]
        return self.lower.crypto_caps

    @property
    def fallback_bytes(self) -> int:
        return self.target.fallback_bytes

    @fallback_bytes.setter
    def fallback_bytes(self, value: int) -> None:
        self.target.fallback_bytes = value  # the fallback runs at the default-key target

    async def read(self, req: Request) -> bytes | bytearray | memoryview:
        return await self.lower.read(req.remapped(req.offset + self.shift))

    async def write(self, req: Request) -> None:
        await self.lower.write(req.remapped(req.offset + self.shift))

    async def write_zeroes(self, req: Request) -> None:
        await self.lower.write_zeroes(req.remapped(req.offset + self.shift))

    async def trim(self, req: Request) -> None:
        await self.lower.trim(req.remapped(req.offset + self.shift))

    async def cache(self, req: Request) -> None:
        await self.lower.cache(req.remapped(req.offset + self.shift))

    async def block_status(self, req: Request) -> list[Extent]:
        return await self.lower.block_status(req.remapped(req.offset + self.shift))

    async def flush(self) -> None:
        await self.lower.flush()

    async def evict_key(self, key: CryptoKey) -> None:
        await self.lower.evict_key(key)


class DefaultKeyTarget(Target):
    """Its own key for requests without a context; a tenant's context passes through."""

    def __init__(self, spec: DefaultKeySpec, length: int, device: Device) -> None:
        super().__init__(spec, length)
        self.default_key = spec
        self.device = device
        self.base = spec.start * SECTOR
        self.iv_base = spec.iv_offset * SECTOR
        sector_size = spec.options.sector_size
        self.key = CryptoKey(
            f"default-key:{spec.device}:{spec.start}",
            CryptoMode.AES_256_XTS,
            sector_size,
            key_dun_bytes(spec.iv_offset, length, sector_size),
            bytearray(spec.key.reveal()),
        )
        self.caps = self.combined_caps(
            block_size=sector_size,
            can_trim=spec.options.allow_discards and device.caps.can_trim,
            can_fast_zero=False,  # its zeroes are encrypted and written
        )
        self._own = CryptSubmitter(_IvSpace(self), self.key)

    @property
    def lower(self) -> Sequence[Device]:
        return (self.device,)

    def _iv(self, req: Request) -> Request:
        """`req` addressed in IV space, for the submitter that attaches the default key."""
        return req.remapped(self.iv_base + req.offset)

    def _below(self, req: Request) -> Request:
        return req.remapped(self.base + req.offset)

    async def read(self, req: Request) -> bytes | bytearray | memoryview:
        if req.crypt is not None or req.encrypted:  # a tenant's key covers it
            return await self.device.read(self._below(req))
        return await self._own.read(self._iv(req))

    async def write(self, req: Request) -> None:
        if req.crypt is not None or req.encrypted:  # a tenant's key covers it
            await self.device.write(self._below(req))
        else:
            await self._own.write(self._iv(req))

    async def write_zeroes(self, req: Request) -> None:
        """Encrypted zeroes with whichever key applies: a hole below reads as garbage."""
        if req.crypt is not None or req.encrypted:  # a tenant's key covers it
            await self.device.write_zeroes(self._below(req))
        else:
            await self._own.write_zeroes(self._iv(req))

    async def trim(self, req: Request) -> None:
        """Passed down with allow_discards (the range then reads as garbage), else a no-op."""
        if self.default_key.options.allow_discards:
            await self.device.trim(self._below(req))

    async def cache(self, req: Request) -> None:
        await self.device.cache(self._below(req))

    async def block_status(self, req: Request) -> list[Extent]:
        """Holes below are not zeroes once decrypted: never ZERO (the submitter strips it)."""
        return await self._own.block_status(self._iv(req))
