"""Where a crypt context is attached to requests, and where the fallback steps in.

Like the kernel's blk_crypto_bio_prep(): every request submitted through a CryptSubmitter gets
the context (key, DUN = offset / data unit size). If the device it is submitted to can do that
context inline (its crypto profile supports the key), the request goes down with it; otherwise
the blk-crypto fallback encrypts (writes) or decrypts (reads) it here in software, and the
request goes down plain. Both paths use the same cipher, so both write the same ciphertext.
The check is made per request, so a table resumed with more capabilities switches a running
connection from the fallback to inline.
"""

from __future__ import annotations

import errno
from dataclasses import replace
from functools import partial

from nbdcrypt.blkcrypto.cipher import UnitCipher
from nbdcrypt.blkcrypto.key import CryptContext, CryptoKey
from nbdcrypt.device import NOTHING_HELD, Device, DeviceCaps, Sealing, SealTarget
from nbdcrypt.request import EXTENT_ZERO, Extent, Op, ReqFlag, Request


class CryptSubmitter(Device):
    """`device` seen through one key: what a connection with a key context talks to."""

    def __init__(self, device: Device, key: CryptoKey) -> None:
        self.device = device
        self.key = key
        self.name = device.name
        self.unit = key.data_unit_size
        self._fallback: UnitCipher | None = None
        # A write the connection thread may encrypt and land itself: an inline engine right
        # over a file, or the fallback right over one (server/threaded.py, "Sealed writes").
        self.seals = UnitCipher.encrypts_in_place(key) and (
            device.inline_seals or device.file_target(0, 0) is not None
        )

    @property
    def size(self) -> int:  # type: ignore[override]
        return self.device.size

    @property
    def caps(self) -> DeviceCaps:  # type: ignore[override]
        caps = self.device.caps
        return replace(caps, can_fast_zero=False, block_size=max(caps.block_size, self.unit))

    def _inline(self) -> bool:
        return self.device.crypto_caps.supports(self.key)

    def _cipher(self) -> UnitCipher:
        if self._fallback is None:
            self._fallback = UnitCipher(self.key)
        return self._fallback

    def _context(self, offset: int) -> CryptContext:
        if offset % self.unit:
            raise OSError(errno.EINVAL, f"offset not aligned to the {self.unit}-byte data unit")
        return CryptContext(self.key, offset // self.unit)

    async def read(self, req: Request) -> bytes | bytearray | memoryview:
        ctx = self._context(req.offset)
        if self._inline():
            return await self.device.read(req.with_crypt(ctx))
        data = await self.device.read(req.fallback_encrypted(None))
        self.device.fallback_bytes += req.length
        return self._cipher().decrypt(ctx.dun, data)

    async def write(self, req: Request) -> None:
        ctx = self._context(req.offset)
        if self._inline():
            await self.device.write(req.with_crypt(ctx))
            return
        assert req.data is not None
        data = self._cipher().encrypt(ctx.dun, req.data)
        self.device.fallback_bytes += req.length
        await self.device.write(req.fallback_encrypted(data))

    def seal_target(self, offset: int, length: int) -> SealTarget | None:
        """write()'s work for its caller to do: the device's inline engine, or the fallback,
        prepares the encryption, and the ciphertext's place in the file is given."""
        unit = self.unit
        if not self.seals or (offset | length) % unit:
            return None  # misaligned: write() gives the client its EINVAL
        dun = offset // unit
        device = self.device
        if self._inline():
            return device.inline_seal_target(self.key, dun, offset, length)
        landing = device.file_target(offset, length)
        if landing is None:
            return None
        return SealTarget(landing[0], landing[1], partial(self._begin_fallback, dun, length))

    def _begin_fallback(self, dun: int, length: int) -> Sealing | None:
        encrypt = self._cipher().encrypt_in_place(dun, length)
        if encrypt is None:
            return None
        self.device.fallback_bytes += length
        return Sealing(encrypt, NOTHING_HELD)

    async def write_zeroes(self, req: Request) -> None:
        ctx = self._context(req.offset)
        if req.flags & ReqFlag.FAST_ZERO:
            raise OSError(errno.ENOTSUP, "encrypted zeroes must be written")
        if self._inline():
            await self.device.write_zeroes(req.with_crypt(ctx))
            return
        for at, data in self._cipher().zeroes(ctx.dun, req.length):
            self.device.fallback_bytes += len(data)
            piece = Request(Op.WRITE, req.offset + at, len(data), req.flags, data, encrypted=True)
            await self.device.write(piece)

    async def trim(self, req: Request) -> None:
        await self.device.trim(req)

    async def flush(self) -> None:
        await self.device.flush()

    async def cache(self, req: Request) -> None:
        await self.device.cache(req)

    async def block_status(self, req: Request) -> list[Extent]:
        extents = await self.device.block_status(req)
        return [Extent(e.length, e.flags & ~EXTENT_ZERO) for e in extents]  # zeroes below: not ours

    async def evict_key(self, key: CryptoKey) -> None:
        await self.device.evict_key(key)
