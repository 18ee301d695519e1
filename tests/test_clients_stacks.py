"""Real clients over stacked `table:` devices: qemu-io, nbdcopy, nbdinfo and libnbd.

The backing files are read directly afterwards: a byte written through a stripe must be in
a.img or b.img exactly where the striped layout puts it (chunk c on stripe c mod 2, row c div 2),
computed here from the table text, not by nbdcrypt. Each test starts its own server, so the
files hold only what that test wrote.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from clients.util import (
    MiB,
    handle,
    merge_extents,
    nbdinfo_json,
    random_bytes,
    read_file_range,
    sha256_file,
    workdir,
)
from conftest import RunningServer, StartServer, require_tool, run

SECTOR = 512
KiB = 1024
CHUNK = 16 * SECTOR  # striped 2 16
STRIPED_END = 32768 * SECTOR  # 16 MiB of stripes over a and b, then 1 MiB of zero
POOL_SIZE = (32768 + 2048) * SECTOR
SLICE_BASE = 1024 * SECTOR  # slice: linear pool 1024
SLICE_SIZE = 8192 * SECTOR
BAD_LINEAR_BASE = 30000 * SECTOR  # bad: linear a 30000 for 1 MiB, then 1 MiB of error
BAD_SIZE = 4096 * SECTOR
HOLE_ZERO = 3
DATA = 0

CONFIG = """\
devices:
  a: {file: a.img, size: 16M}
  b: {file: b.img, size: 16M}
  pool: {table: ["0 32768 striped 2 16 a 0 b 0", "32768 2048 zero"]}
  slice: {table: ["0 8192 linear pool 1024"]}
  bad: {table: ["0 2048 linear a 30000", "2048 2048 error"]}
exports:
  pool: {device: pool}
  slice: {device: slice}
  bad: {device: bad}
"""


@pytest.fixture
def server(start_server: StartServer) -> RunningServer:
    require_tool("qemu-io")
    require_tool("nbdinfo")
    require_tool("nbdcopy")
    return start_server(CONFIG)


def pool_place(offset: int) -> tuple[str, int] | None:
    """Where byte `offset` of pool lives: (file, byte offset in it), or None (zero line)."""
    if offset >= STRIPED_END:
        return None
    chunk, within = divmod(offset, CHUNK)
    row, stripe = divmod(chunk, 2)
    return ("a.img", "b.img")[stripe], row * CHUNK + within


def pool_pieces(offset: int, length: int) -> list[tuple[int, int, tuple[str, int] | None]]:
    """[offset, offset + length) of pool cut where the layout changes device or jumps:
    (position in the range, byte count, place of its first byte)."""
    pieces = []
    pos, end = offset, offset + length
    while pos < end:
        # to the end of the chunk (or of the range); the zero line in one piece
        n = min(end, pos - pos % CHUNK + CHUNK) - pos if pos < STRIPED_END else end - pos
        pieces.append((pos - offset, n, pool_place(pos)))
        pos += n
    return pieces


def files_hold(server: RunningServer, offset: int, data: bytes) -> None:
    """The backing files hold `data` where pool's [offset, offset + len(data)) lives."""
    for at, n, place in pool_pieces(offset, len(data)):
        if place is None:
            continue
        name, where = place
        got = read_file_range(workdir(server) / name, where, n)
        assert got == data[at : at + n], f"pool {offset + at}+{n}: wrong bytes in {name}@{where}"


def qemu_io(server: RunningServer, export: str, *commands: str, tcp: bool = False) -> str:
    cmd = ["qemu-io", "-f", "raw", server.uri(export, tcp=tcp)]
    for c in commands:
        cmd += ["-c", c]
    proc = run(cmd, timeout=60, check=False)
    return proc.stdout + proc.stderr


def assert_ok(out: str) -> None:
    for bad in ("Pattern verification failed", "failed", "error", "Error"):
        assert bad not in out, out


# ---------------------------------------------------------------- qemu-io over stripes


def test_qemu_io_patterns_across_chunks_and_lines(server: RunningServer) -> None:
    writes = [
        (CHUNK - 1000, 3000, 0x11),  # over the chunk 0 | chunk 1 boundary, unaligned
        (5 * CHUNK - SECTOR, 3 * CHUNK + 2 * SECTOR, 0x22),  # five chunks, both stripes
        (6 * MiB + 3, 123_457, 0x33),  # odd everything
        (STRIPED_END - 4096, 8192, 0x44),  # half on the stripes, half on the zero line
        (POOL_SIZE - 4096, 4096, 0x55),  # all on the zero line: dropped
    ]
    commands = [f"write -P {p:#x} {off} {n}" for off, n, p in writes]
    assert_ok(qemu_io(server, "pool", *commands))

    # a second client reads back what the first wrote (over TCP this time)
    reads = [
        f"read -P 0x11 {CHUNK - 1000} 3000",
        f"read -P 0x22 {5 * CHUNK - SECTOR} {3 * CHUNK + 2 * SECTOR}",
        f"read -P 0x33 {6 * MiB + 3} 123457",
        f"read -P 0x44 {STRIPED_END - 4096} 4096",
        f"read -P 0 {STRIPED_END} 1M",  # the zero line dropped both writes into it
        f"read -P 0 {CHUNK + 2000} {5 * CHUNK - SECTOR - CHUNK - 2000}",  # between the writes
    ]
    assert_ok(qemu_io(server, "pool", *reads, tcp=True))
    out = qemu_io(server, "pool", f"read -P 0x44 {STRIPED_END} 4096")
    assert "Pattern verification failed" in out, out

    for off, n, p in writes:
        files_hold(server, off, bytes([p]) * min(n, max(0, STRIPED_END - off)))
    # and nothing landed where the layout does not put it: the 0x11 write's second half is
    # chunk 1 = b.img row 0; a.img's row 0 ends with its first 1000 bytes only
    a = workdir(server) / "a.img"
    b = workdir(server) / "b.img"
    assert read_file_range(a, 0, CHUNK - 1000) == bytes(CHUNK - 1000)
    assert read_file_range(a, CHUNK - 1000, 1000) == b"\x11" * 1000
    assert read_file_range(b, 0, 2000) == b"\x11" * 2000
    assert read_file_range(b, 2000, CHUNK - 2000) == bytes(CHUNK - 2000)


def test_qemu_io_over_a_stack_of_two_tables(server: RunningServer) -> None:
    """slice = pool from sector 1024 = stripes; a write to slice lands in the files."""
    off, n = 3 * CHUNK + 100, 5 * CHUNK
    assert_ok(qemu_io(server, "slice", f"write -P 0x66 {off} {n}", f"read -P 0x66 {off} {n}"))
    assert_ok(qemu_io(server, "pool", f"read -P 0x66 {SLICE_BASE + off} {n}"))
    files_hold(server, SLICE_BASE + off, b"\x66" * n)
    # the last byte of slice is pool's SLICE_BASE + SLICE_SIZE - 1
    assert_ok(qemu_io(server, "slice", f"write -P 0x77 {SLICE_SIZE - 1} 1"))
    files_hold(server, SLICE_BASE + SLICE_SIZE - 1, b"\x77")
    # one byte past the end of slice is refused, and pool's next byte stays zero
    out = qemu_io(server, "slice", f"write -P 0x77 {SLICE_SIZE} 1")
    assert "write failed" in out, out
    assert_ok(qemu_io(server, "pool", f"read -P 0 {SLICE_BASE + SLICE_SIZE} 4k"))


# ---------------------------------------------------------------- nbdcopy


def test_nbdcopy_random_file_into_slice_and_out(server: RunningServer, tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    data = random_bytes(SLICE_SIZE, seed=77)
    src.write_bytes(data)
    out = tmp_path / "out.bin"
    run(["nbdcopy", "--flush", str(src), server.uri("slice")], timeout=120)
    run(["nbdcopy", server.uri("slice", tcp=True), str(out)], timeout=120)
    run(["cmp", str(src), str(out)], timeout=60)
    assert sha256_file(out) == sha256_file(src)
    # through pool's stripes into the two files, chunk by chunk
    files_hold(server, SLICE_BASE, data)
    # and pool around the slice is untouched
    with handle(server.uri("pool")) as h:
        assert bytes(h.pread(SLICE_BASE, 0)) == bytes(SLICE_BASE)
        after = SLICE_BASE + SLICE_SIZE
        assert bytes(h.pread(64 * KiB, after)) == bytes(64 * KiB)
        assert bytes(h.pread(64 * KiB, SLICE_BASE + 64 * KiB)) == data[64 * KiB : 128 * KiB]


# ---------------------------------------------------------------- errors


def test_error_line_fails_while_linear_line_and_other_exports_serve(
    server: RunningServer,
) -> None:
    # the linear part of `bad` works, and lands in a.img at sector 30000
    out = qemu_io(server, "bad", "write -P 0x5a 4096 64k", "read -P 0x5a 4096 64k")
    assert_ok(out)
    assert read_file_range(workdir(server) / "a.img", BAD_LINEAR_BASE + 4096, 64 * KiB) == (
        b"\x5a" * (64 * KiB)
    )
    # the error part: every read and write fails with EIO, and so does one over the boundary
    out = qemu_io(
        server,
        "bad",
        "read 1M 4k",
        "write -P 0x01 1536k 4k",
        f"read {1 * MiB - 4096} 8k",
        "read -P 0x5a 4096 4k",  # the connection still works after the errors
    )
    assert out.count("read failed: Input/output error") == 2, out
    assert out.count("write failed: Input/output error") == 1, out
    assert "Pattern verification failed" not in out, out

    # meanwhile another client keeps using pool: start a long run of failing requests on
    # `bad` and do I/O on pool while it runs
    cmd = ["qemu-io", "-f", "raw", server.uri("bad", tcp=True)]
    for i in range(200):
        cmd += ["-c", f"read {1 * MiB + (i % 256) * 4096} 4k"]
    with handle(server.uri("pool")) as h:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            rounds = 0
            deadline = time.monotonic() + 60
            while (proc.poll() is None or rounds < 20) and time.monotonic() < deadline:
                block = random_bytes(CHUNK + 100, seed=rounds)
                offset = 8 * MiB + (rounds % 300) * 3 * CHUNK + 7  # stays on the stripes
                h.pwrite(block, offset)
                assert bytes(h.pread(len(block), offset)) == block
                rounds += 1
            text, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert text.count("read failed: Input/output error") == 200, text[-2000:]
        assert rounds >= 20
        h.flush()
    assert server.proc.poll() is None, server.log
    assert "Traceback" not in server.log, server.log[-4000:]


# ---------------------------------------------------------------- nbdinfo


def only_export(info: Any) -> dict[str, Any]:
    exports = info["exports"]
    assert len(exports) == 1, exports
    export: dict[str, Any] = exports[0]
    return export


# What the code computes for these stacks (nbdcrypt/dm/device.py: table_caps is what every
# target can do): stripes over files can trim, fast-zero and cache; the zero and error
# targets can trim and fast-zero (the kernel's zero target also takes discards) but do not
# declare CACHE, so no table with such a line offers it.
EXPECTED_FLAGS = {
    "pool": {"can_trim": True, "can_fast_zero": True, "can_cache": False},
    "slice": {"can_trim": True, "can_fast_zero": True, "can_cache": False},
    "bad": {"can_trim": True, "can_fast_zero": True, "can_cache": False},
}
SIZES = {"pool": POOL_SIZE, "slice": SLICE_SIZE, "bad": BAD_SIZE}


@pytest.mark.parametrize("export", ["pool", "slice", "bad"])
def test_nbdinfo_json_of_stacked_exports(server: RunningServer, export: str) -> None:
    e = only_export(nbdinfo_json(server.uri(export)))
    assert e["export-name"] == export
    assert e["export-size"] == SIZES[export]
    common = {
        "is_read_only": False,
        "is_rotational": False,
        "can_flush": True,
        "can_fua": True,
        "can_zero": True,
        "can_df": True,
        "can_multi_conn": True,
    }
    expected = common | EXPECTED_FLAGS[export]
    assert {k: e.get(k) for k in expected} == expected
    assert (e["block_size_minimum"], e["block_size_preferred"], e["block_size_maximum"]) == (
        1,
        4096,
        32 * MiB,
    )
    assert "base:allocation" in e["contexts"]


def test_nbdinfo_list_shows_stack_sizes(server: RunningServer) -> None:
    info = nbdinfo_json("--list", server.uri(""))
    sizes = {x["export-name"]: x["export-size"] for x in info["exports"]}
    assert sizes == SIZES


def map_of(uri: str) -> list[tuple[int, int, int]]:
    raw = nbdinfo_json("--map", uri)
    extents = [(int(x["offset"]), int(x["length"]), int(x["type"])) for x in raw]
    return merge_extents(extents)


def test_nbdinfo_map_over_a_fresh_stack(server: RunningServer) -> None:
    assert map_of(server.uri("pool")) == [(0, POOL_SIZE, HOLE_ZERO)]
    assert map_of(server.uri("slice")) == [(0, SLICE_SIZE, HOLE_ZERO)]
    # the error line reports data (it fails I/O, so it must not claim zeroes), without failing
    assert map_of(server.uri("bad")) == [(0, 1 * MiB, HOLE_ZERO), (1 * MiB, 1 * MiB, DATA)]


def test_nbdinfo_map_after_writes_through_the_stack(server: RunningServer) -> None:
    with handle(server.uri("pool")) as h:
        h.pwrite(b"\x99" * (64 * KiB), 6 * MiB)  # 8 chunks from chunk 768: 4 on a, 4 on b
        h.pwrite(b"\x98" * (8 * KiB), STRIPED_END + 8 * KiB)  # into the zero line
        h.flush()
    with handle(server.uri("slice")) as h:
        h.pwrite(b"\x97" * (16 * KiB), 1 * MiB)  # pool 1.5 MiB: chunk 192 (a) and 193 (b)
        h.flush()
    pool = map_of(server.uri("pool", tcp=True))
    assert sum(x[1] for x in pool) == POOL_SIZE
    slice_at = SLICE_BASE + 1 * MiB
    assert pool == [
        (0, slice_at, HOLE_ZERO),
        (slice_at, 16 * KiB, DATA),
        (slice_at + 16 * KiB, 6 * MiB - slice_at - 16 * KiB, HOLE_ZERO),
        (6 * MiB, 64 * KiB, DATA),
        (6 * MiB + 64 * KiB, POOL_SIZE - 6 * MiB - 64 * KiB, HOLE_ZERO),
    ], pool
    assert map_of(server.uri("slice")) == [
        (0, 1 * MiB, HOLE_ZERO),
        (1 * MiB, 16 * KiB, DATA),
        (1 * MiB + 16 * KiB, SLICE_SIZE - 1 * MiB - 16 * KiB, HOLE_ZERO),
    ]
    # what the map calls zero reads as zeroes, and the data is where the map says
    with handle(server.uri("pool")) as h:
        for off, length, typ in pool:
            got = bytes(h.pread(min(length, 256 * KiB), off))
            if typ == HOLE_ZERO:
                assert got == bytes(len(got)), off
            else:
                assert got.strip(b"\x99\x97") == b"", off
