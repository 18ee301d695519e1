"""An inline-encryption engine in front of a device's storage, like UFS or eMMC inline crypto.

Requests that carry a crypt context are encrypted on the way down and decrypted on the way up
by the engine; requests without one pass untouched. With keyslots (`num_slots` > 0) a request
first gets a slot from the keyslot manager and holds it until it completes, and the engine
works from what was programmed into that slot: it never sees a key with a request, as hardware
would not. With no keyslots the engine takes the raw key with each request (like Exynos FMP),
and reprogramming keys has nothing to do.
"""

from __future__ import annotations

import errno
from dataclasses import replace
from functools import partial

from nbdcrypt.blkcrypto.cipher import UnitCipher
from nbdcrypt.blkcrypto.key import CryptoKey
from nbdcrypt.blkcrypto.keyslot import KeyslotManager, KeyslotStats
from nbdcrypt.blkcrypto.profile import CryptoCaps
from nbdcrypt.device import NOTHING_HELD, Device, Sealing, SealTarget
from nbdcrypt.request import EXTENT_ZERO, Extent, Op, ReqFlag, Request


class InlineCryptoDevice(Device):
    """`inner` with an inline-encryption engine of `caps` and `num_slots` keyslots."""

    def __init__(self, inner: Device, caps: CryptoCaps, num_slots: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.size = inner.size
        # Holes below read as zeroes of ciphertext: never report ZERO for encrypted data.
        self.caps = replace(inner.caps, can_fast_zero=False)
        self.crypto_caps = caps
        self._slot_ciphers: dict[int, UnitCipher] = {}
        self._raw_ciphers: dict[CryptoKey, UnitCipher] = {}  # keyslot-less: per-key state
        self.keyslots = (
            KeyslotManager(num_slots, self._program, self._evict) if num_slots > 0 else None
        )
        self.requests = 0  # requests the engine en/decrypted (for keyslot-less engines too)
        self.inline_seals = inner.file_target(0, 0) is not None  # straight over a file

    @property
    def stats(self) -> KeyslotStats:
        return self.keyslots.stats if self.keyslots is not None else KeyslotStats()

    # The engine's registers -----------------------------------------------------------------

    def _program(self, slot: int, key: CryptoKey) -> None:
        self._slot_ciphers[slot] = UnitCipher(key)

    def _evict(self, slot: int, key: CryptoKey) -> None:
        del self._slot_ciphers[slot]

    async def evict_key(self, key: CryptoKey) -> None:
        if self.keyslots is not None:
            self.keyslots.evict_key(key)
        else:
            self._raw_ciphers.pop(key, None)

    def holds_key(self, key: CryptoKey) -> bool:
        """Whether `key` is programmed into a keyslot (or cached, without keyslots)."""
        if self.keyslots is not None:
            return self.keyslots.slot_of(key) is not None
        return key in self._raw_ciphers

    def reprogram_all(self) -> None:
        """Program every slot again (after an engine reset); nothing to do without slots."""
        if self.keyslots is not None:
            self.keyslots.reprogram_all()

    # I/O --------------------------------------------------------------------------------------

    async def _acquire(self, req: Request) -> tuple[UnitCipher, int | None]:
        ctx = req.crypt
        assert ctx is not None
        key = ctx.key
        if not self.crypto_caps.supports(key):
            raise OSError(errno.EIO, f"device {self.name}: no inline support for key {key.key_id}")
        unit = key.data_unit_size
        if req.length % unit:  # like bio_crypt_check_alignment: whole data units, any offset
            raise OSError(errno.EINVAL, f"{req.length} bytes is not whole {unit}-byte data units")
        self.requests += 1
        if self.keyslots is None:
            cipher = self._raw_ciphers.get(key)
            if cipher is None:
                cipher = self._raw_ciphers[key] = UnitCipher(key)
            return cipher, None
        slot = await self.keyslots.get_slot(key)
        return self._slot_ciphers[slot], slot

    def inline_seal_target(
        self, key: CryptoKey, dun: int, offset: int, length: int
    ) -> SealTarget | None:
        """A write of `key` at `dun` its caller encrypts in place and writes to the file below
        itself; None where write() must run (no support for the key). Its keyslot is taken
        by begin() (_begin_seal) only if it need not wait; how long the caller may hold it
        while the payload arrives is bounded there (server/threaded.py, STALL_MS)."""
        if not self.inline_seals or not self.crypto_caps.supports(key):
            return None
        if length % key.data_unit_size or not UnitCipher.encrypts_in_place(key):
            return None
        landing = self.inner.file_target(offset, length)
        if landing is None:
            return None
        return SealTarget(landing[0], landing[1], partial(self._begin_seal, key, dun, length))

    def _begin_seal(self, key: CryptoKey, dun: int, length: int) -> Sealing | None:
        """A keyslot got without waiting, and the request's encryption prepared with it;
        None (nothing held) if the slot is only to be had after a wait."""
        keyslots = self.keyslots
        if keyslots is None:
            cipher = self._raw_ciphers.get(key)
            if cipher is None:
                cipher = self._raw_ciphers[key] = UnitCipher(key)
            slot = None
        else:
            slot = keyslots.try_get_slot(key)
            if slot is None:
                return None
            cipher = self._slot_ciphers[slot]
        encrypt = cipher.encrypt_in_place(dun, length)
        if encrypt is None:
            self._release(slot)
            return None
        self.requests += 1
        return Sealing(encrypt, NOTHING_HELD if slot is None else partial(self._release, slot))

    def _release(self, slot: int | None) -> None:
        if slot is not None and self.keyslots is not None:
            self.keyslots.put_slot(slot)

    async def read(self, req: Request) -> bytes | bytearray | memoryview:
        ctx = req.crypt
        if ctx is None:
            return await self.inner.read(req)
        cipher, slot = await self._acquire(req)
        try:
            data = await self.inner.read(Request(Op.READ, req.offset, req.length, req.flags))
            return cipher.decrypt(ctx.dun, data)
        finally:
            self._release(slot)

    async def write(self, req: Request) -> None:
        ctx = req.crypt
        if ctx is None:
            await self.inner.write(req)
            return
        assert req.data is not None
        cipher, slot = await self._acquire(req)
        try:
            data = cipher.encrypt(ctx.dun, req.data)
            await self.inner.write(Request(Op.WRITE, req.offset, req.length, req.flags, data))
        finally:
            self._release(slot)

    async def write_zeroes(self, req: Request) -> None:
        """With a context, zeroes are written encrypted: a hole below would read as garbage."""
        ctx = req.crypt
        if ctx is None:
            await self.inner.write_zeroes(req)
            return
        if req.flags & ReqFlag.FAST_ZERO:
            raise OSError(errno.ENOTSUP, "encrypted zeroes must be written")
        cipher, slot = await self._acquire(req)
        try:
            for at, data in cipher.zeroes(ctx.dun, req.length):
                await self.inner.write(
                    Request(Op.WRITE, req.offset + at, len(data), req.flags, data)
                )
        finally:
            self._release(slot)

    async def trim(self, req: Request) -> None:
        await self.inner.trim(Request(Op.TRIM, req.offset, req.length, req.flags))

    async def flush(self) -> None:
        await self.inner.flush()

    async def cache(self, req: Request) -> None:
        await self.inner.cache(Request(Op.CACHE, req.offset, req.length, req.flags))

    async def block_status(self, req: Request) -> list[Extent]:
        extents = await self.inner.block_status(Request(Op.BLOCK_STATUS, req.offset, req.length))
        if req.crypt is None:
            return extents
        return [Extent(e.length, e.flags & ~EXTENT_ZERO) for e in extents]  # holes aren't zeroes

    def close(self) -> None:
        self.inner.close()
