"""The stress tool's pure parts: the verification models, the workload, the data pattern, the
URI and option parsers.

RegionModel is checked with hypothesis against a plain bytearray "server" that does what the NBD
spec allows (a trim may be ignored, done, done in part, or leave noise where the export says so;
a failed write may land in part): every honest read must verify, and a read with one byte
changed where the client knows the content must be reported at exactly that byte.
"""

from __future__ import annotations

import argparse
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdcrypt.stress import options as so
from nbdcrypt.stress.model import RegionModel
from nbdcrypt.stress.pattern import describe, pattern, run_tag
from nbdcrypt.stress.shared import SETUP_SEQ, SharedModel
from nbdcrypt.stress.uri import DEFAULT_PORT, UriError, parse_uri
from nbdcrypt.stress.workload import FLUSH_EVERY, ClientLayout, Kind, Op, SharedLayout, Workload

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# RegionModel against a bytearray server -------------------------------------------------------


class Disk:
    """A server's content, and what the client may know of each byte."""

    def __init__(self, length: int, rng: random.Random) -> None:
        self.content = bytearray(rng.randbytes(length))
        self.state = ["adopt"] * length  # adopt, known, trimmed, any
        self.rng = rng

    def write(self, lo: int, data: bytes) -> None:
        self.content[lo : lo + len(data)] = data
        self.state[lo : lo + len(data)] = ["known"] * len(data)

    def trim(self, lo: int, n: int, how: int, any_content: bool) -> None:
        for i in range(lo, lo + n):
            s = self.state[i]
            self.state[i] = "any" if any_content or s in ("adopt", "any") else "trimmed"
        if how == 1:  # discarded
            self.content[lo : lo + n] = bytes(n)
        elif how == 2:  # discarded in part
            for i in range(lo, lo + n, 2):
                self.content[i] = 0
        elif how == 3 and any_content:  # noise, as a hole under a cipher reads
            self.content[lo : lo + n] = self.rng.randbytes(n)

    def fail(self, lo: int, n: int) -> None:
        """A write that failed halfway."""
        half = n // 2
        self.content[lo : lo + half] = self.rng.randbytes(half)
        self.state[lo : lo + n] = ["any"] * n

    def read(self, lo: int, n: int) -> bytes:
        data = bytes(self.content[lo : lo + n])
        for i in range(lo, lo + n):
            if self.state[i] == "adopt":
                self.state[i] = "known"
        return data


OPS = st.sampled_from(["write", "zero", "trim", "read", "bad-read", "fail"])


@SETTINGS
@given(
    grain=st.sampled_from([1, 8, 512]),
    any_content=st.booleans(),
    seed=st.integers(0, 1 << 32),
    ops=st.lists(
        st.tuples(OPS, st.integers(0, 31), st.integers(1, 8), st.integers(0, 3)), max_size=60
    ),
)
def test_region_model_against_a_bytearray(
    grain: int, any_content: bool, seed: int, ops: list[tuple[str, int, int, int]]
) -> None:
    units = 32
    start = 7 * grain
    rng = random.Random(seed)
    disk = Disk(units * grain, rng)
    model = RegionModel(start, units * grain, grain)
    for op, first, most, how in ops:
        lo, n = first * grain, min(most, units - first) * grain
        offset = start + lo
        if op == "write":
            data = rng.randbytes(n)
            model.write(offset, data)
            disk.write(lo, data)
        elif op == "zero":
            model.zero(offset, n)
            disk.write(lo, bytes(n))
        elif op == "trim":
            model.trim(offset, n, any_content=any_content)
            disk.trim(lo, n, how, any_content)
        elif op == "fail":
            model.forget(offset, n)
            disk.fail(lo, n)
        elif op == "read":
            assert model.check_read(offset, disk.read(lo, n)) is None
        else:  # a read with one byte the client knows changed
            known = [i for i in range(lo, lo + n) if disk.state[i] == "known"]
            honest = disk.read(lo, n)
            if not known:
                assert model.check_read(offset, honest) is None
                continue
            at = rng.choice(known)
            bad = bytearray(honest)
            bad[at - lo] ^= 1 << (how % 8)
            mismatch = model.check_read(offset, bad)
            assert mismatch is not None
            assert (mismatch.at, mismatch.differing) == (start + at, 1)
            assert mismatch.found[0] == bad[at - lo] and mismatch.expected[0] == disk.content[at]
            assert mismatch.offset == offset and mismatch.length == n


def test_trimmed_bytes_may_be_old_or_zero_but_nothing_else() -> None:
    model = RegionModel(0, 16, 1)
    model.write(0, b"ABCDEFGHIJKLMNOP")
    model.trim(4, 8)
    assert model.check_read(0, b"ABCD\0\0\0\0IJKLMNOP") is None
    assert model.check_read(0, b"ABCDE\0G\0I\0\0LMNOP") is None  # old and zero mixed, byte by byte
    mismatch = model.check_read(0, b"ABCDEFGxIJKLMNOP")
    assert (
        mismatch is not None and mismatch.at == 7 and mismatch.rule == "trimmed: old data or zeroes"
    )
    assert "1 of 16 bytes differ, the first at 0x7" in mismatch.describe()
    model.write(4, b"wxyz")  # written again: exact once more
    assert model.check_read(4, b"wxyz") is None
    assert model.check_read(4, b"\0xyz") is not None


def test_unknown_content_is_adopted_once_then_must_stay() -> None:
    model = RegionModel(4096, 4096, 512)
    first = random.Random(1).randbytes(1024)
    assert model.check_read(4096, first) is None
    assert model.check_read(4096, first) is None
    changed = first[:600] + b"!" + first[601:]
    mismatch = model.check_read(4096, changed)
    assert mismatch is not None and mismatch.at == 4096 + 600
    assert model.check_read(5120, b"\xaa" * 512) is None  # still unknown there: adopted
    with pytest.raises(ValueError, match="whole grains"):
        model.check_read(4096 + 1, b"x" * 512)


def test_a_mismatch_report_shows_a_few_bytes_not_the_buffer() -> None:
    model = RegionModel(0, 1 << 20, 1)
    model.zero(0, 1 << 20)
    mismatch = model.check_read(0, b"\xff" * (1 << 20))
    assert mismatch is not None
    assert (
        mismatch.differing == 1 << 20
        and len(mismatch.found) == 16
        and len(mismatch.describe()) < 300
    )


# SharedModel: flush ordering ------------------------------------------------------------------

RUN = 9
CELL = 16
LAYOUT = SharedLayout(start=1024, cell=CELL, cells=4, members=2)  # cells 0, 2 by 0; 1, 3 by 1


def version_data(writer: int, seq: int, cell: int) -> bytes:
    return pattern(RUN, writer, seq, LAYOUT.start + cell * CELL, CELL)


def setup() -> SharedModel:
    model = SharedModel(LAYOUT, RUN)
    for cell in range(4):
        v = model.write_issued(cell, cell % 2, SETUP_SEQ)
        model.write_done(v, ok=True, fua=True)
    return model


def read(model: SharedModel, cell: int, reader: int, data: bytes) -> str | None:
    ticket = model.read_issued(cell, 1, reader)
    mismatch = model.read_done(ticket, data)
    return None if mismatch is None else mismatch.rule


def test_shared_reads_follow_flush_order() -> None:
    model = setup()
    setup0 = version_data(0, SETUP_SEQ, 0)
    assert read(model, 0, 1, setup0) is None
    v1 = model.write_issued(0, 0, 1)
    model.write_done(v1, ok=True, fua=False)
    assert read(model, 0, 1, setup0) is None  # acked, not flushed: old data is still allowed
    assert read(model, 0, 1, version_data(0, 1, 0)) is None
    rule = read(model, 0, 0, setup0)  # but not to its writer, on its own connection
    assert rule is not None and "client 0's op #1" in rule
    tick = model.flush_issued()
    model.flush_done(tick, ok=True)
    rule = read(model, 0, 1, setup0)  # flushed: the old data is stale now
    assert rule is not None and rule.startswith("shared cell 0: client 0's op #1 (published)")
    assert read(model, 0, 1, version_data(0, 1, 0)) is None


def test_a_flush_covers_only_writes_acknowledged_before_it_was_sent() -> None:
    model = setup()
    v1 = model.write_issued(2, 0, 1)
    tick = model.flush_issued()  # sent while v1 is in flight
    model.write_done(v1, ok=True, fua=False)
    model.flush_done(tick, ok=True)
    assert read(model, 2, 1, version_data(0, SETUP_SEQ, 2)) is None
    v2 = model.write_issued(2, 0, 2)
    model.write_done(v2, ok=True, fua=True)  # FUA publishes at its reply
    assert read(model, 2, 1, version_data(0, 1, 2)) is not None
    assert read(model, 2, 1, version_data(0, 2, 2)) is None


def test_a_read_cannot_see_a_write_sent_after_its_reply() -> None:
    model = setup()
    ticket = model.read_issued(1, 1, 0)
    done = model.read_done(ticket, version_data(1, 5, 1))  # op #5 was never sent
    assert done is not None and "bytes differ" in done.describe()
    ticket = model.read_issued(1, 1, 0)
    v = model.write_issued(1, 1, 6)  # in flight while the read is: either may be seen, mixed
    mixed = bytearray(version_data(1, SETUP_SEQ, 1))
    mixed[8:] = version_data(1, 6, 1)[8:]
    assert model.read_done(ticket, bytes(mixed)) is None
    model.write_done(v, ok=True, fua=False)


def test_multi_cell_reads_and_failed_writes() -> None:
    model = setup()
    data = b"".join(version_data(c % 2, SETUP_SEQ, c) for c in range(4))
    ticket = model.read_issued(0, 4, 1)
    assert model.read_done(ticket, data) is None
    bad = model.write_issued(3, 1, 7)
    model.write_done(bad, ok=False, fua=False)
    before = model.unchecked
    assert read(model, 3, 0, b"\x99" * CELL) is None  # a failed write: anything, not checked
    assert model.unchecked == before + 1
    good = model.write_issued(3, 1, 8)
    model.write_done(good, ok=True, fua=True)
    assert read(model, 3, 0, b"\x99" * CELL) is not None  # checked again once a later one lands


def test_published_history_is_pruned() -> None:
    model = setup()
    for seq in range(100):
        v = model.write_issued(0, 0, seq)
        model.write_done(v, ok=True, fua=False)
        if seq % FLUSH_EVERY == 0:
            model.flush_done(model.flush_issued(), ok=True)
    assert len(model.cells[0].versions) <= FLUSH_EVERY + 1


# Workload ---------------------------------------------------------------------------------------

MIX = {Kind.READ: 40, Kind.WRITE: 30, Kind.FLUSH: 5, Kind.TRIM: 10, Kind.ZERO: 15}


def layout(member: int = 0, align: int = 512, shared: SharedLayout | None = None) -> ClientLayout:
    return ClientLayout(
        client=member,
        export=0,
        member=member,
        region_start=(1 << 24) * member,
        region_length=1 << 22,
        align=align,
        max_size=1 << 17,
        shared=shared,
    )


def first_ops(seed: int, lay: ClientLayout, n: int = 500, mix: dict[Kind, int] = MIX) -> list[Op]:
    ops = iter(Workload(seed, lay, mix, fua_percent=20))
    return [next(ops) for _ in range(n)]


def test_the_same_seed_replays_the_same_operations() -> None:
    assert first_ops(42, layout()) == first_ops(42, layout())
    assert first_ops(42, layout()) != first_ops(43, layout())
    assert [o.kind for o in first_ops(42, layout(0))] != [o.kind for o in first_ops(42, layout(1))]


@pytest.mark.parametrize("align", [1, 512, 4096])
def test_operations_stay_in_the_region_aligned_and_bounded(align: int) -> None:
    lay = layout(member=2, align=align)
    ops = first_ops(7, lay, 3000)
    assert {o.kind for o in ops} == set(MIX)
    assert any(o.fua for o in ops) and not all(o.fua for o in ops if o.kind.modifies)
    for op in ops:
        if op.kind is Kind.FLUSH:
            assert (op.offset, op.length, op.fua) == (0, 0, False)
            continue
        assert lay.region_start <= op.offset and op.end <= lay.region_start + lay.region_length
        assert op.offset % align == 0 and op.length % align == 0
        assert 0 < op.length <= lay.max_size
    sizes = {o.length for o in ops if o.length}
    assert min(sizes) < 8 * align and max(sizes) > lay.max_size // 4  # small ones and big ones
    assert [o.seq for o in ops] == list(range(len(ops)))


def test_shared_writes_go_to_owned_cells_and_are_flushed() -> None:
    shared = SharedLayout(start=1 << 30, cell=4096, cells=10, members=3)
    mix = {Kind.SHARED_WRITE: 5, Kind.SHARED_READ: 5, Kind.READ: 1}
    lay = layout(member=1, shared=shared)
    ops = first_ops(3, lay, 2000, mix)
    writes = 0
    for i, op in enumerate(ops):
        if op.kind is Kind.SHARED_WRITE:
            writes += 1
            assert shared.owner(shared.cell_of(op.offset)) == 1 and op.length == 4096
            if writes % FLUSH_EVERY == 0:
                assert ops[i + 1].kind is Kind.FLUSH
        elif op.kind is Kind.SHARED_READ:
            assert op.offset >= shared.start and op.end <= shared.start + 10 * 4096
            assert op.length in (4096, 8192, 12288, 16384)
    assert writes > 100


# Data pattern -----------------------------------------------------------------------------------


def test_pattern_words_name_run_client_op_and_offset() -> None:
    data = pattern(0xAB, 5, 77, 4096, 24)
    words = struct.unpack(">3Q", data)
    for i, word in enumerate(words):
        assert word == 0xAB << 56 | 5 << 44 | 77 << 24 | (4096 // 8 + i)
    assert pattern(0xAB, 5, 77, 4099, 10) == data[3:13]  # unaligned: the same words, cut
    assert describe(0xAB, data, 4096, 4100) == "client 5 op #77"
    moved = pattern(0xAB, 5, 77, 8192, 24)
    assert describe(0xAB, moved, 4096, 4100).startswith("client 5 op #77, meant for offset 0x2000")
    assert describe(0xAB, bytes(24), 4096, 4100) == "zeroes"
    assert describe(0xAB, b"\xee" * 24, 4096, 4100) == "bytes of 0xee"
    assert describe(0xAC, data, 4096, 4100) == "not data of this run"
    assert describe(0xAB, data, 4096, 4120) == ""  # the word is not all there
    assert 1 <= run_tag(0) <= 255 and run_tag(1) == run_tag(1)


# URIs and options -------------------------------------------------------------------------------


def test_uris() -> None:
    u = parse_uri("nbd://127.0.0.1:10900/my%20disk")
    assert (u.host, u.port, u.export, u.socket) == ("127.0.0.1", 10900, "my disk", None)
    assert parse_uri("nbd://localhost").port == DEFAULT_PORT and parse_uri("nbd://h").export == ""
    assert parse_uri("nbd://[::1]:99/x").host == "::1"
    u = parse_uri("nbd+unix:///e?socket=/tmp/a+b.sock")
    assert (u.export, u.socket, u.is_unix) == ("e", "/tmp/a+b.sock", True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nbds://h/x", "nbds:// is not supported"),
        ("http://h/x", "not an NBD URI"),
        ("nbd+unix:///x", "exactly one ?socket=PATH"),
        ("nbd+unix://host/x?socket=/s", "takes no host"),
        ("nbd+unix:///x?socket=/s&tls=1", "unknown query parameter 'tls'"),
        ("nbd://h:99999/x", "invalid port"),
        ("nbd://h:x/x", "invalid port"),
        ("nbd:///x", "missing host"),
        ("nbd://[::1/x", "Invalid IPv6 URL"),
        ("nbd://[::zz]/x", "does not appear to be an IPv4 or IPv6"),
        ("nbd://u@h/x", "user name"),
        ("nbd://h/a%00b", "no NUL"),
    ],
)
def test_bad_uris(text: str, message: str) -> None:
    with pytest.raises(UriError, match=message.replace("?", r"\?")):
        parse_uri(text)


def parse(*argv: str) -> so.StressOptions:
    parser = argparse.ArgumentParser()
    so.add_parser(parser.add_subparsers())
    return so.options_from_args(parser.parse_args(["stress", *argv]))


def test_options_defaults_and_limits() -> None:
    opts = parse("nbd://h/x")
    assert opts.duration == so.DEFAULT_DURATION and opts.ops is None and opts.clients == 4
    assert opts.mix == so.parse_mix(so.DEFAULT_MIX) and Kind.SHARED_READ not in opts.mix
    opts = parse("nbd://h/x", "--ops", "100", "--seed", "5", "--shared", "1M", "-n", "2")
    assert opts.duration is None and opts.ops == 100 and opts.seed == 5 and opts.shared == 1 << 20
    assert opts.mix[Kind.SHARED_WRITE] > 0
    opts = parse(
        "nbd://h/x", "--duration", "2m", "--mix", "read=1,write-zeroes=2", "--abuse", "vanish"
    )
    assert (
        opts.duration == 120
        and opts.mix == {Kind.READ: 1, Kind.ZERO: 2}
        and opts.abuse == ("vanish",)
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mix", "read=40,copy=3"], "unknown operation 'copy'"),
        (["--mix", "read"], "expected read=WEIGHT"),
        (["--mix", "read=0"], "every weight is 0"),
        (["--mix", "read=1,read=2"], "given twice"),
        (["--mix", "shared-read=1"], "needs a shared region"),
        (["--abuse", "flood"], "unknown kind 'flood'"),
        (["--duration", "0"], "more than 0"),
        (["--duration", "soon"], "invalid duration"),
        (["--clients", "5000"], "at most 4096"),
        (["nbd://h/y", "nbd://h/z", "-n", "2"], "fewer clients than URIs"),
        (["--watch-pid", "999999999"], "no such process"),
    ],
)
def test_option_errors(argv: list[str], message: str) -> None:
    with pytest.raises(so.UsageError, match=message):
        parse("nbd://h/x", *argv)
