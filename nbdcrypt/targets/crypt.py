"""crypt `<cipher> <key> <iv_offset> <dev> <offset> [<#opt_params> <opt_params>...]` (dm-crypt).

Writes byte for byte what Linux's dm-crypt writes for the same line (docs/CRYPT.md has the
rules and where in drivers/md/dm-crypt.c they come from). Ciphers: aes-xts-plain64,
aes-xts-plain, aes-cbc-essiv:sha256, aes-cbc-plain64, aes-cbc-plain and their capi: forms
(capi:xts(aes)-plain64, capi:cbc(aes)-essiv:sha256, ...). Key: hex (keyring keys come with the
keyring). Options: allow_discards, sector_size:<512..4096>, iv_large_sectors; same_cpu_crypt,
submit_from_crypt_cpus, no_read_workqueue and no_write_workqueue are accepted and kept in the
table text but change nothing here. The key never appears in args_text (zeroes, as
`dmsetup table` prints without --showkeys), reprs or errors.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

from nbdcrypt.crypto import CbcCipher, XtsCipher, libcrypto
from nbdcrypt.crypto.secret import SecretBytes
from nbdcrypt.device import NOTHING_HELD, Device, Sealing, SealTarget
from nbdcrypt.dm.target import (
    SECTOR,
    DeviceRef,
    Target,
    TargetError,
    TargetSpec,
    parse_sectors,
)
from nbdcrypt.request import Extent, Op, ReqFlag, Request

USAGE = "<cipher> <key> <iv_offset> <dev> <offset> [<#opt_params> <opt_params>...]"
SUPPORTED = (
    "aes-xts-plain64, aes-xts-plain, aes-cbc-essiv:sha256, aes-cbc-plain64, aes-cbc-plain, "
    "or the same as capi:xts(aes)-plain64, capi:cbc(aes)-essiv:sha256, ..."
)
KEY_SIZES = {"xts": (32, 64), "cbc": (16, 24, 32)}
PERFORMANCE_FLAGS = (
    "same_cpu_crypt",
    "submit_from_crypt_cpus",
    "no_read_workqueue",
    "no_write_workqueue",
)
IV_MODES = ("plain", "plain64", "essiv")
ZERO_CHUNK = 1 << 20  # WRITE_ZEROES is encrypted and written in pieces of this size
_M64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class CipherName:
    """A parsed cipher specification: chaining mode, IV mode and IV options."""

    chain: str  # xts | cbc
    ivmode: str  # plain | plain64 | essiv
    ivopts: str | None  # the ESSIV hash


def _unsupported(text: str, why: str = "") -> TargetError:
    reason = f" ({why})" if why else ""
    return TargetError(f"cipher {text!r} is not supported{reason}; supported: {SUPPORTED}")


def parse_cipher(text: str) -> CipherName:
    """cipher[:keycount]-chainmode-ivmode[:ivopts], or capi:<api>-ivmode[:ivopts]."""
    if text.startswith("capi:"):
        chain, ivmode, ivopts = _parse_capi(text)
    else:
        chain, ivmode, ivopts = _parse_legacy(text)
    if ivmode not in IV_MODES:
        raise _unsupported(text, f"IV mode {ivmode!r}")
    if ivmode == "essiv":
        if ivopts is None:
            raise TargetError(f"cipher {text!r}: ESSIV needs a hash, as in essiv:sha256")
        if ivopts != "sha256" or chain != "cbc":
            raise _unsupported(text, "ESSIV is supported as cbc with essiv:sha256")
    elif ivopts is not None:
        raise _unsupported(text, f"IV mode {ivmode} takes no options")
    return CipherName(chain, ivmode, ivopts)


def _parse_legacy(text: str) -> tuple[str, str, str | None]:
    if "(" in text:
        raise TargetError(f"cipher {text!r}: crypto API names need the capi: prefix")
    head, _, rest = text.partition("-")
    name, _, keycount = head.partition(":")
    if name != "aes":
        raise _unsupported(text, f"block cipher {name!r}")
    if keycount and keycount != "1":
        raise _unsupported(text, "more than one key (keycount)")
    chain, _, ivspec = rest.partition("-")
    ivmode, colon, ivopts = ivspec.partition(":")
    if not chain or (chain == "plain" and not ivmode):
        chain, ivmode = "cbc", "plain"  # the original dm-crypt default
    if chain not in KEY_SIZES:
        raise _unsupported(text, f"chaining mode {chain!r}")
    if not ivmode:
        raise TargetError(f"cipher {text!r}: an IV mode is required, e.g. {name}-{chain}-plain64")
    return chain, ivmode, ivopts if colon else None


def _parse_capi(text: str) -> tuple[str, str, str | None]:
    spec, colon, ivopts = text[len("capi:") :].rpartition(":")
    if not colon:
        spec = ivopts
    api, dash, ivmode = spec.rpartition("-")
    if not dash:
        raise TargetError(f"cipher {text!r}: an IV mode is required, e.g. capi:xts(aes)-plain64")
    chain = {"xts(aes)": "xts", "cbc(aes)": "cbc"}.get(api)
    if chain is None:
        raise _unsupported(text, f"crypto API cipher {api!r}")
    return chain, ivmode, ivopts if colon else None


def parse_key(text: str, cipher: CipherName) -> SecretBytes:
    """A hex key of a size the cipher takes; messages never quote the key."""
    if text.startswith(":"):
        size, _, kind = text[1:].partition(":")
        kind = kind.partition(":")[0]
        raise TargetError(
            f"key: kernel keyring keys (:{size}:{kind}:<description>) are not supported yet; "
            "they come with the keyring support. Give the key in hex."
        )
    if text == "-":
        raise TargetError("key: a crypt target needs a key ('-' means none)")
    sizes = KEY_SIZES[cipher.chain]
    wanted = " or ".join(f"{s * 2}" for s in sizes)
    if len(text) % 2 or len(text) // 2 not in sizes:
        raise TargetError(
            f"key: {len(text)} hex digits; {cipher.chain} takes {wanted} hex digits "
            f"({' or '.join(str(s) for s in sizes)} bytes)"
        )
    try:
        return SecretBytes(bytes.fromhex(text))
    except ValueError:
        raise TargetError("key: not a hex string") from None


@dataclass(frozen=True, slots=True)
class Options:
    """The optional parameters, canonical: each at most once, in the kernel's status order."""

    allow_discards: bool = False
    flags: tuple[str, ...] = ()  # the accepted performance flags, in PERFORMANCE_FLAGS order
    sector_size: int = SECTOR
    iv_large_sectors: bool = False

    def words(self) -> list[str]:
        """As dm-crypt's status prints them (sector_size only when not 512)."""
        words = ["allow_discards"] if self.allow_discards else []
        words += self.flags
        if self.sector_size != SECTOR:
            words.append(f"sector_size:{self.sector_size}")
        if self.iv_large_sectors:
            words.append("iv_large_sectors")
        return words


def parse_options(args: Sequence[str], length: int) -> Options:
    """[<#opt_params> <opt_params>...]; `length` is the line's length in bytes."""
    if not args:
        return Options()
    if not args[0].isdigit():
        raise TargetError(f"#opt_params must be a number, not {args[0]!r}")
    count = int(args[0])
    words = args[1:]
    if count != len(words):
        raise TargetError(f"#opt_params is {count} but {len(words)} optional parameters follow")
    allow_discards = iv_large = False
    flags: set[str] = set()
    sector_size = SECTOR
    for word in words:
        lower = word.lower()
        if lower == "allow_discards":
            allow_discards = True
        elif lower == "iv_large_sectors":
            iv_large = True
        elif lower in PERFORMANCE_FLAGS:
            flags.add(lower)
        elif word.startswith("sector_size:"):
            sector_size = _parse_sector_size(word[len("sector_size:") :], length)
        elif word.startswith("integrity:"):
            raise TargetError(f"{word}: integrity (AEAD, dm-integrity tags) is not supported")
        else:
            raise TargetError(f"unknown optional parameter {word!r}")
    ordered = tuple(f for f in PERFORMANCE_FLAGS if f in flags)
    return Options(allow_discards, ordered, sector_size, iv_large)


def _parse_sector_size(text: str, length: int) -> int:
    size = int(text) if text.isdigit() else 0
    if size < SECTOR or size > 4096 or size & (size - 1):
        raise TargetError(f"sector_size:{text}: must be a power of two from 512 to 4096")
    if length % size:
        raise TargetError(
            f"target length {length // SECTOR} sectors is not a multiple of sector_size {size}"
        )
    return size


@dataclass(frozen=True, slots=True)
class CryptSpec(TargetSpec):
    name = "crypt"
    usage = USAGE

    cipher_text: str
    cipher: CipherName
    key: SecretBytes = field(repr=False)
    iv_offset: int  # sectors
    device: str
    offset: int  # sectors
    options: Options

    @classmethod
    def parse(cls, args: Sequence[str], length: int) -> CryptSpec:
        if len(args) < 5:
            raise TargetError(f"takes at least 5 arguments ({USAGE}), got {len(args)}")
        options = parse_options(args[5:], length)
        cipher = parse_cipher(args[0])
        key = parse_key(args[1], cipher)
        iv_offset = parse_sectors(args[2], "iv_offset")
        step = options.sector_size // SECTOR
        if iv_offset % step:
            raise TargetError(
                f"iv_offset {iv_offset} is not a multiple of sector_size "
                f"{options.sector_size} ({step} sectors)"
            )
        if iv_offset > _M64:
            raise TargetError(f"iv_offset {iv_offset} does not fit in 64 bits")
        offset = parse_sectors(args[4], "offset")
        return cls(args[0], cipher, key, iv_offset, args[3], offset, options)

    def refs(self, length: int) -> list[DeviceRef]:
        return [DeviceRef(self.device, self.offset * SECTOR, length)]

    def build(self, length: int, devices: Mapping[str, Device]) -> CryptTarget:
        return CryptTarget(self, length, devices[self.device])

    def args_text(self) -> str:
        masked = "0" * (2 * len(self.key))
        text = f"{self.cipher_text} {masked} {self.iv_offset} {self.device} {self.offset}"
        words = self.options.words()
        return f"{text} {len(words)} {' '.join(words)}" if words else text


def make_cipher(spec: CryptSpec) -> XtsCipher | CbcCipher:
    """The unit cipher of a line: plain IVs are 32 bits, plain64 and ESSIV 64."""
    iv_bits = 32 if spec.cipher.ivmode == "plain" else 64
    key = spec.key.reveal()
    if spec.cipher.chain == "xts":
        return XtsCipher(key, iv_bits=iv_bits)
    return CbcCipher(key, essiv=spec.cipher.ivopts, iv_bits=iv_bits)


def _einval(what: str) -> OSError:
    return OSError(errno.EINVAL, f"crypt target: {what}")


class CryptTarget(Target):
    """Encrypts on the way down, decrypts on the way up; one cipher call per request."""

    def __init__(self, spec: CryptSpec, length: int, device: Device) -> None:
        super().__init__(spec, length)
        self.crypt = spec
        self.device = device
        self.base = spec.offset * SECTOR
        self.cipher = make_cipher(spec)
        options = spec.options
        self.sector_size = options.sector_size
        self.shift = (options.sector_size // SECTOR).bit_length() - 1
        self.caps = self.combined_caps(
            block_size=options.sector_size,
            can_trim=options.allow_discards and device.caps.can_trim,
            can_fast_zero=False,
            can_extents=False,
        )
        # Writes the connection thread may encrypt and land itself (server/threaded.py):
        # AES-XTS right over a file.
        self.seals = (
            isinstance(self.cipher, XtsCipher)
            and libcrypto.native()
            and device.file_target(0, 0) is not None
        )

    @property
    def lower(self) -> Sequence[Device]:
        return (self.device,)

    def seal_target(self, offset: int, length: int) -> SealTarget | None:
        """write()'s work for its caller to do: one IV run of whole sectors, encrypted in
        place in one C call, landing in the file below at base + offset."""
        size = self.sector_size
        if not self.seals or (offset | length) % size:
            return None
        runs = self.iv_runs(offset, length)
        if len(runs) != 1:
            return None
        landing = self.device.file_target(self.base + offset, length)
        if landing is None:
            return None
        _, _, first, step = runs[0]
        return SealTarget(landing[0], landing[1], partial(self._begin_seal, first, step, length))

    def _begin_seal(self, first: int, step: int, length: int) -> Sealing | None:
        cipher = self.cipher
        assert isinstance(cipher, XtsCipher)  # self.seals says so
        encrypt = cipher.in_place(first, self.sector_size, length, step=step)
        return None if encrypt is None else Sealing(encrypt, NOTHING_HELD)

    def iv_runs(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """(byte offset in the request, bytes, first IV number, IV step) for a request.

        dm-crypt: cc_sector = 512-byte sector from the line start + iv_offset (u64), advanced
        by sector_size / 512 per crypto sector; the IV number is cc_sector, or cc_sector >>
        log2(sector_size / 512) with iv_large_sectors. With iv_large_sectors the number wraps
        at 2^(64 - shift), so a request across that point becomes two runs.
        """
        sector = (offset // SECTOR + self.crypt.iv_offset) & _M64
        if not self.crypt.options.iv_large_sectors:
            return [(0, length, sector, 1 << self.shift)]
        first = sector >> self.shift
        units = length // self.sector_size
        before = (1 << (64 - self.shift)) - first
        if units <= before:
            return [(0, length, first, 1)]
        split = before * self.sector_size
        return [(0, split, first, 1), (split, length - split, 0, 1)]

    def _check(self, req: Request) -> None:
        size = self.sector_size
        if req.offset % size or req.length % size:
            raise _einval(f"{req.length} bytes at {req.offset} not aligned to sector_size {size}")

    def _convert(
        self, data: bytes | bytearray | memoryview, offset: int, *, encrypt: bool
    ) -> memoryview:
        length = memoryview(data).nbytes
        runs = self.iv_runs(offset, length)
        convert = self.cipher.encrypt if encrypt else self.cipher.decrypt
        if len(runs) == 1:
            _, _, first, step = runs[0]
            return convert(data, first, self.sector_size, step=step)
        out = memoryview(bytearray(length))
        source = memoryview(data)
        for at, n, first, step in runs:
            convert(source[at : at + n], first, self.sector_size, step=step, out=out[at : at + n])
        return out

    async def read(self, req: Request) -> bytes | bytearray | memoryview:
        self._check(req)
        ciphertext = await self.device.read(req.remapped(self.base + req.offset))
        return self._convert(ciphertext, req.offset, encrypt=False)

    async def write(self, req: Request) -> None:
        self._check(req)
        if req.data is None:
            raise _einval("WRITE without data")
        lower = req.remapped(self.base + req.offset)
        lower.data = self._convert(req.data, req.offset, encrypt=True)
        await self.device.write(lower)

    async def trim(self, req: Request) -> None:
        """Passed down with allow_discards (what was there then reads as garbage), else a no-op."""
        if self.crypt.options.allow_discards:
            self._check(req)
            await self.device.trim(req.remapped(self.base + req.offset))

    async def write_zeroes(self, req: Request) -> None:
        """Encrypted zeroes, written in pieces: a hole below would read back as garbage."""
        if req.flags & ReqFlag.FAST_ZERO:
            raise OSError(errno.ENOTSUP, "crypt target: zeroes must be encrypted and written")
        self._check(req)
        zeroes = memoryview(bytes(min(ZERO_CHUNK, req.length)))
        flags = req.flags & ReqFlag.FUA
        done = 0
        while done < req.length:
            n = min(ZERO_CHUNK, req.length - done)
            ciphertext = self._convert(zeroes[:n], req.offset + done, encrypt=True)
            where = self.base + req.offset + done
            await self.device.write(Request(Op.WRITE, where, n, flags, ciphertext))
            done += n

    async def block_status(self, req: Request) -> list[Extent]:
        return [Extent(req.length, 0)]

    async def cache(self, req: Request) -> None:
        await self.device.cache(req.remapped(self.base + req.offset))
