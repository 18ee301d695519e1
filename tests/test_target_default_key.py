"""The default-key target: table syntax, what lands on the device below, tenant pass-through.

What lands below is compared with a reference computed independently, one crypto sector at a
time, with cryptography's AES-XTS, the way dm-crypt's aes-xts-plain64 makes its IVs: cc_sector =
512-byte sector from the line start + iv_offset; the IV is cc_sector (>> log2(sector_size /
512) with iv_large_sectors) as a 16-byte little-endian number. It is also compared with what
the `crypt` target writes for the same table line, and both the inline path (an
InlineCryptoDevice below) and the software fallback (a plain MemoryDevice below) are checked.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, replace

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from test_keyslot import reference_encrypt

from nbdcrypt.backends.memory import MemoryDevice
from nbdcrypt.blkcrypto.engine import InlineCryptoDevice
from nbdcrypt.blkcrypto.key import CryptoKey, CryptoMode
from nbdcrypt.blkcrypto.profile import CryptoCaps
from nbdcrypt.blkcrypto.submit import CryptSubmitter
from nbdcrypt.device import Device, DeviceCaps
from nbdcrypt.dm.device import MappedDevice
from nbdcrypt.dm.table import Table, TableError, parse_line, parse_table
from nbdcrypt.request import EXTENT_HOLE, EXTENT_ZERO, Op, ReqFlag, Request
from nbdcrypt.targets import TARGETS
from nbdcrypt.targets.default_key import DefaultKeySpec, DefaultKeyTarget, key_dun_bytes

XTS, CBC = CryptoMode.AES_256_XTS, CryptoMode.AES_128_CBC_ESSIV
MiB = 1 << 20
LOWER_SIZE = 8 * MiB
KEY = bytes(range(7, 71))  # 64 bytes, K1 != K2
FULL = CryptoCaps.of({XTS: (512, 1024, 2048, 4096), CBC: (512, 4096)}, 8)


@dataclass(frozen=True)
class Line:
    iv_offset: int = 0
    start: int = 0  # sectors on the device below
    sector_size: int = 512
    iv_large: bool = True  # required by default-key when sector_size != 512
    sectors: int = 8192  # 4 MiB
    discards: bool = False

    def options(self) -> list[str]:
        words = ["allow_discards"] if self.discards else []
        if self.sector_size != 512:
            words.append(f"sector_size:{self.sector_size}")
            if self.iv_large:
                words.append("iv_large_sectors")
        return words

    def text(self, target: str = "default-key", key: bytes = KEY) -> str:
        words = self.options()
        tail = f" {len(words)} {' '.join(words)}" if words else ""
        return (
            f"0 {self.sectors} {target} aes-xts-plain64 {key.hex()} {self.iv_offset} lower "
            f"{self.start}{tail}"
        )


def reference(line: Line, plain: bytes, offset: int) -> bytes:
    """dm-crypt's aes-xts-plain64 for `plain` at byte `offset` of the line, sector by sector."""
    size = line.sector_size
    shift = (size // 512).bit_length() - 1
    out = b""
    for at in range(0, len(plain), size):
        cc_sector = ((offset + at) // 512 + line.iv_offset) % 2**64
        iv = (cc_sector >> shift if line.iv_large else cc_sector).to_bytes(16, "little")
        out += Cipher(algorithms.AES(KEY), modes.XTS(iv)).encryptor().update(plain[at : at + size])
    return out


def lower_device(variant: str, caps: CryptoCaps = FULL) -> tuple[MemoryDevice, Device]:
    """(the bytes below, the device default-key talks to) for a variant."""
    raw = MemoryDevice("lower", LOWER_SIZE)
    if variant == "fallback":
        return raw, raw
    slots = 0 if variant == "inline-rawkey" else 2
    return raw, InlineCryptoDevice(raw, caps, slots)


def stack(line: Line, lower: Device, target: str = "default-key") -> MappedDevice:
    return MappedDevice("top", Table.build(parse_table([line.text(target)]), {"lower": lower}))


def the_target(top: MappedDevice) -> DefaultKeyTarget:
    target = top.live.targets[0]
    assert isinstance(target, DefaultKeyTarget)
    return target


async def rd(device: Device, offset: int, length: int) -> bytes:
    return bytes(await device.read(Request(Op.READ, offset, length)))


async def wr(device: Device, offset: int, data: bytes, flags: ReqFlag = ReqFlag.NONE) -> None:
    await device.write(Request(Op.WRITE, offset, len(data), flags, data))


def tenant_key(dus: int = 4096, mode: CryptoMode = XTS) -> CryptoKey:
    return CryptoKey("tenant", mode, dus, 8, bytearray(os.urandom(mode.key_size)))


LINES = [
    Line(),
    Line(iv_offset=1234, start=77),
    Line(sector_size=4096),
    Line(iv_offset=4096, start=2048, sector_size=4096),
    Line(iv_offset=24, start=8, sector_size=4096, sectors=4096),
    Line(iv_offset=8, start=16, sector_size=2048),
    Line(iv_offset=2**64 - 8192),  # the largest DUN: 2^64 - 1, 8 DUN bytes
    Line(iv_offset=2**64 - 8192, sector_size=4096),
]
VARIANTS = ["inline", "inline-rawkey", "fallback"]


def line_id(line: Line) -> str:
    return line.text().split(" ", 5)[5].replace(KEY.hex(), "KEY")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("line", LINES, ids=line_id)
async def test_ciphertext_below_is_dm_crypts(line: Line, variant: str) -> None:
    raw, lower = lower_device(variant)
    top = stack(line, lower)
    target = the_target(top)
    size = line.sector_size
    length = line.sectors * 512
    for offset, want in [(0, size), (size * 3, 40 * size), (size * 7, 300 * 1024), (0, MiB)]:
        n = min(want, length - offset)
        plain = os.urandom(n)
        await wr(top, offset, plain)
        below = await rd(raw, line.start * 512 + offset, n)
        assert below == reference(line, plain, offset)
        assert await rd(top, offset, n) == plain
    # the fallback runs at the default-key target, and only when the engine can't do the key
    assert (target.fallback_bytes > 0) == (variant == "fallback")
    if isinstance(lower, InlineCryptoDevice):
        assert lower.requests > 0


@pytest.mark.parametrize("line", LINES, ids=line_id)
async def test_same_bytes_as_the_crypt_target_and_readable_by_it(line: Line) -> None:
    raw_dk, lower = lower_device("inline")
    raw_crypt = MemoryDevice("lower", LOWER_SIZE)
    default_key, crypt = stack(line, lower), stack(line, raw_crypt, target="crypt")
    length = line.sectors * 512
    plain = os.urandom(length)
    await wr(default_key, 0, plain)
    await wr(crypt, 0, plain)
    base = line.start * 512
    assert await rd(raw_dk, base, length) == await rd(raw_crypt, base, length)
    # the crypt target opens what default-key wrote, and the other way round
    assert await rd(stack(line, raw_dk, target="crypt"), 0, length) == plain
    assert await rd(stack(line, raw_crypt), 0, length) == plain


async def test_inline_and_fallback_write_identical_bytes_and_read_each_other() -> None:
    line = Line(iv_offset=800, start=24, sector_size=4096)
    raw_inline, engine = lower_device("inline")
    raw_fallback = MemoryDevice("lower", LOWER_SIZE)
    plain = os.urandom(2 * MiB)
    await wr(stack(line, engine), 4096, plain)
    await wr(stack(line, raw_fallback), 4096, plain)
    base = line.start * 512 + 4096
    assert await rd(raw_inline, base, len(plain)) == await rd(raw_fallback, base, len(plain))
    assert await rd(stack(line, raw_inline), 4096, len(plain)) == plain  # fallback reads inline
    fallback_image_in_engine = InlineCryptoDevice(raw_fallback, FULL, 1)
    assert await rd(stack(line, fallback_image_in_engine), 4096, len(plain)) == plain


async def test_engine_lacking_the_data_unit_size_means_fallback_same_bytes() -> None:
    line = Line(sector_size=4096)
    raw, engine = lower_device("inline", CryptoCaps.of({XTS: (512,)}, 8))
    top = stack(line, engine)
    plain = os.urandom(64 * 1024)
    await wr(top, 0, plain)
    assert the_target(top).fallback_bytes == len(plain)
    assert isinstance(engine, InlineCryptoDevice) and engine.requests == 0
    assert await rd(raw, 0, len(plain)) == reference(line, plain, 0)


async def test_dun_bytes_are_the_fewest_that_hold_the_largest_dun() -> None:
    """As dm-default-key computes them, so an engine with short DUNs (eMMC) can do it inline."""
    assert key_dun_bytes(0, 8192 * 512, 512) == 2  # max DUN 8191
    assert key_dun_bytes(0, 8192 * 512, 4096) == 2  # 1023
    assert key_dun_bytes(0, 2048 * 512, 4096) == 1  # 255
    assert key_dun_bytes(0, 8 * 512, 4096) == 1  # max DUN 0: the kernel refuses, nbdcrypt takes 1
    assert key_dun_bytes(2**64 - 8, 8 * 512, 512) == 8
    short = CryptoCaps.of({XTS: (4096,)}, 4)
    line = Line(sector_size=4096)
    _, engine = lower_device("inline", short)
    top = stack(line, engine)
    assert the_target(top).key.dun_bytes == 2
    plain = os.urandom(8192)
    await wr(top, 0, plain)
    assert the_target(top).fallback_bytes == 0  # inline with 4-byte DUNs
    far = replace(line, iv_offset=2**40)  # DUNs of 5 bytes: too wide for the engine
    raw_far, engine_far = lower_device("inline", short)
    top_far = stack(far, engine_far)
    await wr(top_far, 0, plain)
    assert the_target(top_far).fallback_bytes == len(plain)
    assert await rd(raw_far, 0, len(plain)) == reference(far, plain, 0)


async def test_key_is_one_aes_256_xts_key_with_sector_size_data_units() -> None:
    top = stack(Line(start=8, sector_size=2048), MemoryDevice("lower", LOWER_SIZE))
    key = the_target(top).key
    assert (key.mode, key.data_unit_size, bytes(key.raw)) == (XTS, 2048, KEY)
    assert KEY.hex() not in repr(key) and KEY.hex()[:16] not in repr(the_target(top).spec)


# --- tenants: requests that already carry a crypt context ----------------------------------


@pytest.mark.parametrize("slots", [0, 2])
async def test_tenant_context_passes_through_unchanged_not_double_encrypted(slots: int) -> None:
    line = Line(iv_offset=64, start=16, sector_size=4096)
    raw = MemoryDevice("lower", LOWER_SIZE)
    engine = InlineCryptoDevice(raw, FULL, slots)
    top = stack(line, engine)
    tenant = tenant_key(4096)
    conn = CryptSubmitter(top, tenant)
    plain = os.urandom(256 * 1024)
    offset = 12 * 4096
    await wr(conn, offset, plain)
    below = await rd(raw, line.start * 512 + offset, len(plain))
    assert below == reference_encrypt(tenant, offset // 4096, plain)  # the tenant key alone
    assert await rd(conn, offset, len(plain)) == plain
    assert the_target(top).fallback_bytes == 0 and top.fallback_bytes == 0
    if engine.keyslots is not None:
        assert engine.keyslots.slot_of(the_target(top).key) is None  # never used for it
    assert await rd(top, offset, len(plain)) != plain  # the default key can't read it
    # a request without a context, next to it, gets the default key
    other = os.urandom(8192)
    await wr(top, 0, other)
    assert await rd(raw, line.start * 512, 8192) == reference(line, other, 0)
    assert await rd(raw, line.start * 512 + offset, len(plain)) == below  # tenant data intact


async def test_tenant_write_zeroes_and_dun_with_a_line_not_at_table_start() -> None:
    """The tenant's DUN is fixed at the top (export offset), whatever default-key's iv_offset."""
    raw = MemoryDevice("lower", LOWER_SIZE)
    engine = InlineCryptoDevice(raw, FULL, 2)
    lines = [
        "0 2048 linear lower 0",
        f"2048 4096 default-key aes-xts-plain64 {KEY.hex()} 9 lower 4096",
    ]
    top = MappedDevice("top", Table.build(parse_table(lines), {"lower": engine}))
    tenant = tenant_key(512)
    conn = CryptSubmitter(top, tenant)
    plain = os.urandom(2 * MiB)  # across the two lines
    await wr(conn, MiB - 4096, plain)
    expect = reference_encrypt(tenant, (MiB - 4096) // 512, plain)
    assert await rd(raw, MiB - 4096, 4096) == expect[:4096]  # linear part
    assert await rd(raw, 2 * MiB, len(plain) - 4096) == expect[4096:]  # default-key part
    await conn.write_zeroes(Request(Op.WRITE_ZEROES, MiB, 8192))
    assert await rd(raw, 2 * MiB, 8192) == reference_encrypt(tenant, MiB // 512, bytes(8192))
    assert await rd(conn, MiB, 8192) == bytes(8192)


async def test_tenant_key_the_stack_cannot_do_inline_is_encrypted_once() -> None:
    raw = MemoryDevice("lower", LOWER_SIZE)
    engine = InlineCryptoDevice(raw, CryptoCaps.of({XTS: (4096,)}, 8), 2)
    top = stack(Line(sector_size=4096), engine)
    tenant = tenant_key(4096, CBC)  # the engine has no CBC: fallback at the top
    plain = os.urandom(8192)
    await wr(CryptSubmitter(top, tenant), 0, plain)
    assert top.fallback_bytes == 8192
    assert await rd(raw, 0, 8192) == reference_encrypt(tenant, 0, plain)


async def test_inline_with_a_start_not_aligned_to_the_sector_size() -> None:
    line = Line(iv_offset=16, start=1, sector_size=4096)
    raw, engine = lower_device("inline")
    plain = os.urandom(8192)
    await wr(stack(line, engine), 0, plain)
    assert await rd(raw, 512, 8192) == reference(line, plain, 0)


async def test_start_not_aligned_to_the_sector_size_by_the_fallback() -> None:
    line = Line(iv_offset=16, start=1, sector_size=4096)
    raw = MemoryDevice("lower", LOWER_SIZE)
    plain = os.urandom(8192)
    await wr(stack(line, raw), 0, plain)
    assert await rd(raw, 512, 8192) == reference(line, plain, 0)


# --- capabilities and the other operations ---------------------------------------------------


async def test_mapped_device_over_default_key_advertises_what_is_below() -> None:
    caps = CryptoCaps.of({XTS: (512, 4096)}, 4)
    _, engine = lower_device("inline", caps)
    top = stack(Line(), engine)
    assert TARGETS["default-key"].passes_crypto
    assert the_target(top).crypto_caps == caps and top.crypto_caps == caps
    upper = MappedDevice("upper", Table.build(parse_table(["0 8192 linear top 0"]), {"top": top}))
    assert upper.crypto_caps == caps
    assert not stack(Line(), MemoryDevice("lower", LOWER_SIZE)).crypto_caps  # nothing inline below
    mixed = [f"0 4096 default-key aes-xts-plain64 {KEY.hex()} 0 lower 0", "4096 8 zero"]
    assert not MappedDevice("m", Table.build(parse_table(mixed), {"lower": engine})).crypto_caps


@pytest.mark.parametrize("variant", ["inline", "fallback"])
async def test_caps_and_extents_never_claim_zeroes(variant: str) -> None:
    _, lower = lower_device(variant)
    top = stack(Line(sector_size=4096), lower)
    caps = top.caps
    assert caps.block_size == 4096 and caps.can_extents and not caps.can_fast_zero
    assert not caps.can_trim
    await wr(top, 0, os.urandom(4096))
    extents = await top.block_status(Request(Op.BLOCK_STATUS, 0, MiB))
    assert sum(e.length for e in extents) == MiB
    assert all(not e.flags & EXTENT_ZERO for e in extents)  # a hole below is not plaintext zeroes
    assert extents[0].flags == 0 and any(e.flags & EXTENT_HOLE for e in extents)


@pytest.mark.parametrize("variant", ["inline", "fallback"])
async def test_write_zeroes_writes_encrypted_zeroes(variant: str) -> None:
    line = Line(iv_offset=8, start=8, sector_size=4096)
    raw, lower = lower_device(variant)
    top = stack(line, lower)
    await wr(top, 0, os.urandom(3 * MiB))
    n = 2 * MiB + 8192
    await top.write_zeroes(Request(Op.WRITE_ZEROES, 4096, n))
    assert await rd(top, 4096, n) == bytes(n)
    assert await rd(raw, line.start * 512 + 4096, n) == reference(line, bytes(n), 4096)
    with pytest.raises(OSError) as exc:
        await top.write_zeroes(Request(Op.WRITE_ZEROES, 0, 4096, ReqFlag.FAST_ZERO))
    assert exc.value.errno == errno.ENOTSUP


async def test_trim_only_with_allow_discards() -> None:
    raw = MemoryDevice("lower", LOWER_SIZE)
    plain = os.urandom(MiB)
    top = stack(Line(), raw)
    await wr(top, 0, plain)
    before = await rd(raw, 0, MiB)
    await the_target(top).trim(Request(Op.TRIM, 0, MiB))  # not advertised: a no-op
    assert await rd(raw, 0, MiB) == before and await rd(top, 0, MiB) == plain
    trimming = stack(Line(discards=True), raw)
    assert trimming.caps.can_trim
    await trimming.trim(Request(Op.TRIM, 0, MiB))
    assert await rd(raw, 0, MiB) == bytes(MiB)  # MemoryDevice trims to zeroes ...
    assert await rd(trimming, 0, MiB) != bytes(MiB)  # ... which decrypt to garbage

    class NoTrim(MemoryDevice):
        caps = DeviceCaps(can_trim=False)

    assert not stack(Line(discards=True), NoTrim("lower", LOWER_SIZE)).caps.can_trim


async def test_misaligned_requests_are_einval() -> None:
    top = stack(Line(sector_size=4096), MemoryDevice("lower", LOWER_SIZE))
    for req in [
        Request(Op.READ, 512, 4096),
        Request(Op.WRITE, 512, 4096, data=bytes(4096)),
        Request(Op.WRITE, 0, 512, data=bytes(512)),
    ]:
        with pytest.raises(OSError) as exc:
            await (top.read(req) if req.op is Op.READ else top.write(req))
        assert exc.value.errno == errno.EINVAL


async def test_evict_key_goes_down_and_flush_too() -> None:
    flushed: list[str] = []

    class Flushing(MemoryDevice):
        async def flush(self) -> None:
            flushed.append(self.name)

    engine = InlineCryptoDevice(Flushing("lower", LOWER_SIZE), FULL, 2)
    top = stack(Line(sector_size=4096), engine)
    key = the_target(top).key
    await wr(top, 0, os.urandom(8192))
    assert engine.keyslots is not None and engine.keyslots.slot_of(key) is not None
    slot = await engine.keyslots.get_slot(key)  # a request in flight
    with pytest.raises(OSError) as exc:
        await top.evict_key(key)
    assert exc.value.errno == errno.EBUSY
    engine.keyslots.put_slot(slot)
    await top.evict_key(key)
    assert engine.keyslots.slot_of(key) is None
    await top.flush()
    assert flushed == ["lower"]


# --- the table line ----------------------------------------------------------------------


def parse(args: str, sectors: int = 8192) -> DefaultKeySpec:
    spec = parse_line(f"0 {sectors} default-key {args}").spec
    assert isinstance(spec, DefaultKeySpec)
    return spec


@pytest.mark.parametrize(
    ("args", "text"),
    [
        ("aes-xts-plain64 KEY 0 d 0", "aes-xts-plain64 - 0 d 0"),
        (
            "aes-xts-plain64 KEY 16 d 2048 1 allow_discards",
            "aes-xts-plain64 - 16 d 2048 1 allow_discards",
        ),
        (
            "aes-xts-plain64 KEY 8 d 1 3 iv_large_sectors sector_size:4096 allow_discards",
            "aes-xts-plain64 - 8 d 1 3 allow_discards sector_size:4096 iv_large_sectors",
        ),
        ("aes-xts-plain64 KEY 0 d 0 1 iv_large_sectors", "aes-xts-plain64 - 0 d 0"),
        ("aes-xts-plain64 KEY 0 d 0 2 sector_size:512 iv_large_sectors", "aes-xts-plain64 - 0 d 0"),
        ("aes-xts-plain64 KEY 0 d 0 0", "aes-xts-plain64 - 0 d 0"),
    ],
)
def test_table_text_is_the_kernels_with_the_key_as_dash(args: str, text: str) -> None:
    spec = parse(args.replace("KEY", KEY.hex().upper()))
    assert spec.args_text() == text
    assert KEY.hex() not in repr(spec) and KEY.hex().upper() not in repr(spec)
    assert parse_line(f"0 8192 default-key {args.replace('KEY', KEY.hex())}").text() == (
        f"0 8192 default-key {text}"
    )


async def test_status_is_empty() -> None:
    top = stack(Line(), MemoryDevice("lower", LOWER_SIZE))
    assert top.status() == ["0 8192 default-key"]


K = KEY.hex()
ERRORS = [
    ("", "at least 5 arguments"),
    (f"aes-xts-plain64 {K} 0 d", "at least 5 arguments"),
    (f"aes-cbc-essiv:sha256 {K} 0 d 0", "not supported: default-key takes aes-xts-plain64"),
    (f"capi:xts(aes)-plain64 {K} 0 d 0", "not supported"),
    (f"aes-xts-plain {K} 0 d 0", "not supported"),
    (f"xchacha12,aes-adiantum-plain64 {K[:64]} 0 d 0", "Adiantum is not implemented"),
    (f"AES-256-XTS {K} d 0 0", "first default-key syntax"),
    (f"{K} 0 d 0 1 allow_discards", "cipher an argument of 128 hex digits"),
    ("aes-xts-plain64 - 0 d 0", "'-' is how dmsetup table shows a hidden key"),
    ("aes-xts-plain64 :64:logon:fde 0 d 0", "keyring keys are not supported"),
    (f"aes-xts-plain64 {K[:64]} 0 d 0", "64 hex digits; aes-xts-plain64 in default-key takes"),
    (f"aes-xts-plain64 {K}0 0 d 0", "129 hex digits"),
    (f"aes-xts-plain64 {K[:-2]}zz 0 d 0", "not a hex string"),
    (f"aes-xts-plain64 {K} -1 d 0", "iv_offset must be a number"),
    (f"aes-xts-plain64 {K} 0x10 d 0", "iv_offset must be a number"),
    (f"aes-xts-plain64 {K} {K} d 0", "iv_offset must be a number of 512-byte sectors, not an"),
    (f"aes-xts-plain64 {K} 0 d x", "start must be a number"),
    (f"aes-xts-plain64 {K} 0 d 0 1", "#opt_params is 1 but 0"),
    (f"aes-xts-plain64 {K} 0 d 0 x allow_discards", "#opt_params must be a number"),
    (f"aes-xts-plain64 {K} 0 d 0 2 allow_discards", "#opt_params is 2 but 1"),
    (f"aes-xts-plain64 {K} 0 d 0 1 same_cpu_crypt", "unknown optional parameter 'same_cpu_crypt'"),
    (f"aes-xts-plain64 {K} 0 d 0 1 ALLOW_DISCARDS", "unknown optional parameter"),
    (f"aes-xts-plain64 {K} 0 d 0 1 {K}", "unknown optional parameter an argument of 128"),
    (f"aes-xts-plain64 {K} 0 d 0 1 wrappedkey_v0", "hardware-wrapped keys are not supported"),
    (f"aes-xts-plain64 {K} 0 d 0 1 integrity:28:aead", "unknown optional parameter"),
    (f"aes-xts-plain64 {K} 0 d 0 1 sector_size:1000", "power of two from 512 to 4096"),
    (f"aes-xts-plain64 {K} 0 d 0 1 sector_size:8192", "power of two from 512 to 4096"),
    (f"aes-xts-plain64 {K} 0 d 0 1 sector_size:4096", "needs iv_large_sectors"),
    (
        f"aes-xts-plain64 {K} 0 d 0 5 allow_discards allow_discards allow_discards "
        "allow_discards allow_discards",
        "at most 4 optional parameters",
    ),
    (f"aes-xts-plain64 {K} 4 d 0 2 sector_size:4096 iv_large_sectors", "not a multiple of sector"),
    (f"aes-xts-plain64 {K} {2**64 - 8191} d 0", "passes 2^64"),
    (f"aes-xts-plain64 {K} {2**64} d 0", "passes 2^64"),
]


@pytest.mark.parametrize(("args", "message"), ERRORS, ids=[m for _, m in ERRORS])
def test_bad_lines_are_refused_without_showing_the_key(args: str, message: str) -> None:
    with pytest.raises(TableError) as exc:
        parse(args)
    text = str(exc.value)
    assert message in text
    assert text.startswith("line 1: default-key: ")
    for secret in (K, K[:16], K[-16:], K[:64], K[64:]):
        assert secret not in text.lower()


def test_length_must_be_a_multiple_of_sector_size() -> None:
    with pytest.raises(TableError, match="not a multiple of sector_size 4096"):
        parse(f"aes-xts-plain64 {K} 0 d 0 2 sector_size:4096 iv_large_sectors", sectors=12)
    assert parse(f"aes-xts-plain64 {K} 0 d 0 2 sector_size:4096 iv_large_sectors", sectors=16)


def test_refs_name_the_region_below() -> None:
    line = parse_line(f"0 16 default-key aes-xts-plain64 {K} 0 disk0 2048")
    (ref,) = line.refs()
    assert (ref.device, ref.offset, ref.length) == ("disk0", 2048 * 512, 16 * 512)
