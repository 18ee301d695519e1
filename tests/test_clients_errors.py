"""Every protocol error is the one the NBD spec names, and the session goes on after it.

libnbd (python3-libnbd, strict mode off) sends what a polite client never would; the raw-socket
client in tests/clients/rawnbd.py covers what libnbd cannot send at all (unknown commands and
options, malformed option data, bad magic, unknown client flags).
"""

from __future__ import annotations

import contextlib
import errno
import struct
from collections.abc import Callable, Iterator
from typing import Any

import nbd
import pytest
from clients import rawnbd as rn
from clients.util import (
    EXPORT_SIZE,
    STANDARD_CONFIG,
    MiB,
    expect_nbd_error,
    handle,
    pattern,
    read_file_range,
    release,
    server_fixture,
    workdir,
)
from conftest import RunningServer, StartServer

SIZE = EXPORT_SIZE
MAX_PAYLOAD = 32 * MiB
GOOD_SLOT = 1 * MiB  # every test may write here, then read it back at once
UNKNOWN_FLAG = 1 << 7  # no command flag is defined at bit 7


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with server_fixture(tmp_path_factory, STANDARD_CONFIG, "errors") as s:
        yield s


def still_works(h: Any, export: str) -> None:
    """The request after an error succeeds and carries the right data."""
    if export == "ro":
        assert len(h.pread(4096, 0)) == 4096
        return
    data = pattern(id(h) & 0xFFFFFF, 4096)
    h.pwrite(data, GOOD_SLOT)
    assert bytes(h.pread(4096, GOOD_SLOT)) == data


# ---------------------------------------------------------------- command errors (libnbd)

Call = Callable[[Any], object]
CASES: list[tuple[str, str, Call, int]] = [
    ("write-past-end", "plain", lambda h: h.pwrite(b"x" * 4096, SIZE), errno.ENOSPC),
    ("write-straddling-end", "plain", lambda h: h.pwrite(b"x" * 8192, SIZE - 4096), errno.ENOSPC),
    (
        "write-fua-past-end",
        "plain",
        lambda h: h.pwrite(b"x" * 512, SIZE, nbd.CMD_FLAG_FUA),
        errno.ENOSPC,
    ),
    ("zero-past-end", "plain", lambda h: h.zero(4096, SIZE), errno.ENOSPC),
    ("zero-straddling-end", "plain", lambda h: h.zero(1 * MiB, SIZE - 4096), errno.ENOSPC),
    ("read-past-end", "plain", lambda h: h.pread(4096, SIZE), errno.EINVAL),
    ("read-straddling-end", "plain", lambda h: h.pread(8192, SIZE - 4096), errno.EINVAL),
    ("read-far-past-end", "plain", lambda h: h.pread(512, 1 << 62), errno.EINVAL),
    ("trim-past-end", "plain", lambda h: h.trim(4096, SIZE), errno.EINVAL),
    ("trim-straddling-end", "plain", lambda h: h.trim(8192, SIZE - 4096), errno.EINVAL),
    ("cache-past-end", "plain", lambda h: h.cache(4096, SIZE), errno.EINVAL),
    (
        "block-status-past-end",
        "plain",
        lambda h: h.block_status(4096, SIZE, nop_extent),
        errno.EINVAL,
    ),
    ("read-past-end-ro", "ro", lambda h: h.pread(4096, SIZE), errno.EINVAL),
    ("write-readonly", "ro", lambda h: h.pwrite(b"y" * 4096, 0), errno.EPERM),
    ("write-fua-readonly", "ro", lambda h: h.pwrite(b"y" * 4096, 0, nbd.CMD_FLAG_FUA), errno.EPERM),
    ("trim-readonly", "ro", lambda h: h.trim(4096, 0), errno.EPERM),
    ("zero-readonly", "ro", lambda h: h.zero(4096, 0), errno.EPERM),
    ("zero-no-hole-readonly", "ro", lambda h: h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE), errno.EPERM),
    ("unknown-flag-read", "plain", lambda h: h.pread(4096, 0, UNKNOWN_FLAG), errno.EINVAL),
    ("unknown-flag-write", "plain", lambda h: h.pwrite(b"z" * 512, 0, UNKNOWN_FLAG), errno.EINVAL),
    ("unknown-flag-flush", "plain", lambda h: h.flush(UNKNOWN_FLAG), errno.EINVAL),
    ("df-on-write", "plain", lambda h: h.pwrite(b"z" * 512, 0, nbd.CMD_FLAG_DF), errno.EINVAL),
    ("req-one-on-read", "plain", lambda h: h.pread(4096, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL),
    ("no-hole-on-read", "plain", lambda h: h.pread(4096, 0, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL),
    (
        "fast-zero-on-read",
        "plain",
        lambda h: h.pread(4096, 0, nbd.CMD_FLAG_FAST_ZERO),
        errno.EINVAL,
    ),
    (
        "fast-zero-on-write",
        "plain",
        lambda h: h.pwrite(b"z" * 512, 0, nbd.CMD_FLAG_FAST_ZERO),
        errno.EINVAL,
    ),
    ("no-hole-on-trim", "plain", lambda h: h.trim(4096, 0, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL),
    ("df-on-zero", "plain", lambda h: h.zero(4096, 0, nbd.CMD_FLAG_DF), errno.EINVAL),
    ("req-one-on-cache", "plain", lambda h: h.cache(4096, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL),
    (
        "df-on-block-status",
        "plain",
        lambda h: h.block_status(4096, 0, nop_extent, nbd.CMD_FLAG_DF),
        errno.EINVAL,
    ),
    ("read-over-32m", "plain", lambda h: h.pread(MAX_PAYLOAD + 4096, 0), errno.EINVAL),
    ("read-over-32m-ro", "ro", lambda h: h.pread(MAX_PAYLOAD + 512, 0), errno.EINVAL),
]
SIMPLE_CASES = {
    "read-past-end",
    "read-straddling-end",
    "read-far-past-end",
    "write-past-end",
    "write-readonly",
    "unknown-flag-read",
    "req-one-on-read",
    "no-hole-on-read",
    "read-over-32m",
    "trim-readonly",
}


def nop_extent(_meta: str, _offset: int, _entries: list[int], _err: Any) -> int:
    return 0


@pytest.mark.parametrize(
    ("export", "call", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_command_error(server: RunningServer, export: str, call: Call, expected: int) -> None:
    with handle(server.uri(export), strict=False) as h:
        expect_nbd_error(lambda: call(h), expected)
        still_works(h, export)
        # and the same error a second time on the same connection
        expect_nbd_error(lambda: call(h), expected)
        still_works(h, export)


@pytest.mark.parametrize(
    ("export", "call", "expected"),
    [c[1:] for c in CASES if c[0] in SIMPLE_CASES],
    ids=[c[0] for c in CASES if c[0] in SIMPLE_CASES],
)
def test_command_error_simple_replies(
    server: RunningServer, export: str, call: Call, expected: int
) -> None:
    with handle(server.uri(export), strict=False, structured=False, meta=False) as h:
        assert h.get_structured_replies_negotiated() is False
        expect_nbd_error(lambda: call(h), expected)
        still_works(h, export)


def test_errors_on_tcp_too(server: RunningServer) -> None:
    with handle(server.uri("plain", tcp=True), strict=False) as h:
        expect_nbd_error(lambda: h.pwrite(b"x" * 4096, SIZE), errno.ENOSPC)
        expect_nbd_error(lambda: h.pread(4096, SIZE), errno.EINVAL)
        still_works(h, "plain")
    with handle(server.uri("ro", tcp=True), strict=False) as h:
        expect_nbd_error(lambda: h.pwrite(b"x" * 4096, 0), errno.EPERM)
        still_works(h, "ro")


def test_read_of_exactly_32m_is_fine(server: RunningServer) -> None:
    with handle(server.uri("sparse")) as h:
        assert bytes(h.pread(MAX_PAYLOAD, 0)) == bytes(MAX_PAYLOAD)


def test_block_status_without_context_is_einval(server: RunningServer) -> None:
    """libnbd refuses to send it, so the raw client does: structured replies on, no context."""
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        c.opt_structured_reply()
        c.opt_go("plain")
        rep = c.call(rn.CMD_BLOCK_STATUS, 0, 4096)
        assert rep.errno == rn.EINVAL, rep
        assert c.read(GOOD_SLOT, 4096) is not None
    # and without structured replies at all (a simple error reply)
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        c.opt_go("plain")
        rep = c.call(rn.CMD_BLOCK_STATUS, 0, 4096)
        assert not rep.structured and rep.error == rn.EINVAL, rep
        assert len(c.read(0, 4096)) == 4096


def test_block_status_with_context_for_another_export_is_einval(server: RunningServer) -> None:
    """SET_META_CONTEXT named "sparse", then GO "plain": no context for the chosen export."""
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        c.opt_structured_reply()
        assert "base:allocation" in c.meta_context("sparse", ("base:allocation",))
        c.opt_go("plain")
        rep = c.call(rn.CMD_BLOCK_STATUS, 0, 4096)
        assert rep.errno == rn.EINVAL, rep
        assert len(c.read(0, 4096)) == 4096


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
@pytest.mark.parametrize("cmd", [8, 9, 42, 0xFFFF])
def test_unknown_command_is_einval(server: RunningServer, cmd: int, structured: bool) -> None:
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        if structured:
            c.opt_structured_reply()
        c.opt_go("plain")
        rep = c.call(cmd, 0, 4096)
        assert rep.errno == rn.EINVAL, rep
        data = pattern(cmd, 4096)
        assert c.call(rn.CMD_WRITE, GOOD_SLOT, 4096, data=data).errno == 0
        assert c.read(GOOD_SLOT, 4096) == data


@pytest.mark.parametrize("flag", [1 << 5, 1 << 8, 1 << 15])
def test_unknown_flag_raw(server: RunningServer, flag: int) -> None:
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        c.opt_structured_reply()
        c.opt_go("plain")
        assert c.call(rn.CMD_READ, 0, 4096, flags=flag).errno == rn.EINVAL
        assert c.call(rn.CMD_FLUSH, flags=flag).errno == rn.EINVAL
        assert len(c.read(0, 4096)) == 4096


def test_write_over_32m_is_refused_without_desync(server: RunningServer) -> None:
    """A write payload over the maximum block size: the spec allows EINVAL or a hard
    disconnect; after EINVAL the payload must have been skipped, not parsed as requests."""
    big = MAX_PAYLOAD + 4096
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        c.opt_structured_reply()
        c.opt_go("plain")
        before = c.read(0, 4096)
        # the payload looks like requests, to catch a server that would parse it
        fake = struct.pack(">IHHQQI", rn.REQUEST_MAGIC, 0, rn.CMD_WRITE, 999, 0, 0)
        payload = (fake * (big // len(fake) + 1))[:big]
        try:
            c.request(rn.CMD_WRITE, 0, big, 0, payload)
            rep = c.recv_reply()
        except rn.ClosedError:
            return  # a hard disconnect is allowed
        assert rep.errno == rn.EINVAL, rep
        assert c.read(0, 4096) == before
    serves_new_client(server)


def test_simple_read_error_sends_no_payload(server: RunningServer) -> None:
    """A simple error reply to a read carries no data: the next reply must frame correctly."""
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        c.opt_go("plain")
        data = pattern(0x51, 8192)
        assert c.call(rn.CMD_WRITE, GOOD_SLOT, 8192, data=data).errno == 0
        h1 = c.request(rn.CMD_READ, SIZE, 65536)
        h2 = c.request(rn.CMD_READ, GOOD_SLOT, 8192)
        replies = {}
        for _ in range(2):
            rep = c.recv_reply()
            replies[rep.handle] = rep
        assert replies[h1].error == rn.EINVAL and replies[h1].data == b""
        assert replies[h2].error == 0 and replies[h2].data == data


def test_fua_is_accepted_on_every_command(server: RunningServer) -> None:
    """bit 0 FUA "is valid for all commands" once SEND_FUA was negotiated."""
    with handle(server.uri("plain"), strict=False) as h:
        data = pattern(0xF0A, 4096)
        h.pwrite(data, GOOD_SLOT, nbd.CMD_FLAG_FUA)
        assert bytes(h.pread(4096, GOOD_SLOT, nbd.CMD_FLAG_FUA)) == data
        h.flush(nbd.CMD_FLAG_FUA)
        h.cache(4096, GOOD_SLOT, nbd.CMD_FLAG_FUA)
        h.zero(4096, GOOD_SLOT + 4096, nbd.CMD_FLAG_FUA)
        h.trim(4096, GOOD_SLOT + 8192, nbd.CMD_FLAG_FUA)
        still_works(h, "plain")


# ---------------------------------------------------------------- reads, holes, DF, block status


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
@pytest.mark.parametrize("export", ["plain", "mem"])
def test_read_back_what_was_written(server: RunningServer, structured: bool, export: str) -> None:
    base = 4 * MiB + (1 * MiB if structured else 0)
    data = pattern(base, 256 * 1024)
    with handle(server.uri(export), structured=structured, meta=structured) as h:
        assert h.get_structured_replies_negotiated() is structured
        h.pwrite(data, base)
        assert bytes(h.pread(len(data), base)) == data
        # unaligned, odd-sized reads
        assert bytes(h.pread(1000, base + 3)) == data[3:1003]
        assert bytes(h.pread(1, base + len(data) - 1)) == data[-1:]
        # unaligned writes (the minimum block size is 1)
        h.pwrite(b"\x01\x02\x03", base + 4095)
        h.pwrite(b"Z" * 5000, base + 10001)
        expect = bytearray(data)
        expect[4095:4098] = b"\x01\x02\x03"
        expect[10001:15001] = b"Z" * 5000
        data = bytes(expect)
        assert bytes(h.pread(len(data), base)) == data
    if export == "plain":
        assert read_file_range(workdir(server) / "disk0.img", base, len(data)) == data


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_large_sparse_read_is_zeros(server: RunningServer, structured: bool) -> None:
    with handle(server.uri("sparse"), structured=structured, meta=False) as h:
        assert bytes(h.pread(16 * MiB, 0)) == bytes(16 * MiB)
    with handle(server.uri("mem"), structured=structured, meta=False) as h:
        assert bytes(h.pread(8 * MiB, 48 * MiB)) == bytes(8 * MiB)


Chunks = list[tuple[int, int, int]]  # (offset, length, status)


def read_chunks(h: Any, count: int, offset: int, flags: int = 0) -> tuple[bytes, Chunks]:
    chunks: Chunks = []

    def cb(sub: Any, off: int, status: int, _err: Any) -> int:
        chunks.append((off, len(sub), status))
        return 0

    data = bytes(h.pread_structured(count, offset, cb, flags))
    # the chunks cover the read exactly once
    covered = sorted((o, o + n) for o, n, _ in chunks)
    pos = offset
    for start, end in covered:
        assert start == pos, f"gap or overlap at {pos}: {covered}"
        pos = end
    assert pos == offset + count, covered
    return data, chunks


def test_hole_read_uses_offset_hole_chunks(server: RunningServer) -> None:
    with handle(server.uri("sparse")) as h:
        data, chunks = read_chunks(h, 4 * MiB, 0)
        assert data == bytes(4 * MiB)
        hole_bytes = sum(n for _, n, st in chunks if st == nbd.READ_HOLE)
        assert hole_bytes >= 1 * MiB, chunks
        assert {st for *_, st in chunks} <= {nbd.READ_DATA, nbd.READ_HOLE}


def test_mixed_read_has_data_and_hole_chunks(server: RunningServer) -> None:
    base = 48 * MiB
    island = pattern(0x15, 64 * 1024)
    with handle(server.uri("sparse")) as h:
        h.pwrite(island, base + 2 * MiB)
        h.flush()
        data, chunks = read_chunks(h, 4 * MiB, base)
        expected = bytes(2 * MiB) + island + bytes(2 * MiB - len(island))
        assert data == expected
        holes = [(o, n) for o, n, st in chunks if st == nbd.READ_HOLE]
        assert sum(n for _, n in holes) >= 1 * MiB, chunks
        for o, n in holes:  # a hole chunk never covers the data
            assert o + n <= base + 2 * MiB or o >= base + 2 * MiB + len(island), chunks


def test_df_read_is_one_chunk(server: RunningServer) -> None:
    base = 52 * MiB
    island = pattern(0xDF, 4096)
    with handle(server.uri("sparse")) as h:
        assert h.can_df()
        h.pwrite(island, base + 512 * 1024)
        for off, length in [(base, 1 * MiB), (base + 512 * 1024, 4096), (base, 65536)]:
            if length > 65536:
                # above 64 KiB the spec lets a server refuse DF with EOVERFLOW instead
                try:
                    data, chunks = read_chunks(h, length, off, nbd.CMD_FLAG_DF)
                except nbd.Error as e:
                    assert e.errnum == errno.EOVERFLOW, e
                    continue
            else:
                data, chunks = read_chunks(h, length, off, nbd.CMD_FLAG_DF)
            assert len(chunks) == 1, chunks
            assert chunks[0][:2] == (off, length)
            if off <= base + 512 * 1024 < off + length:
                # data and a hole in one DF read: must be OFFSET_DATA with the zeros present
                assert chunks[0][2] == nbd.READ_DATA
                rel = base + 512 * 1024 - off
                assert data[rel : rel + 4096] == island
                assert data[:rel] == bytes(rel)
        # a DF read of a pure hole is one chunk too (data or hole)
        data, chunks = read_chunks(h, 1 * MiB, 8 * MiB, nbd.CMD_FLAG_DF)
        assert len(chunks) == 1 and data == bytes(1 * MiB)


Extents = list[tuple[int, int]]  # (length, flags)


def block_status(h: Any, count: int, offset: int, flags: int = 0) -> Extents:
    got: list[tuple[str, int, list[int]]] = []

    def cb(meta: str, off: int, entries: list[int], _err: Any) -> int:
        got.append((meta, off, list(entries)))
        return 0

    h.block_status(count, offset, cb, flags)
    assert len(got) == 1, got  # one chunk per negotiated context
    meta, off, entries = got[0]
    assert meta == "base:allocation" and off == offset
    return [(entries[i], entries[i + 1]) for i in range(0, len(entries), 2)]


def test_block_status_req_one(server: RunningServer) -> None:
    base = 56 * MiB
    with handle(server.uri("sparse")) as h:
        h.pwrite(pattern(0xB5, 64 * 1024), base + 64 * 1024)
        h.flush()
        ext = block_status(h, 1 * MiB, base, nbd.CMD_FLAG_REQ_ONE)
        assert len(ext) == 1, ext
        length, flags = ext[0]
        assert 0 < length <= 64 * 1024 and flags == nbd.STATE_HOLE | nbd.STATE_ZERO, ext
        ext = block_status(h, 1 * MiB, base + 64 * 1024, nbd.CMD_FLAG_REQ_ONE)
        assert len(ext) == 1 and ext[0][1] == 0 and 0 < ext[0][0] <= 64 * 1024, ext
        # REQ_ONE never reports beyond the request
        ext = block_status(h, 4096, base + 512 * 1024, nbd.CMD_FLAG_REQ_ONE)
        assert len(ext) == 1 and 0 < ext[0][0] <= 4096, ext
        # without REQ_ONE: hole, data, hole
        ext = block_status(h, 1 * MiB, base)
        merged: list[list[int]] = []
        for length, flags in ext:
            if merged and merged[-1][1] == flags:
                merged[-1][0] += length
            else:
                merged.append([length, flags])
        assert merged[:2] == [[64 * 1024, 3], [64 * 1024, 0]], ext
        assert len(merged) <= 3, ext  # anything after the data is the one hole
        if len(merged) == 3:
            assert merged[2][1] == 3, ext


# ---------------------------------------------------------------- zeroing, trim, cache, flush


def test_fast_zero_on_file_export(server: RunningServer) -> None:
    base = 6 * MiB
    with handle(server.uri("plain")) as h:
        assert h.can_fast_zero()
        h.pwrite(pattern(0xFA, 1 * MiB), base)
        h.zero(1 * MiB, base, nbd.CMD_FLAG_FAST_ZERO)
        assert bytes(h.pread(1 * MiB, base)) == bytes(1 * MiB)
        h.flush()
    assert read_file_range(workdir(server) / "disk0.img", base, 1 * MiB) == bytes(1 * MiB)


@pytest.mark.parametrize("export", ["plain", "mem"])
def test_fast_zero_with_no_hole_succeeds_or_enotsup(server: RunningServer, export: str) -> None:
    """FAST_ZERO may fail, but only with ENOTSUP and without touching the data."""
    base = 7 * MiB
    data = pattern(0xFB, 256 * 1024)
    with handle(server.uri(export)) as h:
        h.pwrite(data, base)
        try:
            h.zero(len(data), base, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
        except nbd.Error as e:
            assert e.errnum == errno.ENOTSUP, e
            assert bytes(h.pread(len(data), base)) == data
        else:
            assert bytes(h.pread(len(data), base)) == bytes(len(data))
        still_works(h, export)


@pytest.mark.parametrize("export", ["plain", "mem"])
@pytest.mark.parametrize("flags", [0, 1 << 1, 1 << 0], ids=["plain", "no-hole", "fua"])
def test_write_zeroes(server: RunningServer, export: str, flags: int) -> None:
    base = 9 * MiB
    with handle(server.uri(export)) as h:
        h.pwrite(pattern(0x2E, 3 * MiB), base)
        h.zero(1 * MiB + 512, base + 1 * MiB - 256, flags)  # unaligned edges
        got = bytes(h.pread(3 * MiB, base))
    exp = bytearray(pattern(0x2E, 3 * MiB))
    exp[1 * MiB - 256 : 2 * MiB + 256] = bytes(1 * MiB + 512)
    assert got == bytes(exp)


def test_trim_then_write_again(server: RunningServer) -> None:
    base = 12 * MiB
    with handle(server.uri("plain")) as h:
        h.pwrite(pattern(0x7E, 1 * MiB), base)
        h.trim(1 * MiB, base)
        after = bytes(h.pread(1 * MiB, base))
        assert after in (bytes(1 * MiB), pattern(0x7E, 1 * MiB))
        h.pwrite(pattern(0x7F, 4096), base + 4096)
        assert bytes(h.pread(4096, base + 4096)) == pattern(0x7F, 4096)
        h.flush()


@pytest.mark.parametrize("export", ["plain", "ro", "mem"])
def test_cache_and_flush_succeed(server: RunningServer, export: str) -> None:
    with handle(server.uri(export)) as h:
        # file exports advertise SEND_CACHE; the memory backend has nothing to prefetch and
        # may leave it out (the flag is optional in the spec)
        assert h.can_cache() or export == "mem"
        if h.can_cache():
            h.cache(1 * MiB, 0)
            h.cache(4096, SIZE - 4096)
        if not h.is_read_only():
            h.flush()
        still_works(h, export)


# ---------------------------------------------------------------- options through libnbd


def opt_handle(server: RunningServer, export: str = "", *, tcp: bool = False) -> Any:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(True)
    h.connect_uri(server.uri(export, tcp=tcp))
    return h


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_opt_list_info_go(server: RunningServer, tcp: bool) -> None:
    h = opt_handle(server, tcp=tcp)
    try:
        listed: list[tuple[str, str]] = []

        def on_export(name: str, desc: str) -> int:
            listed.append((name, desc))
            return 0

        n = h.opt_list(on_export)
        assert n == len(listed) == 4
        assert dict(listed)["plain"] == "a plain file"
        assert dict(listed)["ro"] == "the same file, read-only"

        h.set_export_name("ro")
        h.opt_info()
        assert h.get_size() == SIZE
        assert h.is_read_only() is True
        assert h.get_export_description() == "the same file, read-only"
        assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
        assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
        assert h.get_block_size(nbd.SIZE_MAXIMUM) == MAX_PAYLOAD

        h.set_export_name("no-such-export")
        with pytest.raises(nbd.Error) as ei:
            h.opt_info()
        assert ei.value.errnum == errno.ENOENT, ei.value  # libnbd's mapping of NBD_REP_ERR_UNKNOWN
        with pytest.raises(nbd.Error):
            h.opt_go()

        # the handshake goes on after the errors
        found: list[str] = []
        h.set_export_name("plain")

        def on_context(name: str) -> int:
            found.append(name)
            return 0

        nctx = h.opt_list_meta_context(on_context)
        assert nctx >= 1 and "base:allocation" in found
        h.add_meta_context("base:allocation")
        h.opt_go()
        assert h.is_read_only() is False
        assert h.can_meta_context("base:allocation") is True
        assert h.get_canonical_export_name() == "plain"
        assert len(h.pread(4096, 0)) == 4096
        h.shutdown()
    finally:
        release(h)


def test_opt_go_default_export(server: RunningServer) -> None:
    h = opt_handle(server)
    try:
        h.set_export_name("")
        h.opt_go()
        assert h.get_size() == SIZE
        assert h.get_export_description() == "a plain file"
        h.shutdown()
    finally:
        release(h)


def test_without_a_default_export_the_empty_name_is_unknown(start_server: StartServer) -> None:
    server = start_server(STANDARD_CONFIG.replace(", default: true", ""))
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        for opt in (rn.OPT_INFO, rn.OPT_GO):
            replies = c.option(opt, c.info_data(""))
            assert [r.type for r in replies] == [rn.REP_ERR_UNKNOWN], replies
        assert c.opt_go("plain").size == SIZE
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        c.send_option(rn.OPT_EXPORT_NAME, b"")
        assert c.wait_closed() == b""
    serves_new_client(server)


def test_opt_abort(server: RunningServer) -> None:
    h = opt_handle(server)
    try:
        h.opt_abort()
        assert h.aio_is_closed() or h.aio_is_dead()
    finally:
        release(h)
    with handle(server.uri("plain")) as h2:
        still_works(h2, "plain")


@pytest.mark.parametrize(
    "flags", [0, nbd.HANDSHAKE_FLAG_NO_ZEROES], ids=["zero-padding", "no-zeroes"]
)
def test_export_name_path_libnbd(server: RunningServer, flags: int) -> None:
    """Without FIXED_NEWSTYLE libnbd ends the handshake with NBD_OPT_EXPORT_NAME."""
    h = nbd.NBD()
    try:
        h.set_handshake_flags(flags)
        h.set_export_name("plain")
        h.connect_uri(server.uri("plain"))
        assert h.get_protocol() == "newstyle"
        assert h.get_size() == SIZE
        assert h.get_structured_replies_negotiated() is False
        data = pattern(0xE1 + flags, 64 * 1024)
        h.pwrite(data, GOOD_SLOT)
        assert bytes(h.pread(len(data), GOOD_SLOT)) == data
        h.shutdown()
    finally:
        release(h)


# ---------------------------------------------------------------- handshake corners (raw)


def serves_new_client(server: RunningServer) -> None:
    with rn.RawNBD.tcp(server.port) as c:
        c.start()
        c.opt_structured_reply()
        info = c.opt_go("plain")
        assert info.size == SIZE
        data = pattern(0xCAFE, 4096)
        assert c.call(rn.CMD_WRITE, GOOD_SLOT, 4096, data=data).errno == 0
        assert c.read(GOOD_SLOT, 4096) == data
        c.disconnect()
        assert c.wait_closed() == b""


def test_greeting_and_go_info(server: RunningServer) -> None:
    with rn.RawNBD.unix(server.socket_path) as c:
        assert c.greeting() == rn.FLAG_FIXED_NEWSTYLE | rn.FLAG_NO_ZEROES
        c.send_client_flags(rn.C_FIXED_NEWSTYLE | rn.C_NO_ZEROES)
        info = c.opt_info("plain", (rn.INFO_BLOCK_SIZE, rn.INFO_DESCRIPTION, rn.INFO_NAME, 999))
        assert info.size == SIZE
        assert info.description == "a plain file"
        assert info.block_size == (1, 4096, MAX_PAYLOAD)
        assert info.name in (None, "plain")
        # without structured replies: no SEND_DF
        want = (
            rn.HAS_FLAGS | rn.SEND_FLUSH | rn.SEND_FUA | rn.SEND_TRIM | rn.SEND_WRITE_ZEROES
            | rn.SEND_FAST_ZERO | rn.SEND_CACHE | rn.CAN_MULTI_CONN
        )  # fmt: skip
        assert info.flags == want, f"{info.flags:#x} != {want:#x}"
        c.opt_structured_reply()
        info = c.opt_info("plain")
        assert info.flags == want | rn.SEND_DF, f"{info.flags:#x}"
        ro = c.opt_info("ro")
        assert ro.flags & (rn.HAS_FLAGS | rn.READ_ONLY) == rn.HAS_FLAGS | rn.READ_ONLY
        assert ro.flags & rn.SEND_DF
        default = c.opt_info("")
        assert default.size == SIZE and default.flags == info.flags
        assert c.opt_list() and sorted(n for n, _ in c.opt_list()) == [
            "mem",
            "plain",
            "ro",
            "sparse",
        ]
        ctx = c.meta_context("plain", ("base:allocation",), list_only=True)
        assert list(ctx) == ["base:allocation"]
        c.opt_go("plain")
        assert len(c.read(0, 4096)) == 4096


@pytest.mark.parametrize("option", [0, 4, 11, 12, 99, 0x7FFFFFFF, 0xFFFFFFFF])
def test_unknown_option_is_unsup_and_go_still_works(server: RunningServer, option: int) -> None:
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        replies = c.option(option, b"some data" if option % 2 else b"")
        assert [r.type for r in replies] == [rn.REP_ERR_UNSUP], replies
        c.opt_structured_reply()
        assert c.opt_go("plain").size == SIZE
        assert len(c.read(0, 4096)) == 4096
    serves_new_client(server)


MALFORMED_INFO = [
    ("empty", b""),
    ("short-length", b"\x00\x00"),
    ("name-longer-than-data", b"\x00\x00\x00\x10ab\x00\x00"),
    ("no-request-count", b"\x00\x00\x00\x05plain"),
    ("count-beyond-data", b"\x00\x00\x00\x05plain\x00\x03\x00\x03"),
    ("trailing-bytes", b"\x00\x00\x00\x05plain\x00\x00XYZ"),
]


@pytest.mark.parametrize("go", [False, True], ids=["info", "go"])
@pytest.mark.parametrize(
    ("data"), [m[1] for m in MALFORMED_INFO], ids=[m[0] for m in MALFORMED_INFO]
)
def test_malformed_info_is_invalid(server: RunningServer, data: bytes, go: bool) -> None:
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        replies = c.option(rn.OPT_GO if go else rn.OPT_INFO, data)
        assert [r.type for r in replies] == [rn.REP_ERR_INVALID], replies
        assert c.opt_go("plain").size == SIZE
        assert len(c.read(0, 4096)) == 4096
    serves_new_client(server)


@pytest.mark.parametrize(
    ("option", "data"),
    [
        (rn.OPT_LIST, b"x"),
        (rn.OPT_STRUCTURED_REPLY, b"x"),
        (rn.OPT_STARTTLS, b"x"),
        (rn.OPT_SET_META_CONTEXT, b"\x00\x00\x00\x05plain\x00\x00\x00\x01\x00\x00\x01\x00ab"),
        (rn.OPT_LIST_META_CONTEXT, b"\x00\x00\x00\x09plain"),
    ],
    ids=[
        "list-with-data",
        "structured-with-data",
        "starttls-with-data",
        "set-meta-short",
        "list-meta-short",
    ],
)
def test_other_malformed_options_are_invalid(
    server: RunningServer, option: int, data: bytes
) -> None:
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        if option in (rn.OPT_SET_META_CONTEXT, rn.OPT_LIST_META_CONTEXT):
            c.opt_structured_reply()
        replies = c.option(option, data)
        final = replies[-1].type
        if option == rn.OPT_STARTTLS:  # ERR_INVALID for the data, or the NOTLS refusal
            assert final in (rn.REP_ERR_INVALID, rn.REP_ERR_POLICY), replies
        else:
            assert final == rn.REP_ERR_INVALID, replies
        assert c.opt_go("plain").size == SIZE
    serves_new_client(server)


def test_set_meta_context_before_structured_replies_is_invalid(server: RunningServer) -> None:
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        replies = c.option(rn.OPT_SET_META_CONTEXT, c.meta_data("plain", ("base:allocation",)))
        assert replies[-1].type == rn.REP_ERR_INVALID, replies
        c.opt_structured_reply()
        assert c.meta_context("plain", ("base:allocation",)) != {}
        c.opt_go("plain")
        rep = c.call(rn.CMD_BLOCK_STATUS, 0, 4096)
        assert rep.errno == 0 and rep.chunks[0].type == rn.REPLY_TYPE_BLOCK_STATUS


def test_unknown_meta_namespace_selects_nothing(server: RunningServer) -> None:
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        c.opt_structured_reply()
        assert c.meta_context("plain", ("x-nosuch:thing",)) == {}
        c.opt_go("plain")
        assert c.call(rn.CMD_BLOCK_STATUS, 0, 4096).errno == rn.EINVAL
        assert len(c.read(0, 4096)) == 4096


def test_starttls_is_refused_with_a_message(server: RunningServer) -> None:
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        replies = c.option(rn.OPT_STARTTLS)
        assert len(replies) == 1
        assert replies[0].type == rn.REP_ERR_POLICY, replies
        assert replies[0].data.decode().strip(), "ERR_POLICY without a message"
        c.opt_structured_reply()
        assert c.opt_go("plain").size == SIZE
        assert len(c.read(0, 4096)) == 4096
    serves_new_client(server)


@pytest.mark.parametrize("opt", [rn.OPT_INFO, rn.OPT_GO])
def test_unknown_export_is_err_unknown(server: RunningServer, opt: int) -> None:
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        replies = c.option(opt, c.info_data("no-such-export"))
        assert [r.type for r in replies] == [rn.REP_ERR_UNKNOWN], replies
        assert c.opt_go("ro").flags & rn.READ_ONLY
        assert len(c.read(0, 4096)) == 4096
    serves_new_client(server)


@pytest.mark.parametrize(
    "client_flags",
    [rn.C_FIXED_NEWSTYLE | rn.C_NO_ZEROES, rn.C_FIXED_NEWSTYLE, 0, rn.C_NO_ZEROES],
    ids=["fixed-nozeroes", "fixed", "none", "nozeroes"],
)
def test_export_name_raw(server: RunningServer, client_flags: int) -> None:
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start(client_flags)
        size, flags = c.export_name("plain")  # checks the 124 zeroes unless NO_ZEROES
        assert size == SIZE and flags & rn.HAS_FLAGS and not flags & rn.READ_ONLY
        assert not flags & rn.SEND_DF  # no structured replies were negotiated
        data = pattern(0xE2 + client_flags, 4096)
        assert c.call(rn.CMD_WRITE, GOOD_SLOT, 4096, data=data).errno == 0
        assert c.read(GOOD_SLOT, 4096) == data
        c.disconnect()
        assert c.wait_closed() == b""


def test_export_name_default_and_after_options(server: RunningServer) -> None:
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        c.opt_structured_reply()
        assert c.option(99)[-1].type == rn.REP_ERR_UNSUP
        size, flags = c.export_name("")
        assert size == SIZE and flags & rn.SEND_DF  # structured replies carry over
        rep = c.call(rn.CMD_READ, 0, 4096)
        assert rep.structured and rep.errno == 0


def test_export_name_unknown_closes(server: RunningServer) -> None:
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        c.send_option(rn.OPT_EXPORT_NAME, b"no-such-export")
        assert c.wait_closed() == b"", "the server must close without an answer"
    serves_new_client(server)


@pytest.mark.parametrize("client_flags", [1 << 2, 1 << 31, 0xFFFFFFFF])
def test_unknown_client_flags_close(server: RunningServer, client_flags: int) -> None:
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start(client_flags)
        with contextlib.suppress(rn.ClosedError):
            c.send_option(rn.OPT_LIST)
        assert c.wait_closed() == b""
    serves_new_client(server)


@pytest.mark.parametrize("where", ["option-magic", "request-magic", "greeting-garbage"])
def test_garbage_magic_closes(server: RunningServer, where: str) -> None:
    with rn.RawNBD.unix(server.socket_path) as c:
        if where == "greeting-garbage":
            c.greeting()
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        elif where == "option-magic":
            c.start()
            c.send_option(rn.OPT_LIST, magic=0x0123456789ABCDEF)
        else:
            c.start()
            c.opt_go("plain")
            c.send(b"\xde\xad\xbe\xef" + bytes(24))
        assert c.wait_closed() == b"", "garbage must be answered by closing, nothing else"
    serves_new_client(server)


def test_abort_gets_ack_or_close(server: RunningServer) -> None:
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        c.send_option(rn.OPT_ABORT)
        try:
            r = c.recv_option_reply()
            assert r.type == rn.REP_ACK and r.option == rn.OPT_ABORT
        except rn.ClosedError:
            pass
        assert c.wait_closed() == b""
    serves_new_client(server)


def test_disc_with_requests_in_flight_answers_them(server: RunningServer) -> None:
    """NBD_CMD_DISC: the server handles all outstanding requests, then closes."""
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        c.opt_structured_reply()
        c.opt_go("plain")
        data = pattern(0xD15C, 256 * 1024)
        handles = [c.request(rn.CMD_WRITE, GOOD_SLOT, len(data), data=data)]
        handles += [c.request(rn.CMD_READ, 0, 4096) for _ in range(4)]
        c.request(rn.CMD_DISC)
        got = {c.recv_reply().handle for _ in handles}
        assert got == set(handles)
        assert c.wait_closed() == b""
    with handle(server.uri("plain")) as h:
        assert bytes(h.pread(len(data), GOOD_SLOT)) == data


def test_pipelined_requests_all_answered(server: RunningServer) -> None:
    with rn.RawNBD.unix(server.socket_path) as c:
        c.start()
        c.opt_structured_reply()
        c.opt_go("mem")
        expect = {}
        for i in range(64):
            data = pattern(i, 4096)
            c.request(rn.CMD_WRITE, 20 * MiB + i * 4096, 4096, data=data)
            expect[i] = data
        for _ in range(64):
            assert c.recv_reply().errno == 0
        for i in range(64):
            c.request(rn.CMD_READ, 20 * MiB + i * 4096, 4096)
        for _ in range(64):
            rep = c.recv_reply()
            off = 20 * MiB + (rep.handle - 65) * 4096
            assert rn.assemble_read(rep, off, 4096) == expect[rep.handle - 65]
