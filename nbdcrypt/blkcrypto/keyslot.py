"""The keyslot manager: a fixed number of slots, keys programmed into them on demand.

Semantics of block/blk-crypto-profile.c, with one strengthening: waiters are served in FIFO
order. `get_slot` reuses a slot already holding the key (a hit); else programs the least
recently used idle slot; else waits. A slot is held (refcounted) while requests using it are
in flight and becomes idle at the last `put_slot`. A released slot goes straight to the oldest
waiter (programmed with its key), so a stream of hits on other keys can never starve it.
Evicting a key that is in use fails with EBUSY. The manager never sees what a key is used for;
the engine it drives (the `program` and `evict` callbacks) sees slot numbers and keys only.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from nbdcrypt.blkcrypto.key import CryptoKey


@dataclass
class KeyslotStats:
    """Counters per device, as the metrics and `ctl status` show them."""

    hits: int = 0
    programs: int = 0
    evictions: int = 0
    waits: int = 0
    wait_seconds: float = 0.0


@dataclass
class _Slot:
    key: CryptoKey | None = None
    refs: int = 0


class KeyslotManager:
    """`num_slots` keyslots of one inline-encryption engine."""

    def __init__(
        self,
        num_slots: int,
        program: Callable[[int, CryptoKey], None],
        evict: Callable[[int, CryptoKey], None],
    ) -> None:
        if num_slots < 1:
            raise ValueError("a keyslot manager needs at least one slot")
        self._slots = [_Slot() for _ in range(num_slots)]
        self._by_key: dict[CryptoKey, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_slots))  # LRU first
        self._waiters: deque[tuple[CryptoKey, asyncio.Future[int]]] = deque()
        self._program = program
        self._evict = evict
        self.stats = KeyslotStats()

    @property
    def num_slots(self) -> int:
        return len(self._slots)

    def slot_of(self, key: CryptoKey) -> int | None:
        return self._by_key.get(key)

    def in_use(self, key: CryptoKey) -> bool:
        slot = self._by_key.get(key)
        return slot is not None and self._slots[slot].refs > 0

    async def get_slot(self, key: CryptoKey) -> int:
        """A slot holding `key`, held for the caller until put_slot()."""
        slot = self.try_get_slot(key)
        if slot is not None:
            return slot
        return await self._wait(key)

    def try_get_slot(self, key: CryptoKey) -> int | None:
        """get_slot() where it need not wait; else None (and nothing is counted)."""
        slot = self._by_key.get(key)
        if slot is not None:
            self._hold(slot)
            self.stats.hits += 1
            return slot
        if self._idle and not self._waiters:
            slot = next(iter(self._idle))
            self._program_into(slot, key)
            self._hold(slot)
            return slot
        return None

    async def _wait(self, key: CryptoKey) -> int:
        self.stats.waits += 1
        started = time.monotonic()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append((key, future))
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.put_slot(future.result())  # handed a slot just as we were cancelled
            else:
                self._waiters = deque(w for w in self._waiters if w[1] is not future)
            raise
        finally:
            self.stats.wait_seconds += time.monotonic() - started

    def put_slot(self, slot: int) -> None:
        """Release a hold; at the last one the slot is idle, or goes to the oldest waiter."""
        entry = self._slots[slot]
        entry.refs -= 1
        if entry.refs:
            return
        self._idle[slot] = None  # most recently used: the end of the LRU order
        if self._waiters:
            self._hand_over(slot)

    def _hand_over(self, slot: int) -> None:
        key, future = self._waiters.popleft()
        while future.done():  # cancelled while waiting
            if not self._waiters:
                return
            key, future = self._waiters.popleft()
        self._program_into(slot, key)
        self._hold(slot)
        future.set_result(slot)
        # Later waiters for the same key share the slot now rather than wait for another.
        for other_key, other in list(self._waiters):
            if other_key is key and not other.done():
                self._waiters.remove((other_key, other))
                self._hold(slot)
                self.stats.hits += 1
                other.set_result(slot)

    def _hold(self, slot: int) -> None:
        entry = self._slots[slot]
        if entry.refs == 0:
            self._idle.pop(slot, None)
        entry.refs += 1

    def _program_into(self, slot: int, key: CryptoKey) -> None:
        entry = self._slots[slot]
        if entry.key is not None:
            del self._by_key[entry.key]
            self._evict(slot, entry.key)
            self.stats.evictions += 1
        self._program(slot, key)
        entry.key = key
        self._by_key[key] = slot
        self.stats.programs += 1

    def evict_key(self, key: CryptoKey) -> bool:
        """Remove `key` from its slot: False if it held none; OSError(EBUSY) if it is in use."""
        slot = self._by_key.get(key)
        if slot is None:
            return False
        entry = self._slots[slot]
        if entry.refs:
            raise OSError(errno.EBUSY, f"key {key.key_id} is in use in keyslot {slot}")
        del self._by_key[key]
        entry.key = None
        self._evict(slot, key)
        self.stats.evictions += 1
        self._idle.move_to_end(slot, last=False)  # an empty slot is the first to reuse
        if self._waiters:
            self._hand_over(slot)
        return True

    def reprogram_all(self) -> None:
        """Program every slot's key again (the engine lost its state, e.g. after a reset)."""
        for slot, entry in enumerate(self._slots):
            if entry.key is not None:
                self._program(slot, entry.key)

    def keys(self) -> list[CryptoKey]:
        return list(self._by_key)
