"""The crypt target: table syntax, what lands on the device below, and the device operations.

What lands below is compared with a reference computed independently, one sector at a time,
with cryptography, following drivers/md/dm-crypt.c: cc_sector = 512-byte sector from the line
start + iv_offset, advanced by sector_size / 512 per crypto sector; the IV number is cc_sector
(>> log2(sector_size / 512) with iv_large_sectors), 32 bits for plain, 64 for plain64/essiv.
"""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nbdcrypt.backends.memory import MemoryDevice
from nbdcrypt.device import Device, DeviceCaps
from nbdcrypt.dm.table import TableError, parse_line
from nbdcrypt.dm.target import TargetError
from nbdcrypt.request import Extent, Op, ReqFlag, Request
from nbdcrypt.targets.crypt import CryptSpec, CryptTarget

MiB = 1024 * 1024
LOWER_SIZE = 8 * MiB
XTS_KEY = bytes(range(64))
CBC_KEY = bytes(range(100, 132))


@dataclass(frozen=True)
class Line:
    cipher: str
    key: bytes
    iv_offset: int = 0
    offset: int = 0
    sector_size: int = 512
    iv_large: bool = False
    sectors: int = 8192  # 4 MiB

    def text(self) -> str:
        options = []
        if self.sector_size != 512:
            options.append(f"sector_size:{self.sector_size}")
        if self.iv_large:
            options.append("iv_large_sectors")
        tail = f" {len(options)} {' '.join(options)}" if options else ""
        return (
            f"0 {self.sectors} crypt {self.cipher} {self.key.hex()} {self.iv_offset} lower "
            f"{self.offset}{tail}"
        )


def build(line: Line, lower: Device | None = None) -> tuple[CryptTarget, Device]:
    lower = lower or MemoryDevice("lower", LOWER_SIZE)
    parsed = parse_line(line.text())
    assert isinstance(parsed.spec, CryptSpec)
    target = parsed.spec.build(line.sectors * 512, {"lower": lower})
    return target, lower


def reference_sector(line: Line, plain: bytes, rel_sector: int) -> bytes:
    """One crypto sector as dm-crypt encrypts it; rel_sector: 512-byte sector in the line."""
    shift = (line.sector_size // 512).bit_length() - 1
    cc_sector = (rel_sector + line.iv_offset) % 2**64
    iv_sector = cc_sector >> shift if line.iv_large else cc_sector
    name = line.cipher.removeprefix("capi:")
    if name.endswith("-plain") or name.endswith("aes-cbc-plain"):
        iv_sector &= 0xFFFFFFFF
    iv = iv_sector.to_bytes(16, "little")
    if "essiv" in name:
        salt = hashlib.sha256(line.key).digest()
        iv = Cipher(algorithms.AES(salt), modes.ECB()).encryptor().update(iv)
    if "xts" in name:
        return Cipher(algorithms.AES(line.key), modes.XTS(iv)).encryptor().update(plain)
    return Cipher(algorithms.AES(line.key), modes.CBC(iv)).encryptor().update(plain)


def reference(line: Line, plain: bytes, offset: int) -> bytes:
    size = line.sector_size
    return b"".join(
        reference_sector(line, plain[at : at + size], (offset + at) // 512)
        for at in range(0, len(plain), size)
    )


def write(offset: int, data: bytes | bytearray, flags: ReqFlag = ReqFlag.NONE) -> Request:
    return Request(Op.WRITE, offset, len(data), flags, data)


def read(offset: int, length: int) -> Request:
    return Request(Op.READ, offset, length)


LINES = [
    Line("aes-xts-plain64", XTS_KEY),
    Line("aes-xts-plain64", XTS_KEY[:32], iv_offset=1234, offset=77),
    Line("aes-xts-plain64", XTS_KEY, iv_offset=4096, offset=2048, sector_size=4096),
    Line("aes-xts-plain64", XTS_KEY, iv_offset=4096, offset=8, sector_size=4096, iv_large=True),
    Line("aes-xts-plain64", XTS_KEY, offset=3, sector_size=2048, iv_large=True),
    Line("aes-xts-plain", XTS_KEY, iv_offset=2**32 - 40),
    Line("aes-xts-plain64", XTS_KEY, iv_offset=2**64 - 40),
    Line("capi:xts(aes)-plain64", XTS_KEY, iv_offset=8, sector_size=4096),
    Line("aes-cbc-essiv:sha256", CBC_KEY, iv_offset=99, offset=5),
    Line("aes-cbc-essiv:sha256", CBC_KEY[:16], iv_offset=16, offset=1, sector_size=4096),
    Line("aes-cbc-essiv:sha256", CBC_KEY, iv_offset=8, sector_size=4096, iv_large=True),
    Line("capi:cbc(aes)-essiv:sha256", CBC_KEY[:24]),
    Line("aes-cbc-plain64", CBC_KEY, iv_offset=3),
    Line("aes-cbc-plain", CBC_KEY, iv_offset=2**32 - 5),
]


@pytest.mark.parametrize("line", LINES, ids=lambda line: line.text().split(" ", 3)[3][:60])
async def test_round_trip_and_ciphertext_below(line: Line) -> None:
    target, lower = build(line)
    size = line.sector_size
    for offset, length in [(0, size), (size * 3, 40 * size), (size * 7, 300 * 1024), (0, MiB)]:
        plain = os.urandom(length)
        await target.write(write(offset, plain))
        below = await lower.read(read(line.offset * 512 + offset, length))
        assert bytes(below) == reference(line, plain, offset)
        assert bytes(await target.read(read(offset, length))) == plain


async def test_iv_large_sectors_wrap() -> None:
    """IV numbers wrap at 2^(64 - shift) with iv_large_sectors: a request across it splits."""
    line = Line("aes-xts-plain64", XTS_KEY, iv_offset=2**64 - 64, sector_size=4096, iv_large=True)
    target, lower = build(line)
    plain = os.urandom(16 * 4096)
    await target.write(write(0, plain))
    assert bytes(await lower.read(read(0, len(plain)))) == reference(line, plain, 0)
    assert bytes(await target.read(read(0, len(plain)))) == plain


async def test_callers_data_untouched_and_flags_kept() -> None:
    seen: list[Request] = []

    class Recorder(MemoryDevice):
        async def write(self, req: Request) -> None:
            seen.append(req)
            await super().write(req)

    target, _ = build(Line("aes-xts-plain64", XTS_KEY), Recorder("lower", LOWER_SIZE))
    data = bytearray(os.urandom(8192))
    original = bytes(data)
    await target.write(write(4096, data, ReqFlag.FUA))
    assert data == original
    assert seen[-1].flags == ReqFlag.FUA and seen[-1].offset == 4096
    assert bytes(seen[-1].data or b"") != original


async def test_write_zeroes_reads_back_zeroes() -> None:
    line = Line("aes-xts-plain64", XTS_KEY, sector_size=4096, offset=16)
    target, lower = build(line)
    await target.write(write(0, os.urandom(3 * MiB)))
    await target.write_zeroes(Request(Op.WRITE_ZEROES, 4096, 2 * MiB + 8192))
    back = bytes(await target.read(read(0, 3 * MiB)))
    assert back[4096 : 4096 + 2 * MiB + 8192] == bytes(2 * MiB + 8192)
    below = bytes(await lower.read(read(16 * 512 + 4096, 2 * MiB)))
    assert below == reference(line, bytes(2 * MiB), 4096)  # encrypted zeroes, never a hole
    extents = await lower.block_status(Request(Op.BLOCK_STATUS, 16 * 512, 3 * MiB))
    assert all(e.flags == 0 for e in extents)


async def test_fast_zero_is_enotsup() -> None:
    target, _ = build(Line("aes-xts-plain64", XTS_KEY))
    with pytest.raises(OSError) as exc:
        await target.write_zeroes(Request(Op.WRITE_ZEROES, 0, 4096, ReqFlag.FAST_ZERO))
    assert exc.value.errno == errno.ENOTSUP


async def test_trim_only_with_allow_discards() -> None:
    line = Line("aes-xts-plain64", XTS_KEY)
    target, lower = build(line)
    assert not target.caps.can_trim
    await target.write(write(0, os.urandom(MiB)))
    before = bytes(await lower.read(read(0, MiB)))
    await target.trim(Request(Op.TRIM, 0, MiB))  # not advertised: a no-op
    assert bytes(await lower.read(read(0, MiB))) == before

    parsed = parse_line(
        "0 8192 crypt aes-xts-plain64 " + XTS_KEY.hex() + " 0 lower 0 1 allow_discards"
    )
    trimming = parsed.spec.build(8192 * 512, {"lower": lower})
    assert trimming.caps.can_trim
    await trimming.trim(Request(Op.TRIM, 0, MiB))
    assert bytes(await lower.read(read(0, MiB))) == bytes(MiB)  # MemoryDevice trims to zeroes


async def test_allow_discards_needs_a_lower_device_that_trims() -> None:
    class NoTrim(MemoryDevice):
        caps = DeviceCaps(can_trim=False)

    lower = NoTrim("lower", LOWER_SIZE)
    parsed = parse_line(
        "0 8 crypt aes-xts-plain64 " + XTS_KEY.hex() + " 0 lower 0 1 allow_discards"
    )
    assert not parsed.spec.build(4096, {"lower": lower}).caps.can_trim


def test_caps() -> None:
    target, _ = build(Line("aes-cbc-essiv:sha256", CBC_KEY, sector_size=4096))
    assert target.caps.block_size == 4096
    assert not target.caps.can_fast_zero and not target.caps.can_extents
    assert target.caps.can_zero and target.caps.can_multi_conn
    assert not target.passes_crypto and not CryptSpec.passes_crypto


async def test_unaligned_requests_are_einval() -> None:
    target, _ = build(Line("aes-xts-plain64", XTS_KEY, sector_size=4096))
    for req in (read(512, 4096), read(0, 1024), write(2048, bytes(4096))):
        with pytest.raises(OSError) as exc:
            await (target.read(req) if req.op == Op.READ else target.write(req))
        assert exc.value.errno == errno.EINVAL


async def test_block_status_is_all_data() -> None:
    target, _ = build(Line("aes-xts-plain64", XTS_KEY))
    assert await target.block_status(Request(Op.BLOCK_STATUS, 0, MiB)) == [Extent(MiB, 0)]


# Table syntax ------------------------------------------------------------------------------------


def spec_of(text: str) -> CryptSpec:
    spec = parse_line(text).spec
    assert isinstance(spec, CryptSpec)
    return spec


def test_args_text_masks_the_key_like_dmsetup() -> None:
    key = os.urandom(64)
    options = "3 Allow_Discards NO_READ_WORKQUEUE sector_size:4096"
    spec = spec_of(f"0 8 crypt aes-xts-plain64 {key.hex()} 16 lower 2048 {options}")
    assert spec.args_text() == (
        f"aes-xts-plain64 {'0' * 128} 16 lower 2048 "
        "3 allow_discards no_read_workqueue sector_size:4096"
    )
    for shown in (spec.args_text(), repr(spec), str(spec), f"{spec}", repr(spec.key)):
        assert key.hex() not in shown and key.hex().upper() not in shown
    assert repr(spec.key) == "<secret: 64 bytes>"


def test_args_text_canonical_option_order() -> None:
    key = XTS_KEY.hex()
    spec = spec_of(
        f"0 16 crypt aes-xts-plain64 {key} 0 lower 0 7 iv_large_sectors sector_size:512 "
        "no_write_workqueue same_cpu_crypt submit_from_crypt_cpus allow_discards iv_large_sectors"
    )
    assert spec.args_text().endswith(
        " 5 allow_discards same_cpu_crypt submit_from_crypt_cpus no_write_workqueue "
        "iv_large_sectors"
    )
    assert spec_of(f"0 8 crypt aes-xts-plain64 {key} 0 lower 0 0").args_text().endswith("lower 0")


@pytest.mark.parametrize(
    ("cipher", "chain", "ivmode"),
    [
        ("aes-xts-plain64", "xts", "plain64"),
        ("aes-xts-plain", "xts", "plain"),
        ("aes:1-xts-plain64", "xts", "plain64"),
        ("capi:xts(aes)-plain64", "xts", "plain64"),
        ("aes-cbc-essiv:sha256", "cbc", "essiv"),
        ("capi:cbc(aes)-essiv:sha256", "cbc", "essiv"),
        ("aes-cbc-plain64", "cbc", "plain64"),
        ("aes-cbc-plain", "cbc", "plain"),
        ("aes", "cbc", "plain"),
        ("aes-plain", "cbc", "plain"),
    ],
)
def test_ciphers(cipher: str, chain: str, ivmode: str) -> None:
    key = (XTS_KEY if chain == "xts" else CBC_KEY).hex()
    spec = spec_of(f"0 8 crypt {cipher} {key} 0 lower 0")
    assert (spec.cipher.chain, spec.cipher.ivmode) == (chain, ivmode)
    assert spec.args_text().startswith(f"{cipher} ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("aes-xts-plain64 KEY 0 lower", "at least 5 arguments"),
        ("twofish-xts-plain64 KEY 0 lower 0", "block cipher 'twofish'"),
        ("aes-ecb KEY 0 lower 0", "chaining mode 'ecb'"),
        ("aes-xts-benbi KEY 0 lower 0", "IV mode 'benbi'"),
        ("aes-xts-essiv:sha256 KEY 0 lower 0", "cbc with essiv:sha256"),
        ("aes-cbc-essiv KEY 0 lower 0", "needs a hash"),
        ("aes-cbc-essiv:md5 KEY 0 lower 0", "essiv:sha256"),
        ("aes:64-cbc-lmk KEY 0 lower 0", "keycount"),
        ("xts(aes)-plain64 KEY 0 lower 0", "capi: prefix"),
        ("capi:xts(twofish)-plain64 KEY 0 lower 0", r"API cipher .xts\(twofish\)."),
        ("capi:xts(aes) KEY 0 lower 0", "IV mode is required"),
        ("aes-xts-plain64 :64:logon:cryptsetup:abc 0 lower 0", "keyring"),
        ("aes-xts-plain64 - 0 lower 0", "needs a key"),
        ("aes-xts-plain64 KEY x lower 0", "iv_offset"),
        ("aes-xts-plain64 KEY 0 lower -1", "offset"),
        ("aes-xts-plain64 KEY 0 lower 0 2 allow_discards", "#opt_params is 2"),
        ("aes-xts-plain64 KEY 0 lower 0 x", "#opt_params must be a number"),
        ("aes-xts-plain64 KEY 0 lower 0 1 integrity:28:aead", "integrity"),
        ("aes-xts-plain64 KEY 0 lower 0 1 sector_size:1024x", "power of two"),
        ("aes-xts-plain64 KEY 0 lower 0 1 sector_size:8192", "power of two"),
        ("aes-xts-plain64 KEY 0 lower 0 1 sector_size:768", "power of two"),
        ("aes-xts-plain64 KEY 0 lower 0 1 fast", "unknown optional parameter 'fast'"),
        ("aes-xts-plain64 KEY 4 lower 0 1 sector_size:4096", "iv_offset 4 is not a multiple"),
    ],
)
def test_bad_lines(args: str, message: str) -> None:
    key = XTS_KEY.hex()
    with pytest.raises(TableError, match=message) as exc:
        parse_line(f"0 64 crypt {args.replace('KEY', key)}")
    assert key not in str(exc.value)


def test_length_must_be_a_multiple_of_sector_size() -> None:
    with pytest.raises(TableError, match="12 sectors is not a multiple of sector_size 4096"):
        parse_line(f"0 12 crypt aes-xts-plain64 {XTS_KEY.hex()} 0 lower 0 1 sector_size:4096")


@pytest.mark.parametrize(
    ("cipher", "key", "message"),
    [
        ("aes-xts-plain64", os.urandom(48), "96 hex digits; xts takes 64 or 128"),
        ("aes-cbc-essiv:sha256", os.urandom(64), "128 hex digits; cbc takes 32 or 48 or 64"),
    ],
)
def test_key_sizes(cipher: str, key: bytes, message: str) -> None:
    with pytest.raises(TableError, match=message) as exc:
        parse_line(f"0 8 crypt {cipher} {key.hex()} 0 lower 0")
    assert key.hex() not in str(exc.value)


def test_key_not_hex_and_odd_length() -> None:
    bad = "zz" + XTS_KEY.hex()[2:]
    with pytest.raises(TableError, match="not a hex string") as exc:
        parse_line(f"0 8 crypt aes-xts-plain64 {bad} 0 lower 0")
    assert bad not in str(exc.value)
    with pytest.raises(TableError, match="127 hex digits"):
        parse_line(f"0 8 crypt aes-xts-plain64 {XTS_KEY.hex()[:-1]} 0 lower 0")


def test_target_error_type_and_refs() -> None:
    with pytest.raises(TargetError):
        CryptSpec.parse(["aes-xts-plain64"], 4096)
    spec = spec_of(f"0 8 crypt aes-xts-plain64 {XTS_KEY.hex()} 0 lower 2048")
    refs = spec.refs(4096)
    assert [(r.device, r.offset, r.length) for r in refs] == [("lower", 2048 * 512, 4096)]
