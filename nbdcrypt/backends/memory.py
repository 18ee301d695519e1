"""A sparse in-memory device: pages exist only where something non-trivial was written."""

from __future__ import annotations

from nbdcrypt.device import Device, DeviceCaps
from nbdcrypt.request import EXTENT_DATA, EXTENT_HOLE, EXTENT_ZERO, Extent, Request

PAGE = 64 * 1024


class MemoryDevice(Device):
    """Contents vanish with the process; FLUSH has nothing to do, so multi-conn is safe."""

    caps = DeviceCaps(
        can_trim=True, can_zero=True, can_fast_zero=True, can_multi_conn=True, can_extents=True
    )

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._pages: dict[int, bytearray] = {}

    def _spans(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """(page index, offset in page, length, offset in request) for each page touched."""
        spans = []
        pos, end = offset, offset + length
        while pos < end:
            index, start = divmod(pos, PAGE)
            n = min(PAGE - start, end - pos)
            spans.append((index, start, n, pos - offset))
            pos += n
        return spans

    async def read(self, req: Request) -> bytes | bytearray | memoryview:
        out = bytearray(req.length)
        pages = self._pages
        for index, start, n, at in self._spans(req.offset, req.length):
            page = pages.get(index)
            if page is not None:
                out[at : at + n] = page[start : start + n]
        return out

    async def write(self, req: Request) -> None:
        data = memoryview(req.data) if req.data is not None else memoryview(b"")
        pages = self._pages
        for index, start, n, at in self._spans(req.offset, req.length):
            page = pages.get(index)
            if page is None:
                page = pages[index] = bytearray(PAGE)
            page[start : start + n] = data[at : at + n]

    async def flush(self) -> None:
        return None

    async def trim(self, req: Request) -> None:
        await self.write_zeroes(req)

    async def write_zeroes(self, req: Request) -> None:
        pages = self._pages
        for index, start, n, _ in self._spans(req.offset, req.length):
            if n == PAGE:
                pages.pop(index, None)
            elif (page := pages.get(index)) is not None:
                page[start : start + n] = bytes(n)

    async def block_status(self, req: Request) -> list[Extent]:
        extents: list[Extent] = []
        for index, _, n, _ in self._spans(req.offset, req.length):
            flags = EXTENT_DATA if index in self._pages else EXTENT_HOLE | EXTENT_ZERO
            if extents and extents[-1].flags == flags:
                extents[-1] = Extent(extents[-1].length + n, flags)
            else:
                extents.append(Extent(n, flags))
        return extents
