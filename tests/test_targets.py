"""Each target type on its own: table-line parsing as the kernel's constructors do it, the
`dmsetup table` text round trip, and what each target does to I/O.

The kernel sources are the reference (drivers/md/dm-linear.c, dm-stripe.c, dm-zero.c,
dm-flakey.c, dm-delay.c, and the error target in dm-target.c). Tests whose name says `kernel`
check a rule that comes from there; an xfail(strict=True) marks a place where nbdcrypt is known to
differ (the reason says how), so fixing it turns the test red until the mark is removed.

The flakey clock is made controllable by replacing the module's `time` (never by sleeping), and
the delay target's `asyncio.sleep` by a gate the test opens, so nothing here depends on timing.
"""

from __future__ import annotations

import asyncio
import errno
import random
from collections.abc import Awaitable, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nbdcrypt.targets.delay as delay_module
import nbdcrypt.targets.flakey as flakey_module
from nbdcrypt.backends.memory import MemoryDevice
from nbdcrypt.device import Device, DeviceCaps
from nbdcrypt.dm.device import MappedDevice
from nbdcrypt.dm.table import Table, TableError, TableLine, parse_line, parse_table
from nbdcrypt.dm.target import SECTOR, TargetSpec
from nbdcrypt.request import EXTENT_HOLE, EXTENT_ZERO, Extent, Op, ReqFlag, Request
from nbdcrypt.targets import TARGETS
from nbdcrypt.targets.delay import DelaySpec, Leg
from nbdcrypt.targets.flakey import Corrupt, FlakeySpec
from nbdcrypt.targets.linear import LinearSpec
from nbdcrypt.targets.striped import StripedSpec

KiB = 1024
UINT_MAX = 2**32 - 1

# ---------------------------------------------------------------- helpers


def rand(length: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(length)


def sector_tags(first: int, count: int) -> bytes:
    """`count` sectors, each filled with its own number (from `first`): where a sector lands
    on a device below says which sector of the target it was."""
    return b"".join(((first + i) % 2**32).to_bytes(4, "big") * (SECTOR // 4) for i in range(count))


async def rd(dev: Device, offset: int, length: int) -> bytes:
    return bytes(await dev.read(Request(Op.READ, offset, length)))


async def wr(dev: Device, offset: int, data: bytes, flags: ReqFlag = ReqFlag.NONE) -> None:
    await dev.write(Request(Op.WRITE, offset, len(data), flags, data))


async def trim(dev: Device, offset: int, length: int) -> None:
    await dev.trim(Request(Op.TRIM, offset, length))


async def wzero(dev: Device, offset: int, length: int, flags: ReqFlag = ReqFlag.NONE) -> None:
    await dev.write_zeroes(Request(Op.WRITE_ZEROES, offset, length, flags))


async def extents(dev: Device, offset: int, length: int) -> list[Extent]:
    return await dev.block_status(Request(Op.BLOCK_STATUS, offset, length))


def memory(*names: str, size: int = 1024 * KiB) -> dict[str, Device]:
    return {name: MemoryDevice(name, size) for name in names}


def mapped(lines: Sequence[str], devices: dict[str, Device], name: str = "top") -> MappedDevice:
    return MappedDevice(name, Table.build(parse_table(lines), devices))


def spec_of(text: str) -> TargetSpec:
    return parse_line(text).spec


async def expect_eio(op: Awaitable[object]) -> None:
    with pytest.raises(OSError) as info:
        await op
    assert info.value.errno == errno.EIO, info.value


class Recorder(Device):
    """A MemoryDevice that logs every operation that reaches it: (op, offset, length)."""

    def __init__(self, name: str, size: int = 1024 * KiB) -> None:
        self.inner = MemoryDevice(name, size)
        self.name = name
        self.size = size
        self.caps = self.inner.caps
        self.log: list[tuple[str, int, int]] = []

    async def read(self, req: Request) -> bytes | bytearray | memoryview:
        self.log.append(("read", req.offset, req.length))
        return await self.inner.read(req)

    async def write(self, req: Request) -> None:
        self.log.append(("write", req.offset, req.length))
        await self.inner.write(req)

    async def flush(self) -> None:
        self.log.append(("flush", 0, 0))

    async def trim(self, req: Request) -> None:
        self.log.append(("trim", req.offset, req.length))
        await self.inner.trim(req)

    async def write_zeroes(self, req: Request) -> None:
        self.log.append(("write_zeroes", req.offset, req.length))
        await self.inner.write_zeroes(req)

    async def block_status(self, req: Request) -> list[Extent]:
        self.log.append(("block_status", req.offset, req.length))
        return await self.inner.block_status(req)

    async def cache(self, req: Request) -> None:
        self.log.append(("cache", req.offset, req.length))

    def ops(self) -> list[str]:
        return [op for op, _, _ in self.log]


# ---------------------------------------------------------------- table lines


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("", "expected"),
        ("0 8", "expected"),
        ("x 8 zero", "start"),
        ("0 -8 zero", "length"),
        ("0 0 zero", "length must not be 0"),
        ("0 8 frobnicate", "unknown target 'frobnicate'"),
        ("0 8.5 zero", "length"),
    ],
)
def test_bad_line_is_a_table_error_naming_the_line(line: str, words: str) -> None:
    with pytest.raises(TableError) as info:
        parse_line(line, 7)
    assert str(info.value).startswith("line 7:"), info.value
    assert words in str(info.value), info.value


def test_target_errors_name_line_and_target() -> None:
    with pytest.raises(TableError) as info:
        parse_table(["0 8 zero", "# a comment", "8 8 linear a"])
    assert str(info.value).startswith("line 3: linear:"), info.value


@pytest.mark.parametrize(
    ("lines", "words"),
    [
        ([], "at least one line"),
        (["# only a comment", "   "], "at least one line"),
        (["8 8 zero"], "gap"),
        (["0 8 zero", "9 8 zero"], "gap"),
        (["0 8 zero", "7 8 zero"], "overlapping"),
        (["0 8 zero", "0 8 zero"], "overlapping"),
    ],
)
def test_table_rules(lines: list[str], words: str) -> None:
    with pytest.raises(TableError) as info:
        parse_table(lines)
    assert words in str(info.value), info.value


def test_table_skips_comments_and_blank_lines() -> None:
    lines = parse_table(["", "0 8 zero  # the start", "  # nothing", "8 16 error"])
    assert [(x.start, x.length, x.target) for x in lines] == [(0, 8, "zero"), (8, 16, "error")]


def test_every_kernel_target_here_is_registered() -> None:
    assert set(TARGETS) >= {"linear", "striped", "zero", "error", "flakey", "delay"}


@pytest.mark.parametrize("line", ["0 \u00b2 zero", "\u00b2 8 zero", "0 8 linear a \u00b2"])
def test_superscript_digit_is_a_table_error(line: str) -> None:
    """'²'.isdigit() is true but int('²') fails: the error must still be a located TableError."""
    with pytest.raises(TableError, match=r"^line 1: "):
        parse_line(line)


def test_non_ascii_digits_are_refused_like_the_kernel() -> None:
    """The kernel's sscanf/kstrtouint take 0-9 only; '٣' (Arabic-Indic three) is no number."""
    for line in ["0 8 linear a \u0663", "0 \u0663 zero", "0 16 striped \u0662 8 a 0 b 0"]:
        with pytest.raises(TableError):
            parse_line(line)


# ---------------------------------------------------------------- parse errors per target

PARSE_ERRORS = {
    "linear": [
        ("0 8 linear", "takes 2"),
        ("0 8 linear a", "takes 2"),
        ("0 8 linear a 0 1", "takes 2"),
        ("0 8 linear a x", "offset"),
        ("0 8 linear a -1", "offset"),
        ("0 8 linear a 1.5", "offset"),
        ("0 8 linear a 0x10", "offset"),
    ],
    "striped": [
        ("0 8 striped", "at least"),
        ("0 8 striped 2", "at least"),
        ("0 8 striped 0 8", "#devs"),
        ("0 8 striped x 8 a 0", "#devs"),
        ("0 8 striped -2 8 a 0 b 0", "#devs"),
        ("0 16 striped 2 0 a 0 b 0", "chunk_sectors"),
        ("0 16 striped 2 y a 0 b 0", "chunk_sectors"),
        ("0 16 striped 2 8 a 0", "takes 6"),
        ("0 16 striped 2 8 a 0 b", "takes 6"),
        ("0 16 striped 2 8 a 0 b 0 c 0", "takes 6"),
        ("0 16 striped 2 8 a 0 b x", "offset of stripe 1"),
        ("0 16 striped 2 8 a -1 b 0", "offset of stripe 0"),
        # the kernel's divisibility rules: length by #devs, each stripe's share by the chunk
        ("0 9 striped 2 1 a 0 b 0", "not divisible by #devs"),
        ("0 16 striped 3 1 a 0 b 0 c 0", "not divisible by #devs"),
        ("0 16 striped 2 3 a 0 b 0", "not a multiple of chunk_sectors"),
        # 12 is a multiple of 4, but each stripe's share (6) is not: dm-stripe.c divides the width
        ("0 12 striped 2 4 a 0 b 0", "not a multiple of chunk_sectors"),
        ("0 8 striped 1 16 a 0", "not a multiple of chunk_sectors"),
    ],
    "zero": [("0 8 zero x", "takes 0"), ("0 8 zero 0", "takes 0")],
    "error": [("0 8 error x", "takes 0")],
    "flakey": [
        ("0 8 flakey", "at least 4"),
        ("0 8 flakey a 0 1", "at least 4"),
        ("0 8 flakey a x 1 1", "offset"),
        ("0 8 flakey a 0 x 1", "up_interval"),
        ("0 8 flakey a 0 1 -1", "down_interval"),
        ("0 8 flakey a 0 0 0", "zero"),
        ("0 8 flakey a 0 1 1 x", "#features"),
        ("0 8 flakey a 0 1 1 1", "#features is 1 but 0"),
        ("0 8 flakey a 0 1 1 2 drop_writes", "#features is 2 but 1"),
        ("0 8 flakey a 0 1 1 0 drop_writes", "#features is 0 but 1"),
        ("0 8 flakey a 0 1 1 1 frob", "unknown feature 'frob'"),
        ("0 8 flakey a 0 1 1 2 drop_writes error_writes", "mutually exclusive"),
        ("0 8 flakey a 0 1 1 2 error_writes drop_writes", "mutually exclusive"),
        ("0 8 flakey a 0 1 1 1 corrupt_bio_byte", "corrupt_bio_byte takes"),
        ("0 8 flakey a 0 1 1 4 corrupt_bio_byte 1 r 0", "corrupt_bio_byte takes"),
        ("0 8 flakey a 0 1 1 5 corrupt_bio_byte 1 x 0 0", "direction"),
        ("0 8 flakey a 0 1 1 5 corrupt_bio_byte 0 r 0 0", "Nth_byte"),
        ("0 8 flakey a 0 1 1 5 corrupt_bio_byte x r 0 0", "Nth_byte"),
        ("0 8 flakey a 0 1 1 5 corrupt_bio_byte 1 r 256 0", "not a byte"),
        ("0 8 flakey a 0 1 1 5 corrupt_bio_byte 1 r -1 0", "value"),
        ("0 8 flakey a 0 1 1 5 corrupt_bio_byte 1 w 0 x", "flags"),
        ("0 8 flakey a 0 1 1 6 corrupt_bio_byte 1 r 0 0 frob", "unknown feature"),
    ],
    "delay": [
        *(
            ("0 8 delay " + " ".join(["a", "0", "1"] * 3)[: 2 * n - 1], "takes 3 or 6 or 9")
            for n in (1, 2, 4, 5, 7, 8)
        ),
        ("0 8 delay", "takes 3 or 6 or 9"),
        ("0 8 delay a 0 1 b 0 1 c 0 1 d", "takes 3 or 6 or 9"),
        ("0 8 delay a 0 1 b 0 1 c 0 1 d 0 1", "takes 3 or 6 or 9"),
        ("0 8 delay a x 1", "offset"),
        ("0 8 delay a 0 x", "delay (ms)"),
        ("0 8 delay a 0 -1", "delay (ms)"),
        ("0 8 delay a 0 1.5", "delay (ms)"),
        ("0 8 delay a 0 1 b x 1", "write offset"),
        ("0 8 delay a 0 1 b 0 x", "write delay (ms)"),
        ("0 8 delay a 0 1 b 0 1 c x 1", "flush offset"),
        ("0 8 delay a 0 1 b 0 1 c 0 x", "flush delay (ms)"),
    ],
}


@pytest.mark.parametrize(
    ("line", "words"),
    [
        pytest.param(line, words, id=line)
        for cases in PARSE_ERRORS.values()
        for line, words in cases
    ],
)
def test_parse_error(line: str, words: str) -> None:
    with pytest.raises(TableError) as info:
        parse_line(line)
    target = line.split()[2]
    assert str(info.value).startswith(f"line 1: {target}: "), info.value
    assert words in str(info.value), info.value


# ---------------------------------------------------------------- striped rules vs dm-stripe.c


def kernel_stripe_ctr(length: int, stripes: int, chunk: int, argc: int) -> bool:
    """stripe_ctr()'s checks in order (drivers/md/dm-stripe.c, v1.7): a table line is accepted
    when #devs and chunk_size are non-zero u32s, the target length divides by #devs, the width
    (length / #devs) divides by the chunk size, and there are 2 + 2 * #devs arguments. No power
    of two or page-size minimum any more (the kernel dropped those)."""
    if argc < 2 or not 0 < stripes <= UINT_MAX or not 0 < chunk <= UINT_MAX:
        return False
    width, rest = divmod(length, stripes)
    if rest or width % chunk:
        return False
    return argc == 2 + 2 * stripes


@settings(max_examples=300, deadline=None)
@given(
    length=st.integers(1, 400),
    stripes=st.integers(0, 6),
    chunk=st.integers(0, 40),
    pairs=st.integers(0, 7),
)
def test_striped_accepts_exactly_what_the_kernel_accepts(
    length: int, stripes: int, chunk: int, pairs: int
) -> None:
    words = [str(stripes), str(chunk)] + [w for i in range(pairs) for w in (f"d{i}", str(i))]
    kernel = kernel_stripe_ctr(length, stripes, chunk, len(words))
    line = f"0 {length} striped " + " ".join(words)
    try:
        spec = parse_line(line).spec
    except TableError:
        assert not kernel, f"nbdcrypt refuses what the kernel takes: {line}"
        return
    assert kernel, f"nbdcrypt takes what the kernel refuses: {line}"
    assert isinstance(spec, StripedSpec)
    assert (spec.chunk, len(spec.stripes)) == (chunk, stripes)


@pytest.mark.parametrize(
    "line",
    [
        "0 12 striped 2 3 a 0 b 0",  # chunk not a power of two
        "0 6 striped 2 3 a 0 b 0",  # one row
        "0 24 striped 3 8 a 0 b 0 c 0",  # three stripes
        "0 16 striped 1 16 a 5",  # one stripe: a linear map
        "0 6 striped 2 1 a 0 a 100",  # the same device twice, at different offsets
    ],
)
def test_striped_accepts(line: str) -> None:
    assert isinstance(spec_of(line), StripedSpec)


# ---------------------------------------------------------------- flakey features vs dm-flakey.c


def test_flakey_feature_forms() -> None:
    spec = spec_of("0 8 flakey a 7 3 2")
    assert spec == FlakeySpec("a", 7, 3, 2)
    assert spec_of("0 8 flakey a 7 3 2 0") == spec  # "0 features" is the same line
    assert spec_of("0 8 flakey a 0 3 2 1 drop_writes") == FlakeySpec(
        "a", 0, 3, 2, frozenset({"drop_writes"})
    )
    assert spec_of("0 8 flakey a 0 3 2 2 error_reads error_writes") == FlakeySpec(
        "a", 0, 3, 2, frozenset({"error_reads", "error_writes"})
    )
    assert spec_of("0 8 flakey a 0 0 5 6 error_reads corrupt_bio_byte 32 w 1 0") == FlakeySpec(
        "a", 0, 0, 5, frozenset({"error_reads"}), Corrupt(32, "w", 1, 0)
    )
    assert spec_of("0 8 flakey a 0 1 0 5 corrupt_bio_byte 1 r 255 4") == FlakeySpec(
        "a", 0, 1, 0, frozenset(), Corrupt(1, "r", 255, 4)
    )


def test_flakey_corrupt_writes_conflict_with_drop_and_error_writes() -> None:
    """parse_features: drop_writes/error_writes are incompatible with corrupt_bio_byte ... w."""
    for feature in ("drop_writes", "error_writes"):
        for words in (f"{feature} corrupt_bio_byte 1 w 0 0", f"corrupt_bio_byte 1 w 0 0 {feature}"):
            with pytest.raises(TableError, match="conflicts"):
                parse_line(f"0 8 flakey a 0 1 1 6 {words}")
        # reads may be corrupted while writes are dropped or failed
        assert isinstance(
            spec_of(f"0 8 flakey a 0 1 1 6 {feature} corrupt_bio_byte 1 r 0 0"), FlakeySpec
        )


KERNEL_FLAKEY_REFUSES = [
    ("0 8 flakey a 0 1 1 2 drop_writes drop_writes", "Feature drop_writes duplicated"),
    ("0 8 flakey a 0 1 1 2 error_reads error_reads", "Feature error_reads duplicated"),
    (
        "0 8 flakey a 0 1 1 10 corrupt_bio_byte 1 r 0 0 corrupt_bio_byte 2 r 0 0",
        "Feature corrupt_bio_byte duplicated",
    ),
    ("0 8 flakey a 0 1 1 6 error_reads corrupt_bio_byte 1 r 0 0", "error_reads is incompatible"),
    (f"0 8 flakey a 0 {UINT_MAX + 1} 1", "Invalid up interval"),
    (f"0 8 flakey a 0 1 {UINT_MAX + 1}", "Invalid down interval"),
    (f"0 8 flakey a 0 {UINT_MAX} 1", "Interval overflow"),
    (f"0 8 flakey a 0 1 1 5 corrupt_bio_byte {UINT_MAX + 1} r 0 0", "Invalid corrupt bio byte"),
    ("0 8 flakey a 0 1 1 12 " + " ".join(["error_reads"] * 12), "Invalid number of feature args"),
]


@pytest.mark.parametrize(
    ("line", "kernel_error"), [pytest.param(*c, id=c[1]) for c in KERNEL_FLAKEY_REFUSES]
)
def test_flakey_refuses_what_the_kernel_refuses(line: str, kernel_error: str) -> None:
    with pytest.raises(TableError):
        parse_line(line)


@pytest.mark.parametrize(
    "line", ["0 8 flakey a 0 1 1 1 DROP_WRITES", "0 8 flakey a 0 1 1 5 corrupt_bio_byte 1 R 0 0"]
)
def test_flakey_features_are_case_insensitive_like_the_kernel(line: str) -> None:
    assert isinstance(spec_of(line), FlakeySpec)


# ---------------------------------------------------------------- delay leg forms


def test_delay_leg_forms() -> None:
    """3 args: one leg for everything; 6: reads, then writes and flushes; 9: three legs
    (delay_ctr: with 6 arguments the flush class is built from the write arguments)."""
    r, w, f = Leg("a", 1, 10), Leg("b", 2, 20), Leg("c", 3, 30)
    assert spec_of("0 8 delay a 1 10") == DelaySpec(r, r, r)
    assert spec_of("0 8 delay a 1 10 b 2 20") == DelaySpec(r, w, w)
    assert spec_of("0 8 delay a 1 10 b 2 20 c 3 30") == DelaySpec(r, w, f)
    assert spec_of("0 8 delay a 1 0 a 1 0 c 3 0") == DelaySpec(
        Leg("a", 1, 0), Leg("a", 1, 0), Leg("c", 3, 0)
    )


# ---------------------------------------------------------------- args_text round trip

VALID_LINES = [
    "0 8 linear a 0",
    "0 8 linear a 123456789",
    "0 12 striped 2 3 a 0 b 7",
    "0 24 striped 3 8 a 0 b 0 c 0",
    "0 16 striped 1 16 a 5",
    "0 8 zero",
    "0 8 error",
    "0 8 flakey a 7 3 2",
    "0 8 flakey a 7 3 2 0",
    "0 8 flakey a 0 3 2 1 drop_writes",
    "0 8 flakey a 0 3 2 1 error_writes",
    "0 8 flakey a 0 3 2 2 error_writes error_reads",
    "0 8 flakey a 0 0 5 5 corrupt_bio_byte 32 w 1 0",
    "0 8 flakey a 0 1 0 6 corrupt_bio_byte 1 r 255 4 drop_writes",
    "0 8 delay a 1 10",
    "0 8 delay a 1 10 b 2 20",
    "0 8 delay a 1 10 a 1 10",
    "0 8 delay a 1 10 b 2 20 c 3 30",
    "0 8 delay a 1 10 b 2 20 b 2 20",
    "0 8 delay a 1 10 a 1 10 a 1 10",
    "0 8 delay a 1 10 a 1 10 c 3 30",
]


@pytest.mark.parametrize("text", VALID_LINES)
def test_args_text_round_trip(text: str) -> None:
    line = parse_line(text)
    again = parse_line(line.text())
    assert again == line
    spec = line.spec
    assert type(spec).parse(spec.args_text().split(), line.length * SECTOR) == spec
    # and once more: the printed form is a fixed point
    assert again.text() == line.text()


@st.composite
def flakey_specs(draw: st.DrawFn) -> FlakeySpec:
    up = draw(st.integers(0, 100))
    down = draw(st.integers(0 if up else 1, 100))
    write_feature = draw(st.sampled_from([None, "drop_writes", "error_writes"]))
    error_reads = draw(st.booleans())
    features = {f for f in (write_feature, "error_reads" if error_reads else None) if f}
    corrupt = None
    directions = "" if write_feature else "w"
    directions += "" if error_reads else "r"
    if directions and draw(st.booleans()):
        corrupt = Corrupt(
            draw(st.integers(1, 10**6)),
            draw(st.sampled_from(directions)),
            draw(st.integers(0, 255)),
            draw(st.integers(0, UINT_MAX)),
        )
    return FlakeySpec(
        draw(st.sampled_from(["a", "b", "dev-0"])),
        draw(st.integers(0, 2**40)),
        up,
        down,
        frozenset(features),
        corrupt,
    )


legs = st.builds(
    Leg, st.sampled_from(["a", "b", "c"]), st.integers(0, 2**40), st.integers(0, 10**6)
)


@settings(max_examples=200, deadline=None)
@given(
    spec=st.one_of(
        flakey_specs(),
        st.builds(DelaySpec, legs, legs, legs),
        legs.flatmap(lambda r: legs.map(lambda w: DelaySpec(r, w, w))),
        legs.map(lambda r: DelaySpec(r, r, r)),
        st.builds(LinearSpec, st.sampled_from(["a", "b"]), st.integers(0, 2**50)),
    )
)
def test_args_text_round_trip_of_any_spec(spec: TargetSpec) -> None:
    parsed = type(spec).parse(spec.args_text().split(), 8 * SECTOR)
    assert parsed == spec
    line = TableLine(0, 8, spec)
    assert parse_line(line.text()) == line


@settings(max_examples=100, deadline=None)
@given(
    stripes=st.integers(1, 5),
    chunk=st.integers(1, 64),
    rows=st.integers(1, 10),
    offsets=st.lists(st.integers(0, 2**40), min_size=5, max_size=5),
)
def test_args_text_round_trip_of_any_striped_spec(
    stripes: int, chunk: int, rows: int, offsets: list[int]
) -> None:
    spec = StripedSpec(chunk, tuple((f"d{i}", offsets[i]) for i in range(stripes)))
    length = stripes * chunk * rows
    assert StripedSpec.parse(spec.args_text().split(), length * SECTOR) == spec


def test_delay_text_folds_repeated_legs() -> None:
    """delay_status prints one leg per three arguments the line had (dc->argc), so a 6-argument
    line whose legs are equal prints 6 arguments in the kernel; nbdcrypt folds equal legs. Both
    parse back to the same spec (checked above); this pins down the folding."""
    assert spec_of("0 8 delay a 1 10 a 1 10").args_text() == "a 1 10"
    assert spec_of("0 8 delay a 1 10 b 2 20 b 2 20").args_text() == "a 1 10 b 2 20"


# ---------------------------------------------------------------- refs


def test_refs_name_the_regions_used() -> None:
    line = parse_line("0 12 striped 2 3 a 10 b 20")
    assert [(r.device, r.offset, r.length) for r in line.refs()] == [
        ("a", 10 * SECTOR, 6 * SECTOR),
        ("b", 20 * SECTOR, 6 * SECTOR),
    ]
    assert [(r.device, r.offset, r.length) for r in parse_line("0 8 linear a 4").refs()] == [
        ("a", 4 * SECTOR, 8 * SECTOR)
    ]
    assert parse_line("0 8 zero").refs() == [] == parse_line("0 8 error").refs()
    delay = parse_line("0 8 delay a 1 0 b 2 0 c 3 0").refs()
    assert sorted((r.device, r.offset, r.length) for r in delay) == [
        ("a", 512, 4096),
        ("b", 1024, 4096),
        ("c", 1536, 4096),
    ]


# ---------------------------------------------------------------- linear


async def test_linear_maps_offsets() -> None:
    devs = memory("a", "b")
    top = mapped(["0 8 linear a 100", "8 8 linear b 3", "16 8 linear a 0"], devs)
    assert top.size == 24 * SECTOR
    data = sector_tags(0, 24)
    await wr(top, 0, data)
    assert await rd(devs["a"], 100 * SECTOR, 8 * SECTOR) == data[: 8 * SECTOR]
    assert await rd(devs["b"], 3 * SECTOR, 8 * SECTOR) == data[8 * SECTOR : 16 * SECTOR]
    assert await rd(devs["a"], 0, 8 * SECTOR) == data[16 * SECTOR :]
    # nothing else was touched
    assert await rd(devs["b"], 0, 3 * SECTOR) == bytes(3 * SECTOR)
    assert await rd(devs["a"], 8 * SECTOR, 92 * SECTOR) == bytes(92 * SECTOR)
    assert await rd(top, 0, 24 * SECTOR) == data
    # an unaligned read across both line boundaries
    assert await rd(top, 8 * SECTOR - 5, 8 * SECTOR + 10) == data[8 * SECTOR - 5 : 16 * SECTOR + 5]


async def test_linear_passes_every_operation_down_remapped() -> None:
    a = Recorder("a")
    top = mapped(["0 8 linear a 100"], {"a": a})
    await wr(top, 10, b"x" * 20)
    await rd(top, 10, 20)
    await trim(top, 512, 1024)
    await wzero(top, 1024, 512)
    await top.cache(Request(Op.CACHE, 0, 4096))
    await extents(top, 0, 4096)
    await top.flush()
    base = 100 * SECTOR
    assert a.log == [
        ("write", base + 10, 20),
        ("read", base + 10, 20),
        ("trim", base + 512, 1024),
        ("write_zeroes", base + 1024, 512),
        ("cache", base, 4096),
        ("block_status", base, 4096),
        ("flush", 0, 0),
    ]


# ---------------------------------------------------------------- striped


def stripe_place(sector: int, chunk: int, stripes: Sequence[tuple[str, int]]) -> tuple[str, int]:
    """Where sector `sector` of a striped target lives: chunk c on stripe c mod n, row c div n."""
    c, within = divmod(sector, chunk)
    row, stripe = divmod(c, len(stripes))
    dev, offset = stripes[stripe]
    return dev, offset + row * chunk + within


@pytest.mark.parametrize(
    ("stripes", "chunk", "rows"),
    [
        ((("a", 0), ("b", 0)), 8, 4),
        ((("a", 5), ("b", 17), ("c", 0)), 3, 5),
        ((("a", 0),), 4, 3),
        ((("a", 0), ("a", 64)), 2, 8),
        ((("a", 1), ("b", 2), ("c", 3), ("b", 90)), 16, 2),
    ],
)
async def test_striped_layout(stripes: tuple[tuple[str, int], ...], chunk: int, rows: int) -> None:
    devs = memory("a", "b", "c")
    n = len(stripes)
    sectors = n * chunk * rows
    pairs = " ".join(f"{d} {o}" for d, o in stripes)
    top = mapped([f"0 {sectors} striped {n} {chunk} {pairs}"], devs)
    data = sector_tags(1, sectors)
    await wr(top, 0, data)
    for s in range(sectors):
        dev, where = stripe_place(s, chunk, stripes)
        got = await rd(devs[dev], where * SECTOR, SECTOR)
        assert got == data[s * SECTOR : (s + 1) * SECTOR], (s, dev, where)
    # the whole target reads back, and so do reads across every chunk boundary
    assert await rd(top, 0, sectors * SECTOR) == data
    for c in range(1, sectors // chunk):
        at = c * chunk * SECTOR
        assert await rd(top, at - 3, 7) == data[at - 3 : at + 4]


async def test_striped_splits_at_chunk_boundaries_only() -> None:
    a, b = Recorder("a"), Recorder("b")
    top = mapped(["0 32 striped 2 8 a 0 b 100"], {"a": a, "b": b})
    await wr(top, 4 * SECTOR, bytes(16 * SECTOR))  # chunk 0 (half), 1, 2 (half)
    assert a.log == [("write", 4 * SECTOR, 4 * SECTOR), ("write", 8 * SECTOR, 4 * SECTOR)]
    assert b.log == [("write", 100 * SECTOR, 8 * SECTOR)]
    a.log.clear()
    b.log.clear()
    await wzero(top, 0, 32 * SECTOR)
    await trim(top, 8 * SECTOR + 1, 2)
    assert [x[0] for x in a.log] == ["write_zeroes", "write_zeroes"]
    assert b.log == [
        ("write_zeroes", 100 * SECTOR, 8 * SECTOR),
        ("write_zeroes", 108 * SECTOR, 8 * SECTOR),
        ("trim", 100 * SECTOR + 1, 2),
    ]
    a.log.clear()
    b.log.clear()
    await top.flush()  # a flush reaches every stripe (num_flush_bios = #stripes)
    assert a.ops() == ["flush"] == b.ops()


def test_striped_status_is_the_kernel_format() -> None:
    top = mapped(["0 16 striped 2 8 a 0 b 0"], memory("a", "b"))
    assert top.status() == ["0 16 striped 2 a b 1 AA"]


# ---------------------------------------------------------------- zero and error


async def test_zero_reads_zeroes_and_drops_writes() -> None:
    a = Recorder("a")
    top = mapped(["0 8 linear a 0", "8 8 zero", "16 8 linear a 8"], {"a": a})
    data = rand(24 * SECTOR, 1)
    await wr(top, 0, data)
    expected = data[: 8 * SECTOR] + bytes(8 * SECTOR) + data[16 * SECTOR :]
    assert await rd(top, 0, 24 * SECTOR) == expected
    # nothing of the middle third went anywhere
    assert await rd(a, 0, 16 * SECTOR) == data[: 8 * SECTOR] + data[16 * SECTOR :]
    assert a.log[:2] == [("write", 0, 8 * SECTOR), ("write", 8 * SECTOR, 8 * SECTOR)]
    a.log.clear()
    zero_only = mapped(["0 8 zero"], {})
    await trim(zero_only, 0, 4096)
    await wzero(zero_only, 0, 4096, ReqFlag.NO_HOLE | ReqFlag.FAST_ZERO)
    await zero_only.flush()
    await zero_only.cache(Request(Op.CACHE, 0, 4096))
    assert await rd(zero_only, 1, 4095) == bytes(4095)
    assert await extents(zero_only, 0, 4096) == [Extent(4096, EXTENT_HOLE | EXTENT_ZERO)]
    assert a.log == []


async def test_error_fails_io_with_eio() -> None:
    a = Recorder("a")
    top = mapped(["0 8 linear a 0", "8 8 error"], {"a": a})
    await expect_eio(rd(top, 8 * SECTOR, 10))
    await expect_eio(wr(top, 8 * SECTOR, b"x"))
    await expect_eio(trim(top, 8 * SECTOR, 512))
    await expect_eio(wzero(top, 8 * SECTOR, 512))
    # a request that touches the error line fails
    await expect_eio(rd(top, 4 * SECTOR, 8 * SECTOR))
    # the linear line works; flush has nothing to do on an error line (num_flush_bios = 0)
    await wr(top, 0, b"y" * 512)
    assert await rd(top, 0, 512) == b"y" * 512
    await top.flush()
    assert await extents(top, 8 * SECTOR, 512) == [Extent(512, 0)]


def test_crypto_passing_flags_follow_the_design() -> None:
    passes = {name: spec.passes_crypto for name, spec in TARGETS.items()}
    assert passes["linear"] and passes["striped"] and passes["flakey"] and passes["error"]
    assert not passes["zero"] and not passes["delay"]


def test_caps_of_targets() -> None:
    devs = memory("a", "b")
    for line in ["0 8 linear a 0", "0 16 striped 2 8 a 0 b 0", "0 8 flakey a 0 1 1"]:
        caps = Table.build(parse_table([line]), devs).targets[0].caps
        assert caps == MemoryDevice.caps, line
    zero = Table.build(parse_table(["0 8 zero"]), {}).targets[0].caps
    assert (zero.can_trim, zero.can_zero, zero.can_extents) == (True, True, True)
    error = Table.build(parse_table(["0 8 error"]), {}).targets[0].caps
    assert error.can_extents is False
    top = mapped(["0 8 linear a 0", "8 8 zero"], devs)
    assert top.caps == DeviceCaps(
        can_trim=True, can_zero=True, can_fast_zero=True, can_multi_conn=True, can_extents=True
    )


# ---------------------------------------------------------------- flakey


class FakeClock:
    """Stands in for the flakey module's `time`: monotonic() is whatever the test says."""

    def __init__(self) -> None:
        self.now = 10_000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(flakey_module, "time", fake)  # only flakey's view of time changes
    return fake


def flakey(features: str, clock: FakeClock, up: int = 2, down: int = 3) -> tuple[Recorder, Any]:
    a = Recorder("a")
    line = f"0 16 flakey a 8 {up} {down}" + (f" {features}" if features else "")
    top = mapped([line], {"a": a})
    return a, top


def go_down(clock: FakeClock, start: float, up: int = 2) -> None:
    clock.now = start + up + 0.5


async def test_flakey_cycle(clock: FakeClock) -> None:
    start = clock.now
    a, top = flakey("", clock, up=2, down=3)
    target = top.live.targets[0]
    states = {}
    for t in [0, 0.5, 1.99, 2, 4.99, 5, 6.9, 7, 9.99, 10, 1000 * 5 + 1, 1000 * 5 + 2]:
        clock.now = start + t
        states[t] = target.status()
    assert states == {
        0: "up",
        0.5: "up",
        1.99: "up",
        2: "down",
        4.99: "down",
        5: "up",
        6.9: "up",
        7: "down",
        9.99: "down",
        10: "up",
        5001: "up",
        5002: "down",
    }
    assert top.status() == ["0 16 flakey down"]
    # while up, flakey is linear at its offset
    clock.now = start
    await wr(top, 0, b"u" * 1024)
    assert await rd(a, 8 * SECTOR, 1024) == b"u" * 1024
    assert await rd(top, 0, 1024) == b"u" * 1024


async def test_flakey_always_down_and_always_up(clock: FakeClock) -> None:
    _, down = flakey("", clock, up=0, down=1)
    _, up = flakey("", clock, up=1, down=0)
    for t in range(5):
        clock.now += t * 0.7
        await expect_eio(rd(down, 0, 512))
        assert await rd(up, 0, 512) == bytes(512)


async def test_flakey_down_without_features_fails_reads_and_writes(clock: FakeClock) -> None:
    a, top = flakey("", clock)
    await wr(top, 0, b"k" * 512)
    go_down(clock, clock.now)
    await expect_eio(rd(top, 0, 512))
    await expect_eio(wr(top, 0, b"z" * 512))
    assert await rd(a, 8 * SECTOR, 512) == b"k" * 512
    assert [x for x in a.log if x[0] == "write"] == [("write", 8 * SECTOR, 512)]


@pytest.mark.parametrize(
    ("features", "outcome"),
    [
        ("", "eio"),
        ("0", "eio"),
        ("1 error_writes", "eio"),
        ("1 drop_writes", "dropped"),
        ("1 error_reads", "done"),
        ("5 corrupt_bio_byte 1 r 0 0", "done"),
        ("5 corrupt_bio_byte 1 w 0 0", "done"),
    ],
)
@pytest.mark.parametrize("op", ["trim", "write_zeroes"])
async def test_flakey_down_treats_trim_and_zeroes_as_writes(
    clock: FakeClock, features: str, outcome: str, op: str
) -> None:
    """dm-flakey maps discards and write-zeroes as WRITE-direction bios: while down they fail
    without features or with error_writes, are dropped with drop_writes, and otherwise pass."""
    a, top = flakey(features, clock)
    await wr(top, 0, b"k" * 512)
    go_down(clock, clock.now)
    request = (trim if op == "trim" else wzero)(top, 0, 512)
    if outcome == "eio":
        await expect_eio(request)
    else:
        await request
    expected = bytes(512) if outcome == "done" else b"k" * 512
    assert await rd(a, 8 * SECTOR, 512) == expected


@pytest.mark.parametrize("features", ["", "1 error_writes", "1 drop_writes"])
async def test_flakey_down_passes_flush(clock: FakeClock, features: str) -> None:
    """A documented difference (docs/TARGETS.md): a flush goes down even while down. In the
    kernel it is a WRITE-direction bio that dm-flakey maps (num_flush_bios = 1), so it fails
    with EIO without features or with error_writes, and is dropped with drop_writes."""
    a, top = flakey(features, clock)
    go_down(clock, clock.now)
    await top.flush()
    assert a.ops() == ["flush"]


async def test_flakey_drop_writes(clock: FakeClock) -> None:
    start = clock.now
    a, top = flakey("1 drop_writes", clock)
    await wr(top, 0, b"1" * 1024)
    go_down(clock, start)
    await wr(top, 512, b"2" * 1024)  # acknowledged, never written
    assert await rd(top, 0, 1024) == b"1" * 1024  # reads work while down
    assert await rd(a, 8 * SECTOR, 1536) == b"1" * 1024 + bytes(512)
    assert a.ops().count("write") == 1
    clock.now = start + 5  # up again
    await wr(top, 512, b"3" * 512)
    assert await rd(top, 0, 1024) == b"1" * 512 + b"3" * 512


async def test_flakey_error_writes(clock: FakeClock) -> None:
    a, top = flakey("1 error_writes", clock)
    await wr(top, 0, b"1" * 512)
    go_down(clock, clock.now)
    await expect_eio(wr(top, 0, b"2" * 512))
    assert await rd(top, 0, 512) == b"1" * 512
    assert a.ops().count("write") == 1


async def test_flakey_error_reads(clock: FakeClock) -> None:
    a, top = flakey("1 error_reads", clock)
    go_down(clock, clock.now)
    await expect_eio(rd(top, 0, 512))
    await wr(top, 0, b"w" * 512)  # writes go through
    assert a.ops() == ["write"]  # the failed read never reached the device
    assert await rd(a, 8 * SECTOR, 512) == b"w" * 512


async def test_flakey_error_reads_and_writes(clock: FakeClock) -> None:
    _, top = flakey("2 error_reads error_writes", clock)
    go_down(clock, clock.now)
    await expect_eio(rd(top, 0, 512))
    await expect_eio(wr(top, 0, b"w" * 512))


async def test_flakey_corrupt_reads(clock: FakeClock) -> None:
    start = clock.now
    a, top = flakey("5 corrupt_bio_byte 3 r 65 0", clock)
    data = rand(2048, 2)
    await wr(top, 0, data)
    assert await rd(top, 0, 2048) == data  # up: untouched
    go_down(clock, start)
    got = await rd(top, 100, 1000)
    assert got == data[100:102] + b"A" + data[103:1100]  # the 3rd byte of every read
    assert await rd(top, 0, 2) == data[:2]  # a read shorter than N bytes is not corrupted
    assert await rd(a, 8 * SECTOR, 2048) == data  # the device itself is intact
    await wr(top, 0, b"w" * 16)  # writes pass unchanged while down
    assert await rd(a, 8 * SECTOR, 16) == b"w" * 16
    clock.now = start + 5
    assert await rd(top, 0, 16) == b"w" * 16


async def test_flakey_corrupt_flags_are_not_used(clock: FakeClock) -> None:
    """A documented difference (docs/TARGETS.md): the kernel corrupts only bios whose flags
    include all of <flags>; nbdcrypt checks the number and corrupts every read."""
    a, top = flakey("5 corrupt_bio_byte 1 r 65 4096", clock)
    await wr(a, 8 * SECTOR, b"xyz")
    go_down(clock, clock.now)
    assert await rd(top, 0, 3) == b"Ayz"


async def test_flakey_corrupt_writes(clock: FakeClock) -> None:
    start = clock.now
    a, top = flakey("5 corrupt_bio_byte 1 w 0 0", clock)
    go_down(clock, start)
    data = bytearray(b"x" * 600)
    await wr(top, 10, bytes(data))
    assert data == b"x" * 600  # the caller's buffer is not touched
    assert await rd(a, 8 * SECTOR + 10, 600) == b"\0" + b"x" * 599  # what landed is
    assert await rd(top, 10, 600) == b"\0" + b"x" * 599  # reads pass unchanged
    clock.now = start + 5
    await wr(top, 10, b"y" * 4)
    assert await rd(a, 8 * SECTOR + 10, 4) == b"y" * 4


async def test_flakey_corrupt_writes_with_error_reads(clock: FakeClock) -> None:
    a, top = flakey("6 error_reads corrupt_bio_byte 2 w 66 0", clock)
    go_down(clock, clock.now)
    await wr(top, 0, b"abc")
    assert await rd(a, 8 * SECTOR, 3) == b"aBc"
    await expect_eio(rd(top, 0, 3))


async def test_flakey_corrupt_is_per_request_piece(clock: FakeClock) -> None:
    """A request over two flakey lines is split at the line boundary, like a bio: each piece
    gets its own Nth byte corrupted."""
    a = Recorder("a")
    top = mapped(
        [
            "0 2 flakey a 0 0 1 5 corrupt_bio_byte 1 r 42 0",
            "2 2 flakey a 2 0 1 5 corrupt_bio_byte 1 r 43 0",
        ],
        {"a": a},
    )
    await wr(a, 0, b"\xff" * 2048)
    got = await rd(top, 0, 2048)
    assert got == b"\x2a" + b"\xff" * 1023 + b"\x2b" + b"\xff" * 1023


# ---------------------------------------------------------------- delay


class Gate:
    """Replaces delay's `asyncio`: sleep() records the seconds and waits until opened."""

    def __init__(self) -> None:
        self.slept: list[float] = []
        self.opened = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await self.opened.wait()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    fake = Gate()
    monkeypatch.setattr(delay_module, "asyncio", fake)
    return fake


async def spin(times: int = 20) -> None:
    for _ in range(times):
        await asyncio.sleep(0)


async def test_delay_waits_before_the_io_reaches_the_device(gate: Gate) -> None:
    a = Recorder("a")
    top = mapped(["0 16 delay a 4 250"], {"a": a})
    task = asyncio.create_task(wr(top, 0, b"d" * 512))
    await spin()
    assert not task.done()
    assert a.log == []  # held in the target, not yet below
    assert gate.slept == [0.25]
    gate.opened.set()
    await task
    assert a.log == [("write", 4 * SECTOR, 512)]
    assert await rd(top, 0, 512) == b"d" * 512
    assert gate.slept == [0.25, 0.25]


async def test_delay_with_zero_ms_does_not_wait(gate: Gate) -> None:
    a = Recorder("a")
    top = mapped(["0 16 delay a 0 0"], {"a": a})
    await wr(top, 0, b"n" * 10)
    assert await rd(top, 0, 10) == b"n" * 10
    await top.flush()
    assert gate.slept == []


async def test_delay_routes_reads_writes_and_flushes_to_their_legs(gate: Gate) -> None:
    r, w, f = Recorder("r"), Recorder("w"), Recorder("f")
    top = mapped(["0 16 delay r 1 0 w 2 0 f 3 0"], {"r": r, "w": w, "f": f})
    await wr(top, 0, b"W" * 512)
    await trim(top, 512, 512)
    await wzero(top, 1024, 512)
    got = await rd(top, 0, 512)
    await extents(top, 0, 512)
    await top.flush()
    assert got == bytes(512)  # read from the read leg, which nobody wrote
    assert w.log == [
        ("write", 2 * SECTOR, 512),
        ("trim", 3 * SECTOR, 512),
        ("write_zeroes", 4 * SECTOR, 512),
    ]
    assert r.log == [("read", 1 * SECTOR, 512), ("block_status", 1 * SECTOR, 512)]
    assert f.log == [("flush", 0, 0)]
    assert gate.slept == []


async def test_delay_six_arguments_flush_to_the_write_leg(gate: Gate) -> None:
    r, w = Recorder("r"), Recorder("w")
    top = mapped(["0 16 delay r 0 0 w 0 0"], {"r": r, "w": w})
    await top.flush()
    await wr(top, 0, b"x")
    assert r.log == []
    assert w.ops() == ["flush", "write"]


async def test_delay_each_leg_waits_its_own_time(gate: Gate) -> None:
    r, w, f = Recorder("r"), Recorder("w"), Recorder("f")
    top = mapped(["0 16 delay r 0 10 w 0 20 f 0 30"], {"r": r, "w": w, "f": f})
    tasks = [
        asyncio.create_task(rd(top, 0, 1)),
        asyncio.create_task(wr(top, 0, b"x")),
        asyncio.create_task(top.flush()),
    ]
    await spin()
    assert sorted(gate.slept) == [0.01, 0.02, 0.03]
    assert not any(t.done() for t in tasks)
    assert r.log == w.log == f.log == []
    gate.opened.set()
    await asyncio.gather(*tasks)
    assert (r.ops(), w.ops(), f.ops()) == (["read"], ["write"], ["flush"])


async def test_delay_really_sleeps() -> None:
    """With the real clock: a 20 ms delay lets a request on another table that has none finish
    first (ordering only, no durations)."""
    a = MemoryDevice("a", 64 * KiB)
    slow = mapped(["0 16 delay a 0 20"], {"a": a}, "slow")
    fast = mapped(["0 16 linear a 0"], {"a": a}, "fast")
    done: list[str] = []

    async def run(name: str, dev: Device) -> None:
        await wr(dev, 0, name.encode())
        done.append(name)

    await asyncio.gather(run("slow", slow), run("fast", fast))
    assert done == ["fast", "slow"]
    assert await rd(a, 0, 4) == b"slow"


# ---------------------------------------------------------------- every valid line serves I/O


@pytest.mark.parametrize("text", VALID_LINES)
async def test_every_valid_line_builds_and_serves_io(
    text: str, clock: FakeClock, gate: Gate
) -> None:
    gate.opened.set()
    devs: dict[str, Device] = {n: MemoryDevice(n, 2**50) for n in ("a", "b", "c")}
    top = mapped([text], devs)
    assert top.size == parse_line(text).length * SECTOR
    if text.split()[2] == "error":
        await expect_eio(wr(top, 0, b"q" * 100))
        await expect_eio(rd(top, 0, 100))
        await top.flush()
        return
    await wr(top, 0, b"q" * 100)
    got = await rd(top, 0, 100)
    await top.flush()
    spec = top.live.lines[0].spec
    if "zero" in text.split():
        assert got == bytes(100)
    elif isinstance(spec, DelaySpec) and spec.read_leg != spec.write_leg:
        assert got == bytes(100)  # written to the write leg, read from the read leg
    elif "corrupt_bio_byte" not in text:
        assert got == b"q" * 100
