"""Mapped devices against an independent model of what a stack of tables means.

Hypothesis builds random stacks: 1-3 memory devices at the bottom, then 1-3 levels of tables of
linear, striped and zero lines (some "linear" ones written as flakey that is never down or
delay with 0 ms), each naming any device built before it (so a level may map the
same region twice, or a table and its own lower device both). The model is computed here from
the table *text*, never from nbdcrypt's objects: for every 512-byte sector of every table device,
which memory device and sector it lands on (or none, for zero). Random request streams (write,
read, trim, write zeroes, block status, flush; any byte offset and length, biased towards line and
chunk boundaries) then go to the top device or to a device in the middle, and:

- every read returns what the model says;
- every memory device holds, byte for byte, what the model says (bytes land on the right device
  at the right offset, and nowhere else);
- block status of any range covers it contiguously, each answer at least one byte and never past
  what was asked, and never calls ZERO a byte the model holds non-zero.

Trim on a memory device zeroes (MemoryDevice.trim is write_zeroes), so the model zeroes too.

The second half checks suspend/resume/load with devices that hold requests until the test lets
them go: suspend waits for what is inside, new requests wait for resume, resume swaps tables.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdcrypt.backends.memory import MemoryDevice
from nbdcrypt.device import Device
from nbdcrypt.dm.device import MappedDevice
from nbdcrypt.dm.table import Table, TableError, parse_table
from nbdcrypt.request import EXTENT_ZERO, Extent, Op, ReqFlag, Request

SECTOR = 512

# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class Linear:
    """A plain remap, written as linear or as a target that behaves as linear here: flakey
    that is never down (up 1, down 0) or delay with 0 ms (one leg, or read and write legs)."""

    length: int  # sectors, as every length here
    dev: str
    offset: int
    form: str = "linear"


@dataclass(frozen=True)
class Striped:
    length: int
    chunk: int
    stripes: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Zero:
    length: int


Line = Linear | Striped | Zero
Place = tuple[str, int] | None  # (memory device, sector) or nowhere (zero)


def line_text(start: int, line: Line) -> str:
    if isinstance(line, Linear):
        where = f"{line.dev} {line.offset}"
        args = {
            "linear": where,
            "flakey": f"{where} 1 0",
            "delay": f"{where} 0",
            "delay6": f"{where} 0 {where} 0",
        }[line.form]
        return f"{start} {line.length} {line.form.rstrip('6')} {args}"
    if isinstance(line, Striped):
        pairs = " ".join(f"{d} {o}" for d, o in line.stripes)
        return f"{start} {line.length} striped {len(line.stripes)} {line.chunk} {pairs}"
    return f"{start} {line.length} zero"


@dataclass
class Stack:
    memory: dict[str, int]  # name -> size in sectors
    tables: list[tuple[str, list[Line]]]  # in build order; the last one is the top

    def table_text(self, lines: list[Line]) -> list[str]:
        out, start = [], 0
        for line in lines:
            out.append(line_text(start, line))
            start += line.length
        return out

    def places(self) -> dict[str, list[Place]]:
        """For each device, where each of its sectors lives (computed from the lines alone)."""
        where: dict[str, list[Place]] = {
            name: [(name, s) for s in range(size)] for name, size in self.memory.items()
        }
        for name, lines in self.tables:
            sectors: list[Place] = []
            for line in lines:
                if isinstance(line, Linear):
                    sectors += where[line.dev][line.offset : line.offset + line.length]
                elif isinstance(line, Striped):
                    n = len(line.stripes)
                    for t in range(line.length):
                        chunk, within = divmod(t, line.chunk)
                        row, stripe = divmod(chunk, n)
                        dev, offset = line.stripes[stripe]
                        sectors.append(where[dev][offset + row * line.chunk + within])
                else:
                    sectors += [None] * line.length
            where[name] = sectors
        return where

    def boundaries(self, name: str) -> list[int]:
        """Byte offsets of the line starts and stripe chunk starts of table `name`."""
        lines = dict(self.tables)[name]
        points, start = [], 0
        for line in lines:
            points.append(start * SECTOR)
            if isinstance(line, Striped):
                points += [(start + c) * SECTOR for c in range(0, line.length, line.chunk)]
            start += line.length
        points.append(start * SECTOR)
        return sorted(set(points))


class Model:
    """The bytes of each memory device; every other device is a view through `places`."""

    def __init__(self, stack: Stack) -> None:
        self.data = {name: bytearray(size * SECTOR) for name, size in stack.memory.items()}
        self.places = stack.places()

    def _runs(self, dev: str, offset: int, length: int) -> list[tuple[Place, int, int, int]]:
        """(place of the sector, byte within it, byte count, position in the request)."""
        runs = []
        pos, end = offset, offset + length
        places = self.places[dev]
        while pos < end:
            sector, within = divmod(pos, SECTOR)
            n = min(SECTOR - within, end - pos)
            runs.append((places[sector], within, n, pos - offset))
            pos += n
        return runs

    def read(self, dev: str, offset: int, length: int) -> bytes:
        out = bytearray(length)
        for place, within, n, at in self._runs(dev, offset, length):
            if place is not None:
                mem, sector = place
                base = sector * SECTOR + within
                out[at : at + n] = self.data[mem][base : base + n]
        return bytes(out)

    def write(self, dev: str, offset: int, data: bytes) -> None:
        for place, within, n, at in self._runs(dev, offset, len(data)):  # in request order
            if place is not None:
                mem, sector = place
                base = sector * SECTOR + within
                self.data[mem][base : base + n] = data[at : at + n]

    def zero(self, dev: str, offset: int, length: int) -> None:
        self.write(dev, offset, bytes(length))


# ---------------------------------------------------------------- random stacks


@st.composite
def stacks(draw: st.DrawFn) -> Stack:
    memory = {f"mem{i}": draw(st.integers(8, 256)) for i in range(draw(st.integers(1, 3)))}
    sizes = dict(memory)
    tables: list[tuple[str, list[Line]]] = []
    for level in range(draw(st.integers(1, 3))):
        name = f"map{level}"
        below = sorted(sizes)
        lines: list[Line] = []
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["linear", "linear", "striped", "striped", "zero"]))
            if kind == "striped":
                n = draw(st.integers(1, 3))
                chunk = draw(st.integers(1, 8))
                fits = [d for d in below if sizes[d] >= chunk]
                if fits:
                    rows = draw(
                        st.integers(1, max(1, min(4, min(sizes[d] for d in fits) // chunk)))
                    )
                    share = chunk * rows
                    stripes = []
                    for _ in range(n):
                        dev = draw(st.sampled_from([d for d in fits if sizes[d] >= share]))
                        stripes.append((dev, draw(st.integers(0, sizes[dev] - share))))
                    lines.append(Striped(n * share, chunk, tuple(stripes)))
                    continue
                kind = "linear"
            if kind == "linear":
                dev = draw(st.sampled_from(below))
                offset = draw(st.integers(0, sizes[dev] - 1))
                length = draw(st.integers(1, min(sizes[dev] - offset, 96)))
                form = draw(st.sampled_from(["linear", "linear", "flakey", "delay", "delay6"]))
                lines.append(Linear(length, dev, offset, form))
            else:
                lines.append(Zero(draw(st.integers(1, 16))))
        tables.append((name, lines))
        sizes[name] = sum(line.length for line in lines)
    return Stack(memory, tables)


def build(stack: Stack) -> dict[str, Device]:
    devices: dict[str, Device] = {
        name: MemoryDevice(name, size * SECTOR) for name, size in stack.memory.items()
    }
    for name, lines in stack.tables:
        devices[name] = MappedDevice(
            name, Table.build(parse_table(stack.table_text(lines)), devices)
        )
    return devices


# ---------------------------------------------------------------- request streams


@dataclass(frozen=True)
class Io:
    op: str
    dev: str
    offset: int
    length: int
    seed: int = 0
    flags: ReqFlag = ReqFlag.NONE


@st.composite
def ranges(draw: st.DrawFn, size: int, points: list[int]) -> tuple[int, int]:
    if draw(st.booleans()):
        point = draw(st.sampled_from(points))
        offset = draw(st.integers(max(0, point - 700), min(size - 1, point + 700)))
    else:
        offset = draw(st.integers(0, size - 1))
    room = size - offset
    if draw(st.booleans()):
        length = draw(st.integers(1, min(room, 1100)))
    else:
        length = draw(st.integers(1, room))
    return offset, length


@st.composite
def streams(draw: st.DrawFn, stack: Stack) -> list[Io]:
    sizes = {name: sum(x.length for x in lines) * SECTOR for name, lines in stack.tables}
    top = stack.tables[-1][0]
    names = [top, top, top, *sizes]
    ios = []
    for _ in range(draw(st.integers(1, 25))):
        dev = draw(st.sampled_from(names))
        offset, length = draw(ranges(sizes[dev], stack.boundaries(dev)))
        op = draw(
            st.sampled_from(
                ["write", "write", "write", "read", "read", "trim", "zero", "status", "flush"]
            )
        )
        flags = ReqFlag.NONE
        if op == "write" and draw(st.booleans()):
            flags = ReqFlag.FUA
        if op == "zero":
            flags = draw(st.sampled_from([ReqFlag.NONE, ReqFlag.NO_HOLE, ReqFlag.FUA]))
        ios.append(Io(op, dev, offset, length, draw(st.integers(0, 2**32)), flags))
    return ios


async def covering_extents(dev: Device, offset: int, length: int) -> list[tuple[int, Extent]]:
    """Ask for block status until [offset, offset + length) is covered; check each answer."""
    out: list[tuple[int, Extent]] = []
    pos, end = offset, offset + length
    for _ in range(length + 1):
        if pos == end:
            return out
        answer = await dev.block_status(Request(Op.BLOCK_STATUS, pos, end - pos))
        assert answer, f"empty block status at {pos}"
        total = 0
        for extent in answer:
            assert extent.length > 0, answer
            out.append((pos + total, extent))
            total += extent.length
        assert total <= end - pos, f"block status past the request: {answer} for {end - pos}"
        pos += total
    raise AssertionError("block status did not cover the range")


async def apply(io: Io, devices: dict[str, Device], model: Model) -> None:
    dev = devices[io.dev]
    if io.op == "write":
        data = random.Random(io.seed).randbytes(io.length)
        await dev.write(Request(Op.WRITE, io.offset, io.length, io.flags, data))
        model.write(io.dev, io.offset, data)
    elif io.op == "read":
        got = bytes(await dev.read(Request(Op.READ, io.offset, io.length)))
        expected = model.read(io.dev, io.offset, io.length)
        if got != expected:
            bad = next(i for i in range(io.length) if got[i] != expected[i])
            raise AssertionError(f"{io}: first difference at +{bad}")
    elif io.op == "trim":
        await dev.trim(Request(Op.TRIM, io.offset, io.length))
        model.zero(io.dev, io.offset, io.length)
    elif io.op == "zero":
        await dev.write_zeroes(Request(Op.WRITE_ZEROES, io.offset, io.length, io.flags))
        model.zero(io.dev, io.offset, io.length)
    elif io.op == "status":
        for at, extent in await covering_extents(dev, io.offset, io.length):
            if extent.flags & EXTENT_ZERO:
                assert model.read(io.dev, at, extent.length) == bytes(extent.length), (
                    f"{io}: ZERO reported at {at}+{extent.length} over non-zero data"
                )
    else:
        await dev.flush()


async def check_memory(devices: dict[str, Device], model: Model) -> None:
    for name, data in model.data.items():
        got = bytes(await devices[name].read(Request(Op.READ, 0, len(data))))
        if got != data:
            bad = next(i for i in range(len(data)) if got[i] != data[i])
            raise AssertionError(f"{name}: first wrong byte at {bad} (sector {bad // SECTOR})")


def describe(stack: Stack) -> str:
    parts = [f"memory {stack.memory}"]
    parts += [f"{name}: {stack.table_text(lines)}" for name, lines in stack.tables]
    return "\n".join(parts)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_random_stacks_match_the_model(data: st.DataObject) -> None:
    stack = data.draw(stacks(), label="stack")
    ios = data.draw(streams(stack), label="requests")
    note = describe(stack)

    async def run() -> None:
        devices = build(stack)
        model = Model(stack)
        for name, lines in stack.tables:
            assert devices[name].size == sum(x.length for x in lines) * SECTOR, note
        for io in ios:
            await apply(io, devices, model)
        await check_memory(devices, model)
        top = stack.tables[-1][0]
        size = devices[top].size
        await apply(Io("read", top, 0, size), devices, model)
        await apply(Io("status", top, 0, size), devices, model)

    try:
        asyncio.run(run())
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{note}") from None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_block_status_after_writes_reports_data_where_written(data: st.DataObject) -> None:
    """Where a stack maps a written byte onto memory, block status must not call it a zero hole:
    writes of non-zero bytes, then status of the whole top device."""
    stack = data.draw(stacks(), label="stack")
    top = stack.tables[-1][0]
    size = sum(x.length for x in stack.tables[-1][1]) * SECTOR
    writes = data.draw(st.lists(ranges(size, stack.boundaries(top)), min_size=1, max_size=6))

    async def run() -> None:
        devices = build(stack)
        model = Model(stack)
        for offset, length in writes:
            payload = b"\xa5" * length
            await devices[top].write(Request(Op.WRITE, offset, length, data=payload))
            model.write(top, offset, payload)
        for at, extent in await covering_extents(devices[top], 0, size):
            if extent.flags & EXTENT_ZERO:
                assert model.read(top, at, extent.length) == bytes(extent.length), (
                    f"ZERO at {at}+{extent.length}\n{describe(stack)}"
                )

    asyncio.run(run())


def test_model_places_of_a_known_stack() -> None:
    """The model itself, on a stack worked out by hand."""
    stack = Stack(
        {"a": 8, "b": 8},
        [
            ("m0", [Striped(8, 2, (("a", 0), ("b", 4))), Zero(2)]),
            ("m1", [Linear(4, "m0", 1), Linear(2, "a", 6)]),
        ],
    )
    places = stack.places()
    assert places["m0"] == [
        ("a", 0), ("a", 1), ("b", 4), ("b", 5), ("a", 2), ("a", 3), ("b", 6), ("b", 7),
        None, None,
    ]  # fmt: skip
    assert places["m1"] == [("a", 1), ("b", 4), ("b", 5), ("a", 2), ("a", 6), ("a", 7)]
    assert stack.table_text(stack.tables[0][1]) == [
        "0 8 striped 2 2 a 0 b 4",
        "8 2 zero",
    ]


# ---------------------------------------------------------------- suspend / resume / load


class Held(Device):
    """A memory device that holds every request until the test releases it."""

    def __init__(self, name: str, size: int = 1 << 20, *, hold: bool = True) -> None:
        self.inner = MemoryDevice(name, size)
        self.name = name
        self.size = size
        self.caps = self.inner.caps
        self.hold = hold
        self.waiting: list[tuple[str, asyncio.Future[None]]] = []
        self.arrived: list[str] = []

    async def _gate(self, op: str) -> None:
        self.arrived.append(op)
        if self.hold:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiting.append((op, future))
            await future

    def release(self, index: int = 0) -> str:
        op, future = self.waiting.pop(index)
        future.set_result(None)
        return op

    def release_all(self) -> None:
        while self.waiting:
            self.release()

    async def read(self, req: Request) -> bytes | bytearray | memoryview:
        await self._gate("read")
        return await self.inner.read(req)

    async def write(self, req: Request) -> None:
        await self._gate("write")
        await self.inner.write(req)

    async def flush(self) -> None:
        await self._gate("flush")

    async def trim(self, req: Request) -> None:
        await self._gate("trim")
        await self.inner.trim(req)

    async def write_zeroes(self, req: Request) -> None:
        await self._gate("write_zeroes")
        await self.inner.write_zeroes(req)

    async def block_status(self, req: Request) -> list[Extent]:
        await self._gate("block_status")
        return await self.inner.block_status(req)

    async def cache(self, req: Request) -> None:
        await self._gate("cache")


async def spin(times: int = 30) -> None:
    for _ in range(times):
        await asyncio.sleep(0)


def over(lines: list[str], devices: dict[str, Device]) -> MappedDevice:
    return MappedDevice("dm", Table.build(parse_table(lines), devices))


OPS: dict[str, Callable[[Device], Awaitable[object]]] = {
    "read": lambda d: d.read(Request(Op.READ, 0, 4096)),
    "write": lambda d: d.write(Request(Op.WRITE, 0, 4, data=b"abcd")),
    "trim": lambda d: d.trim(Request(Op.TRIM, 512, 512)),
    "write_zeroes": lambda d: d.write_zeroes(Request(Op.WRITE_ZEROES, 1024, 512)),
    "block_status": lambda d: d.block_status(Request(Op.BLOCK_STATUS, 0, 4096)),
    "cache": lambda d: d.cache(Request(Op.CACHE, 0, 4096)),
    "flush": lambda d: d.flush(),
}


def start(op: str, dev: Device) -> asyncio.Task[object]:
    async def run() -> object:
        return await OPS[op](dev)

    return asyncio.create_task(run())


@pytest.mark.parametrize("op", list(OPS))
async def test_suspend_waits_for_a_request_in_flight(op: str) -> None:
    held = Held("h")
    dm = over(["0 64 linear h 8"], {"h": held})
    order: list[str] = []
    request = start(op, dm)
    request.add_done_callback(lambda _: order.append("request done"))
    await spin()
    assert held.arrived == [op]
    suspend = asyncio.create_task(dm.suspend())
    suspend.add_done_callback(lambda _: order.append("suspended"))
    await spin()
    assert dm.suspended
    assert not suspend.done(), "suspend returned with a request still inside"
    held.release_all()
    await asyncio.wait_for(suspend, 5)
    assert order == ["request done", "suspended"]
    await request
    dm.resume()


@pytest.mark.parametrize("op", list(OPS))
async def test_requests_while_suspended_wait_for_resume(op: str) -> None:
    held = Held("h", hold=False)
    dm = over(["0 64 linear h 8"], {"h": held})
    await asyncio.wait_for(dm.suspend(), 5)  # nothing inside: returns at once
    assert dm.suspended
    request = start(op, dm)
    await spin()
    assert not request.done()
    assert held.arrived == [], "a request passed the door of a suspended device"
    assert dm.resume() is False  # nothing loaded: no swap
    assert not dm.suspended
    await asyncio.wait_for(request, 5)
    assert held.arrived == [op]


async def test_many_requests_held_then_all_released_by_resume() -> None:
    held = Held("h", hold=False)
    dm = over(["0 64 linear h 8", "64 64 zero"], {"h": held})
    await dm.suspend()
    tasks = [start(op, dm) for op in OPS for _ in range(3)]
    await spin()
    assert not any(t.done() for t in tasks) and held.arrived == []
    dm.resume()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert sorted(held.arrived) == sorted(op for op in OPS for _ in range(3))


@settings(max_examples=60, deadline=None)
@given(
    before=st.lists(st.sampled_from(list(OPS)), max_size=6),
    after=st.lists(st.sampled_from(list(OPS)), max_size=6),
    order=st.randoms(use_true_random=False),
)
def test_suspend_drains_in_any_order(
    before: list[str], after: list[str], order: random.Random
) -> None:
    """Requests inside when suspend is called are released in a random order: suspend returns
    exactly when the last of them has finished; requests that came after never reach the device
    until resume."""

    async def run() -> None:
        held = Held("h")
        dm = over(["0 64 linear h 0"], {"h": held})
        inside = [start(op, dm) for op in before]
        await spin()
        assert len(held.waiting) == len(before)
        suspend = asyncio.create_task(dm.suspend())
        await spin()
        late = [start(op, dm) for op in after]
        await spin()
        while held.waiting:
            assert not suspend.done()
            held.release(order.randrange(len(held.waiting)))
            await spin()
        await asyncio.wait_for(suspend, 5)
        assert all(t.done() for t in inside)
        assert not any(t.done() for t in late)
        assert len(held.arrived) == len(before)
        dm.resume()
        await spin()
        assert len(held.waiting) == len(after)
        held.release_all()
        await asyncio.wait_for(asyncio.gather(*inside, *late), 5)

    asyncio.run(run())


async def test_load_then_resume_swaps_table_size_and_caps() -> None:
    a, b = MemoryDevice("a", 1 << 20), MemoryDevice("b", 1 << 20)
    devices: dict[str, Device] = {"a": a, "b": b}
    await a.write(Request(Op.WRITE, 0, 3, data=b"AAA"))
    await b.write(Request(Op.WRITE, 0, 3, data=b"BBB"))
    dm = over(["0 64 linear a 0"], devices)
    assert dm.caps.can_cache is False
    new = Table.build(parse_table(["0 64 linear b 0", "64 64 error"]), devices)
    dm.load(new)
    # loading alone changes nothing that I/O sees
    assert (dm.size, dm.inactive) == (64 * SECTOR, new)
    assert bytes(await dm.read(Request(Op.READ, 0, 3))) == b"AAA"
    await dm.suspend()
    assert dm.resume() is True
    assert dm.live is new and dm.inactive is None
    assert dm.size == 128 * SECTOR
    assert bytes(await dm.read(Request(Op.READ, 0, 3))) == b"BBB"
    with pytest.raises(OSError):
        await dm.read(Request(Op.READ, 64 * SECTOR, 1))
    assert dm.caps.can_extents is True  # any line with extents
    assert dm.status() == ["0 64 linear", "64 64 error"]
    assert dm.resume() is False  # nothing staged any more


async def test_requests_held_by_suspend_go_to_the_new_table() -> None:
    devices: dict[str, Device] = {"a": MemoryDevice("a", 1 << 20), "b": MemoryDevice("b", 1 << 20)}
    await devices["b"].write(Request(Op.WRITE, 512, 4, data=b"new!"))
    dm = over(["0 64 linear a 0"], devices)
    await dm.suspend()
    read = start("read", dm)
    write = asyncio.create_task(dm.write(Request(Op.WRITE, 0, 4, data=b"late")))
    await spin()
    dm.load(Table.build(parse_table(["0 64 linear b 1"]), devices))
    dm.resume()
    got = await asyncio.wait_for(read, 5)
    await write
    assert isinstance(got, bytes | bytearray | memoryview)
    assert bytes(got)[:4] == b"new!"
    assert bytes(await devices["b"].read(Request(Op.READ, 512, 4))) == b"late"
    assert bytes(await devices["a"].read(Request(Op.READ, 0, 4))) == bytes(4)


async def test_a_request_over_two_lines_is_not_torn_by_a_swap() -> None:
    """Suspend waits for a request that is half done (first piece done, second held), so
    its second piece still uses the table it started with."""
    held_a, held_b = Held("a"), Held("b")
    devices: dict[str, Device] = {"a": held_a, "b": held_b, "c": MemoryDevice("c", 1 << 20)}
    dm = over(["0 8 linear a 0", "8 8 linear b 0"], devices)
    write = asyncio.create_task(
        dm.write(Request(Op.WRITE, 4 * SECTOR, 8 * SECTOR, data=b"x" * (8 * SECTOR)))
    )
    await spin()
    held_a.release()
    await spin()
    assert held_b.arrived == ["write"]
    dm.load(Table.build(parse_table(["0 16 linear c 0"]), devices))
    suspend = asyncio.create_task(dm.suspend())
    await spin()
    assert not suspend.done()
    held_b.release()
    await asyncio.wait_for(suspend, 5)
    await write
    assert dm.resume() is True
    assert bytes(await held_b.inner.read(Request(Op.READ, 0, 4 * SECTOR))) == b"x" * (4 * SECTOR)


async def test_clear_drops_the_staged_table() -> None:
    devices: dict[str, Device] = {"a": MemoryDevice("a", 1 << 20)}
    dm = over(["0 64 linear a 0"], devices)
    live = dm.live
    dm.load(Table.build(parse_table(["0 8 zero"]), devices))
    dm.clear()
    await dm.suspend()
    assert dm.resume() is False
    assert dm.live is live and dm.size == 64 * SECTOR


async def test_suspend_twice_and_resume_twice() -> None:
    held = Held("h", hold=False)
    dm = over(["0 8 linear h 0"], {"h": held})
    await dm.suspend()
    await dm.suspend()
    task = start("write", dm)
    await spin()
    assert not task.done()
    dm.resume()
    dm.resume()
    await asyncio.wait_for(task, 5)
    assert not dm.suspended


async def test_suspend_resume_suspend_keeps_holding() -> None:
    held = Held("h", hold=False)
    dm = over(["0 8 linear h 0"], {"h": held})
    await dm.suspend()
    task = start("read", dm)
    await spin()
    dm.resume()
    await dm.suspend()  # before the waiting request had a chance to run
    await spin()
    assert not task.done() and held.arrived == []
    dm.resume()
    await asyncio.wait_for(task, 5)


async def test_shrinking_an_open_device_is_refused() -> None:
    devices: dict[str, Device] = {"a": MemoryDevice("a", 1 << 20)}
    dm = over(["0 64 linear a 0"], devices)
    small = Table.build(parse_table(["0 32 linear a 0"]), devices)
    big = Table.build(parse_table(["0 128 linear a 0"]), devices)
    dm.openers = 1
    with pytest.raises(TableError, match="smaller"):
        dm.load(small)
    dm.load(big)  # growing is fine
    await dm.suspend()
    assert dm.resume() is True and dm.size == 128 * SECTOR
    # staged while nobody had it open, resumed once someone has: refused at resume, and the
    # device stays suspended with the table still staged, as dm does when a swap fails
    dm.openers = 0
    dm.load(small)
    dm.openers = 1
    await dm.suspend()
    with pytest.raises(TableError, match="shrink"):
        dm.resume()
    assert dm.suspended and dm.inactive is small and dm.size == 128 * SECTOR
    dm.clear()
    assert dm.resume() is False and not dm.suspended
    dm.openers = 0
