"""blk-crypto through stacks: inline engines, passthrough profiles, the fallback, eviction."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest
from test_keyslot import reference_encrypt

from nbdcrypt.backends.memory import MemoryDevice
from nbdcrypt.blkcrypto.engine import InlineCryptoDevice
from nbdcrypt.blkcrypto.key import CryptoKey, CryptoMode
from nbdcrypt.blkcrypto.profile import CryptoCaps
from nbdcrypt.blkcrypto.submit import CryptSubmitter
from nbdcrypt.device import Device
from nbdcrypt.dm.device import MappedDevice
from nbdcrypt.dm.table import Table, TableError, parse_table
from nbdcrypt.request import Op, Request

XTS, CBC = CryptoMode.AES_256_XTS, CryptoMode.AES_128_CBC_ESSIV
MIB = 1 << 20
FULL = CryptoCaps.of({XTS: (512, 4096), CBC: (512, 4096)}, 8)


def key(name: str, mode: CryptoMode, dus: int) -> CryptoKey:
    return CryptoKey(name, mode, dus, 8, bytearray(os.urandom(mode.key_size)))


def engine(
    name: str, slots: int = 2, caps: CryptoCaps = FULL
) -> tuple[MemoryDevice, InlineCryptoDevice]:
    raw = MemoryDevice(name, 4 * MIB)
    return raw, InlineCryptoDevice(raw, caps, slots)


def stack(lines: list[str], devices: dict[str, Device]) -> MappedDevice:
    return MappedDevice("top", Table.build(parse_table(lines), devices))


async def read(device: Device, offset: int, length: int) -> bytes:
    return bytes(await device.read(Request(Op.READ, offset, length)))


async def write(device: Device, offset: int, data: bytes) -> None:
    await device.write(Request(Op.WRITE, offset, len(data), data=data))


@pytest.mark.parametrize("mode", [XTS, CBC])
@pytest.mark.parametrize("dus", [512, 4096])
@pytest.mark.parametrize("slots", [0, 2])
async def test_inline_and_fallback_write_the_same_ciphertext(
    mode: CryptoMode, dus: int, slots: int
) -> None:
    k = key("tenant", mode, dus)
    raw_a, inline = engine("a", slots)
    raw_b = MemoryDevice("b", 4 * MIB)  # no engine: the fallback does it
    plain = os.urandom(64 * 1024)
    offset = 3 * 4096
    via_inline, via_fallback = CryptSubmitter(inline, k), CryptSubmitter(raw_b, k)
    await write(via_inline, offset, plain)
    await write(via_fallback, offset, plain)
    on_a, on_b = await read(raw_a, offset, len(plain)), await read(raw_b, offset, len(plain))
    assert on_a == on_b == reference_encrypt(k, offset // dus, plain)
    assert plain[:64] not in on_a
    assert raw_b.fallback_bytes == len(plain) and raw_a.fallback_bytes == 0
    # each reads what the other wrote: the images are interchangeable
    swapped_a = CryptSubmitter(raw_a, k)  # the fallback over the inline engine's image
    assert await read(swapped_a, offset, len(plain)) == plain
    assert await read(CryptSubmitter(inline, k), offset, len(plain)) == plain


async def test_passthrough_is_the_intersection_and_needs_every_target() -> None:
    _, a = engine("a", caps=CryptoCaps.of({XTS: (512, 4096)}, 8))
    _, b = engine("b", caps=CryptoCaps.of({XTS: (4096,), CBC: (4096,)}, 4))
    striped = stack(["0 8192 striped 2 8 a 0 b 0"], {"a": a, "b": b})
    assert striped.crypto_caps == CryptoCaps.of({XTS: (4096,)}, 4)
    with_zero = stack(["0 4096 linear a 0", "4096 8 zero"], {"a": a})
    assert not with_zero.crypto_caps  # zero does not pass crypto
    with_error = stack(["0 4096 linear a 0", "4096 8 error"], {"a": a})
    assert with_error.crypto_caps == a.crypto_caps  # error passes anything


async def test_dun_travels_with_remapping_and_advances_with_splits() -> None:
    """Striped splits a request over two engines; each unit is encrypted with its own DUN."""
    k = key("t", XTS, 512)
    raw_a, a = engine("a")
    raw_b, b = engine("b")
    top = stack(["0 8192 striped 2 8 a 0 b 0"], {"a": a, "b": b})  # 4 KiB chunks
    plain = os.urandom(4 * 4096)
    await write(CryptSubmitter(top, k), 4096, plain)  # chunks 1..4: b, a, b, a
    expect = reference_encrypt(k, 4096 // 512, plain)
    assert await read(raw_b, 0, 4096) == expect[:4096]  # chunk 1 -> b row 0
    assert await read(raw_a, 4096, 4096) == expect[4096:8192]  # chunk 2 -> a row 1
    assert a.keyslots is not None and b.keyslots is not None
    assert a.keyslots.stats.programs == 1 and b.keyslots.stats.programs == 1


async def test_fallback_at_the_top_when_a_device_below_lacks_the_mode() -> None:
    k = key("t", CBC, 4096)
    raw_a, a = engine("a", caps=CryptoCaps.of({XTS: (4096,)}, 8))
    top = stack(["0 8192 linear a 0"], {"a": a})
    plain = os.urandom(8192)
    await write(CryptSubmitter(top, k), 0, plain)
    assert top.fallback_bytes == 8192 and a.keyslots is not None and not a.keyslots.stats.programs
    assert await read(raw_a, 0, 8192) == reference_encrypt(k, 0, plain)


async def test_eviction_goes_through_the_stack_and_is_ebusy_while_in_use() -> None:
    k = key("t", XTS, 4096)
    _, a = engine("a")
    _, b = engine("b")
    top = stack(["0 8192 striped 2 8 a 0 b 0"], {"a": a, "b": b})
    await write(CryptSubmitter(top, k), 0, os.urandom(8192))
    assert isinstance(a, InlineCryptoDevice) and isinstance(b, InlineCryptoDevice)
    assert a.keyslots is not None and b.keyslots is not None
    assert a.keyslots.slot_of(k) is not None and b.keyslots.slot_of(k) is not None
    slot = await a.keyslots.get_slot(k)  # a request in flight
    with pytest.raises(OSError) as err:
        await top.evict_key(k)
    assert err.value.errno == errno.EBUSY
    a.keyslots.put_slot(slot)
    await top.evict_key(k)
    assert a.keyslots.slot_of(k) is None and b.keyslots.slot_of(k) is None


async def test_load_refuses_losing_a_capability_and_resume_only_grows() -> None:
    _, a = engine("a", caps=CryptoCaps.of({XTS: (4096,)}, 8))
    _, b = engine("b", caps=CryptoCaps.of({XTS: (512, 4096)}, 8))
    plain = MemoryDevice("plain", 4 * MIB)
    top = stack(["0 4096 linear a 0"], {"a": a})
    with pytest.raises(TableError, match=r"aes-256-xts with 4096-byte data units.*plain lacks"):
        top.load(Table.build(parse_table(["0 4096 linear plain 0"]), {"plain": plain}))
    with pytest.raises(TableError, match=r"delay at sector 0 \(does not pass inline crypto\)"):
        top.load(Table.build(parse_table(["0 4096 delay a 0 0"]), {"a": a}))
    top.load(Table.build(parse_table(["0 4096 linear b 0"]), {"b": b}))
    assert top.crypto_caps == CryptoCaps.of({XTS: (4096,)}, 8)  # applied on resume only
    await top.suspend()
    top.resume()
    assert top.crypto_caps == CryptoCaps.of({XTS: (512, 4096)}, 8)


async def test_resume_switches_a_running_submitter_from_fallback_to_inline() -> None:
    k = key("t", XTS, 512)
    plain_dev = MemoryDevice("p", 4 * MIB)
    raw_b, b = engine("b")
    top = MappedDevice("top", Table.build(parse_table(["0 4096 linear p 0"]), {"p": plain_dev}))
    conn = CryptSubmitter(top, k)
    data = os.urandom(4096)
    await write(conn, 0, data)
    assert top.fallback_bytes == 4096
    top.load(Table.build(parse_table(["0 4096 linear b 0"]), {"b": b}))
    await top.suspend()
    top.resume()
    await write(conn, 0, data)
    assert top.fallback_bytes == 4096  # this time inline
    assert await read(raw_b, 0, 4096) == await read(plain_dev, 0, 4096)


async def test_two_slots_many_tenants_concurrently_every_byte_checked() -> None:
    """More keys than slots, many requests in flight through a striped stack."""
    _, a = engine("a", slots=2)
    _, b = engine("b", slots=2)
    top = stack(["0 8192 striped 2 8 a 0 b 0"], {"a": a, "b": b})
    tenants = [CryptSubmitter(top, key(f"t{i}", XTS, 512)) for i in range(6)]
    region = 4096 * 100 // 6 // 4096 * 4096

    async def work(i: int, t: CryptSubmitter) -> None:
        base = i * region
        blobs = [os.urandom(4096) for _ in range(region // 4096)]
        await asyncio.gather(*(write(t, base + j * 4096, d) for j, d in enumerate(blobs)))
        for j, d in enumerate(blobs):
            assert await read(t, base + j * 4096, 4096) == d

    await asyncio.wait_for(asyncio.gather(*(work(i, t) for i, t in enumerate(tenants))), 60)
    assert isinstance(a, InlineCryptoDevice) and a.keyslots is not None
    assert a.keyslots.stats.programs >= 6  # more keys than slots: keys were swapped in and out
