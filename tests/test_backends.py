"""The two backends, FileDevice and MemoryDevice, against the Device contract.

What a device must do is the NBD semantics it serves: reads return what was written, TRIM and
WRITE_ZEROES read back as zeroes (TRIM is advisory in the spec, but both backends do zero),
NO_HOLE keeps the range allocated, FAST_ZERO fails fast with ENOTSUP rather than write
zeroes, FUA and FLUSH make data durable, and block_status extents cover the range in order and
never claim ZERO for bytes that are not zero. A property test runs random operations on both
backends next to a bytearray and compares every read.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import random
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nbdcrypt.backends.file as file_backend
from nbdcrypt.backends.file import BackingFileError, FileDevice, file_extents
from nbdcrypt.backends.memory import PAGE, MemoryDevice
from nbdcrypt.device import Device
from nbdcrypt.request import Extent, Op, ReqFlag, Request

SIZE = 1 << 20
HOLE = 1  # NBD_STATE_HOLE
ZERO = 2  # NBD_STATE_ZERO
HOLE_ZERO = HOLE | ZERO
BS = 4096  # the filesystem block size the file tests assume for exact extents

# fallocate(2) modes from linux/falloc.h, to ask the filesystem what it can do
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fs_can(directory: Path, mode: int) -> bool:
    """Whether the filesystem of `directory` supports this fallocate mode."""
    fd, name = tempfile.mkstemp(dir=directory)
    try:
        os.pwrite(fd, b"x" * 2 * BS, 0)
        return bool(_libc.fallocate(fd, mode | FALLOC_FL_KEEP_SIZE, 0, BS) == 0)
    finally:
        os.close(fd)
        os.unlink(name)


def fs_block(directory: Path) -> int:
    return os.statvfs(directory).f_bsize


# Helpers ----------------------------------------------------------------------------------------


def rq(
    op: Op,
    offset: int,
    length: int,
    flags: ReqFlag = ReqFlag.NONE,
    data: bytes | bytearray | memoryview | None = None,
) -> Request:
    return Request(op, offset, length, flags, data)


async def read(dev: Device, offset: int, length: int) -> bytes:
    data = await dev.read(rq(Op.READ, offset, length))
    assert len(data) == length
    return bytes(data)


async def write(dev: Device, offset: int, data: bytes, flags: ReqFlag = ReqFlag.NONE) -> None:
    await dev.write(rq(Op.WRITE, offset, len(data), flags, data))


async def extents(dev: Device, offset: int, length: int) -> list[tuple[int, int, int]]:
    """block_status as (start, end, flags), checked to cover [offset, ...) in order."""
    got = await dev.block_status(rq(Op.BLOCK_STATUS, offset, length))
    assert got, "block_status must describe at least one byte"
    out = []
    pos = offset
    for ext in got:
        assert isinstance(ext, Extent)
        assert ext.length > 0, got
        assert ext.flags & ~HOLE_ZERO == 0, got
        out.append((pos, pos + ext.length, ext.flags))
        pos += ext.length
    assert pos <= offset + length, "extents past the requested range"
    return out


def check_extents(spans: list[tuple[int, int, int]], model: bytes | bytearray) -> None:
    """Nothing reported ZERO may hold a non-zero byte."""
    for start, end, flags in spans:
        if flags & ZERO:
            assert not any(model[start:end]), f"[{start}, {end}) reported zero but is not"


def blocks(path: Path) -> int:
    return os.stat(path).st_blocks


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[FileDevice]:
    dev = FileDevice("disk", tmp_path / "disk.img", SIZE, create=True)
    yield dev
    dev.close()


@pytest.fixture(params=["file", "memory"])
def device(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Device]:
    dev: Device
    if request.param == "file":
        dev = FileDevice("disk", tmp_path / "disk.img", SIZE, create=True)
    else:
        dev = MemoryDevice("mem", SIZE)
    yield dev
    dev.close()


# FileDevice: opening ----------------------------------------------------------------------------


def test_create_makes_a_sparse_file(tmp_path: Path) -> None:
    path = tmp_path / "var" / "lib" / "disk.img"
    dev = FileDevice("disk", path, SIZE, create=True)
    try:
        st_ = os.stat(path)
        assert st_.st_size == SIZE
        assert st_.st_blocks == 0
        assert stat.S_IMODE(st_.st_mode) == 0o600
        assert dev.size == SIZE
    finally:
        dev.close()


@pytest.mark.parametrize("create", [True, False])
def test_reopen_with_the_same_size(tmp_path: Path, create: bool) -> None:
    path = tmp_path / "disk.img"
    FileDevice("disk", path, SIZE, create=True).close()
    path.write_bytes(b"keep" + bytes(SIZE - 4))
    dev = FileDevice("disk", path, SIZE, create=create)
    try:
        assert os.pread(dev.fd, 4, 0) == b"keep"  # an existing file is never truncated
    finally:
        dev.close()


@pytest.mark.parametrize("create", [True, False])
@pytest.mark.parametrize("actual", [0, SIZE - 1, SIZE + 1])
def test_reopen_with_a_wrong_size(tmp_path: Path, create: bool, actual: int) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(actual))
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(BackingFileError) as info:
        FileDevice("disk", path, SIZE, create=create)
    assert str(path) in str(info.value)
    assert str(actual) in str(info.value)
    assert len(os.listdir("/proc/self/fd")) == fds, "the descriptor leaked"
    assert path.stat().st_size == actual  # left alone


def test_missing_file_without_create(tmp_path: Path) -> None:
    path = tmp_path / "nope.img"
    with pytest.raises(BackingFileError) as info:
        FileDevice("disk", path, SIZE)
    assert str(path) in str(info.value)
    assert not path.exists()


def test_close_twice(tmp_path: Path) -> None:
    dev = FileDevice("disk", tmp_path / "d.img", SIZE, create=True)
    dev.close()
    dev.close()
    assert dev.fd == -1


def test_capabilities() -> None:
    for caps in (FileDevice.caps, MemoryDevice.caps):
        assert caps.can_trim and caps.can_zero and caps.can_fast_zero and caps.can_extents
    assert FileDevice.caps.can_cache


# Both devices: reads and writes -----------------------------------------------------------------


async def test_a_new_device_reads_zeroes(device: Device) -> None:
    assert await read(device, 0, SIZE) == bytes(SIZE)
    assert await extents(device, 0, SIZE) == [(0, SIZE, HOLE_ZERO)]


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 1),
        (1, 10),
        (BS - 3, 7),
        (PAGE - 1, 2),
        (PAGE - 100, PAGE + 200),
        (3 * BS + 17, 5 * BS + 3),
        (SIZE - 9, 9),
        (0, SIZE),
    ],
)
async def test_write_read_round_trip(device: Device, offset: int, length: int) -> None:
    model = bytearray(SIZE)
    data = random.Random(offset * 31 + length).randbytes(length)
    await write(device, offset, data)
    model[offset : offset + length] = data
    assert await read(device, offset, length) == data
    assert await read(device, 0, SIZE) == model
    # unaligned windows around the write
    lo, hi = max(0, offset - 5), min(SIZE, offset + length + 5)
    assert await read(device, lo, hi - lo) == model[lo:hi]


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
async def test_write_takes_any_buffer(device: Device, kind: type) -> None:
    data = kind(b"abcdef")
    await device.write(rq(Op.WRITE, 100, 6, data=data))
    assert await read(device, 99, 8) == b"\0abcdef\0"


async def test_overlapping_writes(device: Device) -> None:
    await write(device, 0, b"a" * 100)
    await write(device, 50, b"b" * 100)
    await write(device, 25, b"c" * 10)
    assert await read(device, 0, 151) == b"a" * 25 + b"c" * 10 + b"a" * 15 + b"b" * 100 + b"\0"


async def test_split_request_data_is_written_where_it_belongs(device: Device) -> None:
    data = bytes(range(200))
    head, tail = rq(Op.WRITE, 1000, 200, data=data).split(64)
    await device.write(tail)
    await device.write(head)
    assert await read(device, 1000, 200) == data


# Both devices: trim, write_zeroes, flush, cache -------------------------------------------------


@pytest.mark.parametrize("flags", [ReqFlag.NONE, ReqFlag.FUA])
async def test_trim_reads_back_zeroes(device: Device, flags: ReqFlag) -> None:
    await write(device, 0, b"\xaa" * (4 * PAGE))
    await device.trim(rq(Op.TRIM, PAGE, 2 * PAGE, flags))
    assert await read(device, 0, 4 * PAGE) == b"\xaa" * PAGE + bytes(2 * PAGE) + b"\xaa" * PAGE
    spans = await extents(device, 0, 4 * PAGE)
    assert (PAGE, 3 * PAGE, HOLE_ZERO) in spans  # an aligned trim leaves a hole


async def test_unaligned_trim_zeroes_exactly_its_range(device: Device) -> None:
    await write(device, 0, b"\xaa" * (2 * PAGE))
    await device.trim(rq(Op.TRIM, 10, PAGE + 7))
    model = bytearray(b"\xaa" * (2 * PAGE))
    model[10 : PAGE + 17] = bytes(PAGE + 7)
    assert await read(device, 0, 2 * PAGE) == model
    check_extents(await extents(device, 0, 2 * PAGE), model)


@pytest.mark.parametrize(
    "flags",
    [
        ReqFlag.NONE,
        ReqFlag.NO_HOLE,
        ReqFlag.FAST_ZERO,
        ReqFlag.FUA,
        ReqFlag.NO_HOLE | ReqFlag.FUA,
        ReqFlag.NO_HOLE | ReqFlag.FAST_ZERO | ReqFlag.FUA,
    ],
)
@pytest.mark.parametrize(("offset", "length"), [(PAGE, 2 * PAGE), (100, 3 * BS + 5)])
async def test_write_zeroes(device: Device, flags: ReqFlag, offset: int, length: int) -> None:
    model = bytearray(random.Random(1).randbytes(4 * PAGE))
    await write(device, 0, bytes(model))
    try:
        await device.write_zeroes(rq(Op.WRITE_ZEROES, offset, length, flags))
    except OSError as exc:  # allowed only as FAST_ZERO's quick refusal, changing nothing
        assert flags & ReqFlag.FAST_ZERO and exc.errno == errno.ENOTSUP
    else:
        model[offset : offset + length] = bytes(length)
    assert await read(device, 0, 4 * PAGE) == model
    check_extents(await extents(device, 0, 4 * PAGE), model)


async def test_write_zeroes_past_data_and_holes(device: Device) -> None:
    await write(device, 5 * PAGE, b"x")
    await device.write_zeroes(rq(Op.WRITE_ZEROES, 0, SIZE))
    assert await read(device, 0, SIZE) == bytes(SIZE)
    assert all(f == HOLE_ZERO for _, _, f in await extents(device, 0, SIZE))


async def test_flush_and_cache(device: Device) -> None:
    await write(device, 0, b"data")
    await device.flush()
    await device.cache(rq(Op.CACHE, 0, SIZE))
    await device.cache(rq(Op.CACHE, 17, 3))
    assert await read(device, 0, 4) == b"data"


@pytest.mark.parametrize("offset", [0, 100, PAGE - 1, SIZE - 1])
async def test_block_status_of_any_range_covers_it(device: Device, offset: int) -> None:
    await write(device, 3 * PAGE + 10, b"x" * 100)
    for length in (1, 2, PAGE, SIZE - offset):
        if offset + length > SIZE:
            continue
        spans = await extents(device, offset, length)
        assert spans[-1][1] == offset + length, "the whole range is described"


# FileDevice specifics ---------------------------------------------------------------------------


async def test_file_write_and_read_through_the_file(disk: FileDevice) -> None:
    await write(disk, 4097, b"hello")
    await disk.flush()
    with disk.path.open("rb") as f:  # a fresh descriptor
        f.seek(4095)
        assert f.read(9) == b"\0\0hello\0\0"


async def test_fua_write_lands(disk: FileDevice) -> None:
    await write(disk, 12345, b"durable", ReqFlag.FUA)
    fd = os.open(disk.path, os.O_RDONLY)
    try:
        assert os.pread(fd, 7, 12345) == b"durable"
    finally:
        os.close(fd)


async def test_file_trim_punches_a_hole(disk: FileDevice, tmp_path: Path) -> None:
    if not fs_can(tmp_path, FALLOC_FL_PUNCH_HOLE):
        pytest.skip("the filesystem of tmp_path cannot punch holes")
    await write(disk, 0, b"\x55" * (16 * BS))
    await disk.flush()
    before = blocks(disk.path)
    await disk.trim(rq(Op.TRIM, 4 * BS, 8 * BS))
    assert blocks(disk.path) <= before - 8 * BS // 512
    assert await read(disk, 0, 16 * BS) == b"\x55" * (4 * BS) + bytes(8 * BS) + b"\x55" * (4 * BS)
    assert file_extents(disk.fd, 0, 16 * BS, SIZE) == [
        Extent(4 * BS, 0),
        Extent(8 * BS, HOLE_ZERO),
        Extent(4 * BS, 0),
    ]


async def test_file_write_zeroes_may_punch(disk: FileDevice, tmp_path: Path) -> None:
    if not fs_can(tmp_path, FALLOC_FL_PUNCH_HOLE):
        pytest.skip("the filesystem of tmp_path cannot punch holes")
    await write(disk, 0, b"\x55" * (16 * BS))
    await disk.write_zeroes(rq(Op.WRITE_ZEROES, 0, 16 * BS, ReqFlag.FAST_ZERO))
    assert await read(disk, 0, 16 * BS) == bytes(16 * BS)
    assert file_extents(disk.fd, 0, 16 * BS, SIZE) == [Extent(16 * BS, HOLE_ZERO)]


async def test_file_write_zeroes_no_hole_stays_allocated(disk: FileDevice, tmp_path: Path) -> None:
    await write(disk, 0, b"\x55" * (16 * BS))
    await disk.flush()
    before = blocks(disk.path)
    assert before >= 16 * BS // 512
    await disk.write_zeroes(rq(Op.WRITE_ZEROES, 0, 16 * BS, ReqFlag.NO_HOLE))
    assert await read(disk, 0, 16 * BS) == bytes(16 * BS)
    if fs_can(tmp_path, FALLOC_FL_ZERO_RANGE):
        assert blocks(disk.path) >= before, "NO_HOLE must not deallocate"


def _unsupported(*args: object) -> None:
    raise OSError(errno.EOPNOTSUPP, "Operation not supported")


async def test_no_hole_without_zero_range_writes_zeroes(
    disk: FileDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_backend, "zero_range", _unsupported)
    await write(disk, 0, b"\x55" * (16 * BS))
    await disk.flush()
    before = blocks(disk.path)
    await disk.write_zeroes(rq(Op.WRITE_ZEROES, BS, 10 * BS + 3, ReqFlag.NO_HOLE))
    assert await read(disk, 0, 16 * BS) == (
        b"\x55" * BS + bytes(10 * BS + 3) + b"\x55" * (5 * BS - 3)
    )
    assert blocks(disk.path) >= before
    # and again, now that the device knows ZERO_RANGE is missing
    await write(disk, 0, b"\x66" * BS)
    await disk.write_zeroes(rq(Op.WRITE_ZEROES, 0, BS, ReqFlag.NO_HOLE | ReqFlag.FUA))
    assert await read(disk, 0, BS) == bytes(BS)


async def test_fast_zero_fails_fast_when_it_would_write_zeroes(
    disk: FileDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_backend, "zero_range", _unsupported)
    await write(disk, 0, b"\x55" * (4 * BS))
    with pytest.raises(OSError) as info:
        await disk.write_zeroes(rq(Op.WRITE_ZEROES, 0, 4 * BS, ReqFlag.NO_HOLE | ReqFlag.FAST_ZERO))
    assert info.value.errno == errno.ENOTSUP
    assert await read(disk, 0, 4 * BS) == b"\x55" * (4 * BS), "a refused fast zero changes nothing"


async def test_fast_zero_without_any_fallocate(
    disk: FileDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_backend, "zero_range", _unsupported)
    monkeypatch.setattr(file_backend, "punch_hole", _unsupported)
    await write(disk, 0, b"\x55" * (4 * BS))
    with pytest.raises(OSError) as info:
        await disk.write_zeroes(rq(Op.WRITE_ZEROES, 0, 4 * BS, ReqFlag.FAST_ZERO))
    assert info.value.errno == errno.ENOTSUP
    assert await read(disk, 0, 4 * BS) == b"\x55" * (4 * BS)
    # without FAST_ZERO the same request must succeed (by writing zeroes)
    await disk.write_zeroes(rq(Op.WRITE_ZEROES, 0, 4 * BS))
    assert await read(disk, 0, 4 * BS) == bytes(4 * BS)


async def test_trim_without_punch_hole_is_a_harmless_no_op(
    disk: FileDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_backend, "punch_hole", _unsupported)
    await write(disk, 0, b"\x55" * BS)
    await disk.trim(rq(Op.TRIM, 0, BS))  # advisory: no error, contents undefined
    assert len(await read(disk, 0, BS)) == BS


async def test_file_block_status_at_known_offsets(disk: FileDevice, tmp_path: Path) -> None:
    if fs_block(tmp_path) != BS:
        pytest.skip("exact extents assume 4096-byte filesystem blocks")
    await write(disk, 3 * BS + 10, b"x" * 100)  # dirty in the page cache, not flushed
    await write(disk, 10 * BS, b"y" * (2 * BS))
    expected = [
        (0, 3 * BS, HOLE_ZERO),
        (3 * BS, 4 * BS, 0),
        (4 * BS, 10 * BS, HOLE_ZERO),
        (10 * BS, 12 * BS, 0),
        (12 * BS, SIZE, HOLE_ZERO),
    ]
    assert await extents(disk, 0, SIZE) == expected
    # a window that starts and ends inside extents is clipped to the window
    assert await extents(disk, 3 * BS + 5, 8 * BS) == [
        (3 * BS + 5, 4 * BS, 0),
        (4 * BS, 10 * BS, HOLE_ZERO),
        (10 * BS, 11 * BS + 5, 0),
    ]
    assert await extents(disk, 5 * BS, 1) == [(5 * BS, 5 * BS + 1, HOLE_ZERO)]
    assert await extents(disk, 11 * BS, 10) == [(11 * BS, 11 * BS + 10, 0)]


async def test_file_block_status_of_a_full_file(tmp_path: Path) -> None:
    path = tmp_path / "full.img"
    path.write_bytes(b"\1" * (8 * BS))
    dev = FileDevice("full", path, 8 * BS)
    try:
        assert await extents(dev, 0, 8 * BS) == [(0, 8 * BS, 0)]
        assert await extents(dev, 8 * BS - 1, 1) == [(8 * BS - 1, 8 * BS, 0)]
    finally:
        dev.close()


async def test_file_block_status_with_many_extents_stops_early(tmp_path: Path) -> None:
    if fs_block(tmp_path) != BS:
        pytest.skip("exact extents assume 4096-byte filesystem blocks")
    size = 3000 * 2 * BS
    dev = FileDevice("many", tmp_path / "many.img", size, create=True)
    try:
        for i in range(3000):
            os.pwrite(dev.fd, b"d", 2 * BS * i)
        first = await extents(dev, 0, size)
        assert 1 <= len(first) <= 1024  # fewer extents than asked is fine; the client asks on
        end = first[-1][1]
        assert end < size
        rest = await extents(dev, end, size - end)
        assert rest[0][0] == end
        for start, stop, flags in first + rest:
            is_data = (start // BS) % 2 == 0
            assert flags == (0 if is_data else HOLE_ZERO), (start, stop, flags)
    finally:
        dev.close()


# MemoryDevice specifics -------------------------------------------------------------------------


async def test_memory_extents_are_page_sized() -> None:
    dev = MemoryDevice("mem", 8 * PAGE)
    await write(dev, 3 * PAGE + 10, b"x")
    assert await extents(dev, 0, 8 * PAGE) == [
        (0, 3 * PAGE, HOLE_ZERO),
        (3 * PAGE, 4 * PAGE, 0),
        (4 * PAGE, 8 * PAGE, HOLE_ZERO),
    ]
    assert await extents(dev, 3 * PAGE + 5, 10) == [(3 * PAGE + 5, 3 * PAGE + 15, 0)]


async def test_memory_partial_zeroing_keeps_the_page() -> None:
    dev = MemoryDevice("mem", 2 * PAGE)
    await write(dev, 0, b"\xff" * PAGE)
    await dev.write_zeroes(rq(Op.WRITE_ZEROES, 1, PAGE - 1))
    assert await read(dev, 0, 2) == b"\xff\0"
    await dev.write_zeroes(rq(Op.WRITE_ZEROES, 0, PAGE))
    assert await extents(dev, 0, 2 * PAGE) == [(0, 2 * PAGE, HOLE_ZERO)]


async def test_memory_size_not_a_multiple_of_the_page() -> None:
    size = 2 * PAGE + 123
    dev = MemoryDevice("mem", size)
    await write(dev, size - 10, b"0123456789")
    assert await read(dev, size - 12, 12) == b"\0\x000123456789"
    spans = await extents(dev, 0, size)
    assert spans[-1] == (2 * PAGE, size, 0)
    await dev.trim(rq(Op.TRIM, 2 * PAGE, 123))
    assert await read(dev, 2 * PAGE, 123) == bytes(123)


# Property: random operations match a bytearray --------------------------------------------------

PSIZE = 3 * PAGE + 1000  # several pages and blocks, and a partial last page
BOUNDARIES = sorted({0, 1, BS - 1, BS, BS + 1, PAGE - 1, PAGE, PAGE + 1, 2 * PAGE, PSIZE - 1})
ZERO_FLAGS = [
    ReqFlag.NONE,
    ReqFlag.NO_HOLE,
    ReqFlag.FAST_ZERO,
    ReqFlag.NO_HOLE | ReqFlag.FAST_ZERO,
    ReqFlag.FUA,
    ReqFlag.NO_HOLE | ReqFlag.FUA,
]


@st.composite
def ranges(draw: st.DrawFn) -> tuple[int, int]:
    offset = draw(st.one_of(st.sampled_from(BOUNDARIES), st.integers(0, PSIZE - 1)))
    room = PSIZE - offset
    length = draw(
        st.one_of(
            st.integers(1, min(room, 2 * BS)),
            st.integers(1, room),
            st.sampled_from([n for n in (1, BS, PAGE, room) if n <= room]),
        )
    )
    return offset, length


Operation = tuple[str, int, int, int]  # name, offset, length, seed or flags


def _build(name: str, r: tuple[int, int], arg: int = 0) -> Operation:
    return (name, r[0], r[1], int(arg))


operations = st.one_of(
    st.builds(_build, st.just("write"), ranges(), st.integers(0, 2**32)),
    st.builds(_build, st.just("trim"), ranges(), st.sampled_from([0, int(ReqFlag.FUA)])),
    st.builds(_build, st.just("zero"), ranges(), st.sampled_from([int(f) for f in ZERO_FLAGS])),
    st.builds(_build, st.just("read"), ranges()),
    st.builds(_build, st.just("status"), ranges()),
)


async def apply(dev: Device, size: int, ops: list[Operation]) -> bytearray:
    """Run ops on dev and on a bytearray, checking every read; returns the bytearray."""
    model = bytearray(size)
    for op, offset, length, arg in ops:
        end = offset + length
        if op == "write":
            data = random.Random(arg).randbytes(length)
            await write(dev, offset, data, ReqFlag(arg & ReqFlag.FUA))
            model[offset:end] = data
        elif op == "trim":
            await dev.trim(rq(Op.TRIM, offset, length, ReqFlag(arg)))
            model[offset:end] = bytes(length)  # both backends really discard
        elif op == "zero":
            try:
                await dev.write_zeroes(rq(Op.WRITE_ZEROES, offset, length, ReqFlag(arg)))
            except OSError as exc:
                assert arg & ReqFlag.FAST_ZERO and exc.errno == errno.ENOTSUP
            else:
                model[offset:end] = bytes(length)
        elif op == "read":
            assert await read(dev, offset, length) == model[offset:end], (op, offset, length)
        else:
            spans = await extents(dev, offset, length)
            # these backends describe the whole range of a small request
            assert spans[-1][1] == end, spans
            check_extents(spans, model)
    assert await read(dev, 0, len(model)) == model
    check_extents(await extents(dev, 0, len(model)), model)
    return model


BACKEND_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@BACKEND_SETTINGS
@given(ops=st.lists(operations, max_size=25))
def test_memory_device_matches_a_bytearray(ops: list[Operation]) -> None:
    dev = MemoryDevice("mem", PSIZE)
    asyncio.run(apply(dev, PSIZE, ops))


@BACKEND_SETTINGS
@given(ops=st.lists(operations, max_size=25))
def test_file_device_matches_a_bytearray(ops: list[Operation]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        dev = FileDevice("disk", Path(directory) / "disk.img", PSIZE, create=True)
        try:
            model = asyncio.run(apply(dev, PSIZE, ops))
            # and the file holds the same, read through a fresh descriptor
            assert (Path(directory) / "disk.img").read_bytes() == model
        finally:
            dev.close()
