"""The keyslot manager and crypto capabilities, by the kernel's rules (blk-crypto-profile.c)."""

from __future__ import annotations

import asyncio
import errno
import random

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdcrypt.blkcrypto.key import CryptoKey, CryptoKeyError, CryptoMode, parse_mode
from nbdcrypt.blkcrypto.keyslot import KeyslotManager
from nbdcrypt.blkcrypto.profile import CryptoCaps

XTS = CryptoMode.AES_256_XTS
CBC = CryptoMode.AES_128_CBC_ESSIV


def reference_encrypt(k: CryptoKey, dun: int, data: bytes) -> bytes:
    """One cryptography call per data unit, IV = DUN little-endian (ESSIV for CBC)."""
    raw, out = bytes(k.raw), bytearray()
    unit = k.data_unit_size
    for i in range(0, len(data), unit):
        iv = (dun + i // unit).to_bytes(16, "little")
        if k.mode is XTS:
            mode: modes.XTS | modes.CBC = modes.XTS(iv)
        else:
            digest = hashes.Hash(hashes.SHA256())
            digest.update(raw)
            essiv = Cipher(algorithms.AES(digest.finalize()), modes.ECB()).encryptor()
            mode = modes.CBC(essiv.update(iv))
        enc = Cipher(algorithms.AES(raw), mode).encryptor()
        out += enc.update(data[i : i + unit]) + enc.finalize()
    return bytes(out)


def key(name: str, mode: CryptoMode = XTS, dus: int = 4096) -> CryptoKey:
    return CryptoKey(name, mode, dus, 8, bytearray(random.randbytes(mode.key_size)))


class Engine:
    """A fake engine that records what the manager programs: slot -> key."""

    def __init__(self) -> None:
        self.slots: dict[int, CryptoKey] = {}
        self.log: list[tuple[str, int, str]] = []

    def program(self, slot: int, k: CryptoKey) -> None:
        self.slots[slot] = k
        self.log.append(("program", slot, k.key_id))

    def evict(self, slot: int, k: CryptoKey) -> None:
        assert self.slots.pop(slot) is k
        self.log.append(("evict", slot, k.key_id))


def manager(n: int) -> tuple[KeyslotManager, Engine]:
    engine = Engine()
    return KeyslotManager(n, engine.program, engine.evict), engine


async def test_reuse_program_lru_and_hits() -> None:
    ksm, engine = manager(2)
    a, b, c = key("a"), key("b"), key("c")
    sa = await ksm.get_slot(a)
    sa2 = await ksm.get_slot(a)
    assert sa == sa2 and ksm.stats.hits == 1 and ksm.stats.programs == 1
    sb = await ksm.get_slot(b)
    assert sb != sa
    ksm.put_slot(sa)
    ksm.put_slot(sa)
    ksm.put_slot(sb)
    # a was released before b: it is the least recently used, so c replaces a
    sc = await ksm.get_slot(c)
    assert sc == sa and engine.slots == {sa: c, sb: b}
    assert ksm.slot_of(a) is None and ksm.stats.evictions == 1


async def test_waiters_are_served_fifo_and_same_key_waiters_share() -> None:
    ksm, engine = manager(1)
    a, b, c = key("a"), key("b"), key("c")
    held = await ksm.get_slot(a)
    order: list[str] = []

    async def use(k: CryptoKey) -> None:
        slot = await ksm.get_slot(k)
        order.append(k.key_id)
        await asyncio.sleep(0)
        ksm.put_slot(slot)

    tasks = [asyncio.create_task(use(k)) for k in (b, c, b)]
    await asyncio.sleep(0.01)
    assert ksm.stats.waits == 3 and not order
    # hits on the key that is programmed do not jump the queue of other keys
    extra = await ksm.get_slot(a)
    ksm.put_slot(extra)
    ksm.put_slot(held)
    await asyncio.gather(*tasks)
    assert order == ["b", "b", "c"]  # b came first; the second b shared its slot
    assert engine.slots == {0: c}


async def test_try_get_slot_never_waits_nor_jumps_the_queue() -> None:
    """What a sealed write uses (the connection thread cannot await): a slot where get_slot
    would not wait, counted the same; else None, with nothing counted or programmed."""
    ksm, engine = manager(1)
    a, b = key("a"), key("b")
    slot = ksm.try_get_slot(a)
    assert slot == 0 and ksm.try_get_slot(a) == 0 and ksm.stats.hits == 1
    assert ksm.try_get_slot(b) is None and ksm.stats.waits == 0 and engine.slots == {0: a}
    ksm.put_slot(0)
    waiter = asyncio.create_task(ksm.get_slot(b))  # a held once more: b waits for the slot
    await asyncio.sleep(0.01)
    assert ksm.try_get_slot(b) is None  # the waiter is first in line
    ksm.put_slot(0)
    assert await waiter == 0 and engine.slots == {0: b}
    ksm.put_slot(0)
    assert ksm.try_get_slot(a) == 0 and ksm.stats.evictions == 2


async def test_evicting_a_key_in_use_is_ebusy() -> None:
    ksm, engine = manager(2)
    a = key("a")
    slot = await ksm.get_slot(a)
    with pytest.raises(OSError) as err:
        ksm.evict_key(a)
    assert err.value.errno == errno.EBUSY
    assert "a" in str(err.value) and bytes(a.raw).hex() not in str(err.value)
    ksm.put_slot(slot)
    assert ksm.evict_key(a) is True
    assert engine.slots == {} and ksm.evict_key(a) is False


async def test_reprogram_all_programs_every_held_key_again() -> None:
    ksm, engine = manager(3)
    for name in "ab":
        ksm.put_slot(await ksm.get_slot(key(name)))
    engine.log.clear()
    ksm.reprogram_all()
    assert sorted(e[2] for e in engine.log) == ["a", "b"]


async def test_cancelled_waiter_does_not_leak_its_slot() -> None:
    ksm, _ = manager(1)
    a, b, c = key("a"), key("b"), key("c")
    held = await ksm.get_slot(a)
    waiter = asyncio.create_task(ksm.get_slot(b))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    ksm.put_slot(held)
    slot = await asyncio.wait_for(ksm.get_slot(c), 1)
    assert ksm.slot_of(c) == slot


@settings(max_examples=60, deadline=None)
@given(
    slots=st.integers(1, 4),
    keys=st.integers(1, 8),
    requests=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 3)), min_size=1, max_size=60),
)
def test_many_requests_more_keys_than_slots_all_complete(
    slots: int, keys: int, requests: list[tuple[int, int]]
) -> None:
    """Concurrent requests over more keys than slots: no deadlock, every slot holds the key of
    the request using it, and the counters add up."""

    async def run() -> None:
        ksm, engine = manager(slots)
        pool = [key(f"k{i}") for i in range(keys)]
        done = 0

        async def request(k: CryptoKey, yields: int) -> None:
            nonlocal done
            slot = await ksm.get_slot(k)
            for _ in range(yields):
                assert engine.slots[slot] is k  # never reprogrammed while held
                await asyncio.sleep(0)
            ksm.put_slot(slot)
            done += 1

        await asyncio.wait_for(
            asyncio.gather(*(request(pool[i % keys], y) for i, y in requests)), 10
        )
        assert done == len(requests)
        stats = ksm.stats
        assert stats.hits + stats.programs == len(requests)
        assert stats.programs - stats.evictions == len(engine.slots) <= slots

    asyncio.run(run())


def test_caps_intersection_cover_and_lacks() -> None:
    full = CryptoCaps.of({XTS: (512, 4096), CBC: (512,)}, 8)
    small = CryptoCaps.of({XTS: (4096,)}, 4)
    both = full & small
    assert both == CryptoCaps.of({XTS: (4096,)}, 4)
    assert full.covers(small) and not small.covers(full)
    assert small.lacks(full) == [
        "aes-128-cbc-essiv with 512-byte data units",
        "aes-256-xts with 512-byte data units",
        "8-byte DUNs (has 4)",
    ]
    assert full.supports(key("x", XTS, 512)) and not small.supports(key("y", XTS, 512))
    assert not CryptoCaps.none() and CryptoCaps.none().describe() == "none"
    assert full.describe() == "aes-128-cbc-essiv [512], aes-256-xts [512 4096]; DUN up to 8 bytes"


def test_key_validation_and_secrecy() -> None:
    k = key("tenant-a")
    assert bytes(k.raw).hex() not in repr(k)
    with pytest.raises(CryptoKeyError, match="64-byte key"):
        CryptoKey("bad", XTS, 4096, 8, bytearray(32))
    with pytest.raises(CryptoKeyError, match="data unit size"):
        CryptoKey("bad", XTS, 768, 8, bytearray(64))
    with pytest.raises(CryptoKeyError, match="Adiantum is not implemented"):
        parse_mode("adiantum")
    k.wipe()
    assert k.raw == bytearray(64)
